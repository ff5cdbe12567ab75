"""Local jsonl task files: told apart from hub dataset ids, and read line by line so that a bad row is reported as
`file:line`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def is_local(path: str) -> bool:
    """Whether a task's data `path` names a local file rather than a hub dataset id: it exists, ends in
    .jsonl/.json, or starts with `.` or `/`."""
    return os.path.exists(path) or Path(path).suffix in (".jsonl", ".json") or path.startswith((".", "/"))


def records(path: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed record) for every non-blank line; malformed JSON or text that is not UTF-8 is a
    ValueError naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # -sig: a BOM, as Windows tools write
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                 f"{error.start + 1}); save the file as UTF-8") from error
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({error.msg}, column {error.colno})") from error
