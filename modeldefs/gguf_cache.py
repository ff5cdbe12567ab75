"""A converted copy of each GGUF file, so that transformers' GGUF reader runs once per file.

transformers parses a GGUF's metadata field by field every time it loads the model or the tokenizer
from it (the SmolLM2 tokenizer alone is 49,152 strings and 48,900 merges): ~30 s for the
SmolLM2-135M model and ~7 s for its tokenizer on a 2-core machine. The first load stores what it
produced as HF folders (config.json + model.safetensors; the tokenizer files) under
``$QUIETDEPTH_CACHE`` (default ``~/.cache/quietdepth``), and later loads read those in seconds.
An entry is named after the GGUF's resolved path, size and modification time, so a changed file is
converted afresh. ``QUIETDEPTH_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path


def cache_entry(gguf: Path) -> Path | None:
    """The cache folder for `gguf`'s conversions, or None when the cache is off."""
    root = os.environ.get("QUIETDEPTH_CACHE", "")
    if root.lower() == "off":
        return None
    base = Path(root) if root else Path.home() / ".cache" / "quietdepth"
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return base / "gguf" / f"{gguf.stem}-{key}"


def store(entry: Path, part: str, write: Callable[[Path], object]) -> None:
    """Write `part` (a folder) of `entry` with `write(folder)`: into a temporary folder that is then
    renamed into place, so a process never reads a half-written part (each rank of a multi-process
    run may convert at once; the first rename wins). A failed write is a warning, not an error: the
    caller has its result already, and the next load converts again."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=entry))
    except OSError as e:
        warnings.warn(f"could not create the GGUF cache {entry} ({e}); set QUIETDEPTH_CACHE to a writable "
                      "folder, or to off", stacklevel=2)
        return
    try:
        write(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"could not cache the converted GGUF in {entry} ({e}); it is converted again next time",
                      stacklevel=2)
        return
    except BaseException:  # Ctrl-C, or a bug: no half-written folder (~0.5 GB for SmolLM2) stays in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, entry / part)
    except OSError:  # another process stored this part first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    print(f"quietdepth: cached the GGUF's {part} in {entry / part} (QUIETDEPTH_CACHE=off to turn off)",
          file=sys.stderr)
