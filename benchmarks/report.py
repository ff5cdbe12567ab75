"""What every benchmark script shares: the device it ran on, timing syncs, activation bytes, and the JSON record."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from evals.files import write_atomic


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    return torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"


def keep_freed_memory() -> bool:
    """Make glibc serve allocations from the heap (no mmap), never trim it, and grow it with 256 MB to
    spare, so a timed CPU step does not page-fault on memory that an earlier step, or another model,
    released (on the 2-core box a MoD step took 80k minor faults run alone and 1 interleaved with
    dense). Returns whether it applied (False off glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    options = ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 * 2**20))
    return all(libc.mallopt(option, value) == 1 for option, value in options)


def add_heap_option(parser: argparse.ArgumentParser) -> None:
    """`--default-heap`: opt out of `keep_freed_memory` on a CPU."""
    parser.add_argument("--default-heap", action="store_true",
                        help="CPU: leave glibc's malloc as it is, so large freed tensors are unmapped and the next "
                        "step or batch page-faults them in afresh (a process with default settings)")


def steady_heap(args: argparse.Namespace, device: torch.device) -> bool:
    """Apply `keep_freed_memory` on a CPU unless `--default-heap`; whether it applied."""
    return device.type == "cpu" and not args.default_heap and keep_freed_memory()


def print_profile(title: str, run: Callable[[], None], device: torch.device, rows: int, steps: int = 1,
                  self_time: bool = True) -> None:
    """Profile `steps` calls of `run` and print the `rows` operators that take the most (self or
    total) time."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        sync(device)
    sort_by = ("self_" if self_time else "") + ("cuda_time_total" if device.type == "cuda" else "cpu_time_total")
    print(f"\n{title}")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=56))


def saved_activation_bytes(loss_of: Callable[[], torch.Tensor], params: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `loss_of()` runs, `params` excluded
    (a compiled graph's saved tensors count too); then runs the backward, which leaves the gradients."""
    params = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of()
    loss.backward()
    return sum(kept.values())


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """`with PeakMemory(device) as m: ...`, then `m.gib`: the most memory that tensors allocated in the block held
    at once, above what was allocated when it began (weights, gradients and AdamW state built there included).
    On a GPU from the CUDA allocator's statistics; a CPU's allocator keeps none, so there the profiler records
    every allocation and free, and their running sum in time order gives the peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._resident = torch.cuda.memory_allocated()
        else:
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.gib = (torch.cuda.max_memory_allocated() - self._resident) / 2**30
            return
        self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        held = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            held += e.nbytes()  # negative for a free
            peak = max(peak, held)
        self.gib = peak / 2**30


def emit(record: dict[str, Any], json_path: str | None) -> None:
    """Print the record as one JSON line and, where asked, write it to `json_path`."""
    print(json.dumps(record))
    if json_path:
        write_json(record, json_path)


def write_json(record: dict[str, Any], json_path: str) -> None:
    """Replace `json_path` with `record` in one step (`evals.files.write_atomic`): a process killed while
    writing leaves the file it had."""
    write_atomic(json_path, json.dumps(record, indent=2))


def check_writable(json_path: str) -> None:
    """Exit with a message naming --json unless a file can be created next to `json_path` (before a run measures)."""
    probe = Path(json_path).with_name(f".{Path(json_path).name}.{os.getpid()}.tmp")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"--json {json_path}: cannot write it ({error.strerror}); give a path in a folder "
                         "that exists") from error


class Stopped(SystemExit):
    """SIGTERM (what `timeout` sends) as an exception in the main thread, so that a `Record` saves and reports what
    was finished; the process still exits with 143, as one the signal killed."""


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(128 + signum)


class Record:
    """A benchmark's record, kept on disk as it grows, so that no finished measurement is lost.

    An unwritable `json_path` is refused at once, before any measurement. Each `add` or `update` (a finished
    measurement) rewrites the file (`write_json`), with `"complete": false` until the `with` block ends; a file
    already there (an earlier run's record) is kept until this run has measured something. Leaving the block,
    normally or by an exception, Ctrl-C or SIGTERM, prints `table(record)` (the finished rows) and the record as
    one JSON line and saves it; a run that did not finish keeps `"complete": false` and gets `"error"`, and the
    exception goes on.
    """

    def __init__(self, json_path: str | None, meta: dict[str, Any],
                 table: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.json_path, self.table = json_path, table
        self.data: dict[str, Any] = {**meta, "complete": False}
        self.measured = False
        if json_path:
            check_writable(json_path)

    def save(self) -> None:
        """Write the record to `json_path` once something is measured (until then an earlier file stays)."""
        if self.json_path and self.measured:
            write_json(self.data, self.json_path)

    def add(self, key: str, row: dict[str, Any]) -> None:
        """Append a finished row to the list `key` and save."""
        self.data.setdefault(key, []).append(row)
        self.measured = True
        self.save()

    def update(self, **fields: Any) -> None:
        """Set fields (results so far) and save."""
        self.data.update(fields)
        self.measured = True
        self.save()

    def __enter__(self) -> Record:
        self._handler = signal.signal(signal.SIGTERM, _stop)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        signal.signal(signal.SIGTERM, self._handler)
        if error is None:
            self.data["complete"] = self.measured = True
        else:
            self.data["error"] = ("stopped by SIGTERM" if isinstance(error, Stopped)
                                  else f"{kind.__name__}: {error}" if str(error) else kind.__name__)
        self.save()
        if self.table is not None:
            self.table(self.data)
        print(json.dumps(self.data), flush=True)
        if error is not None:
            print(f"{Path(sys.argv[0]).name}: stopped before the end ({self.data['error']}); the parts it finished "
                  "are above" + (f" and in {self.json_path}" if self.json_path else ""), file=sys.stderr, flush=True)
