"""Writing eval outputs so that a reader never sees half a file: a crash, a kill or a full disk mid-write
leaves the earlier version whole."""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tempfile
from pathlib import Path

# flock errors of filesystems without (this kind of) locking: NFS refuses an exclusive lock on a descriptor not
# open for writing (EBADF), Lustre without -o flock has none (ENOSYS), some servers run out (ENOLCK)
_NO_LOCKING = {errno.EBADF, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}


def lock(fd: int, what: str, wait: bool = True) -> None:
    """Take an exclusive `flock` on `fd` (blocking unless `wait` is False: then BlockingIOError if it is
    held). Where the filesystem cannot lock, warn that concurrent runs on `what` are not kept apart and go on:
    the run itself is sound, only two at once are not guarded."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise
    except OSError as error:
        if error.errno not in _NO_LOCKING:
            raise
        print(f"warning: {what}: this filesystem cannot lock it ({error.strerror}); runs writing there at the "
              "same time are not kept apart", file=sys.stderr)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, renamed over `path` once it
    is complete (a rename within a folder is atomic). The file keeps the mode of the one it replaces; a new
    one gets the mode `open` would give it (mkstemp's is 0600: readable by its owner alone). A symlink stays
    one: its target is replaced (as `open` writes through it), with the temporary file beside the target."""
    path = Path(os.path.realpath(path))
    fd, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask
