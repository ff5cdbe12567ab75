"""What every benchmark script shares: the device it ran on, timing syncs, and the JSON record."""

from __future__ import annotations

import json
import platform
from typing import Any

import torch


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    return torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def emit(record: dict[str, Any], json_path: str | None) -> None:
    """Print the record as one JSON line and, where asked, write it to `json_path`."""
    print(json.dumps(record))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
