"""What one evaluation produces: metrics with standard errors, counts, timings and provenance."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Metric:
    """One aggregated metric of a task: its value and standard error under one filter."""

    filter: str
    """lm-eval's filter name: `none`, or GSM8K's `strict-match` / `flexible-extract`."""
    name: str
    value: float
    stderr: float


@dataclass
class TaskResult:
    """One task under one decoding variant for one model."""

    task: str
    version: str
    n_shot: int
    decoding: str
    metrics: list[Metric]
    n: int
    prompts_hash: str
    """sha256 (first 16 hex digits) of the prompts in order: equal hashes, equal inputs."""
    seconds: float
    generated_tokens: int = 0
    scored_tokens: int = 0
    """Tokens read by log-likelihood scoring (prefix-shared contexts counted once)."""
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second for a generative task, scored tokens per second otherwise."""
        return (self.generated_tokens or self.scored_tokens) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        values = asdict(self)
        values["tokens_per_s"] = self.tokens_per_s
        if not samples:
            values.pop("samples")
        return values


def prompts_hash(prompts: list[str]) -> str:
    """sha256 (first 16 hex digits) of the prompts in order: equal hashes, equal inputs."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(p.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


class _Clock:
    seconds: float = 0.0


@contextmanager
def timed() -> Iterator[_Clock]:
    """Wall time of the block, in `.seconds` once it ends."""
    clock, start = _Clock(), time.perf_counter()
    try:
        yield clock
    finally:
        clock.seconds = time.perf_counter() - start


def git_commit() -> str:
    """The commit of the code that ran (with `-dirty` for uncommitted changes), or `unknown`."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
