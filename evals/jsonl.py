"""Local jsonl task files, read line by line so that a bad row is reported as `file:line`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def records(path: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed record) for every non-blank line; malformed JSON is a ValueError naming the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({error.msg}, column {error.colno})") from error
