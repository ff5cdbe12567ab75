"""What one evaluation produces: metrics with standard errors, counts, timings and provenance."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
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
    """The commit of the code that ran: its git checkout's (with `-dirty` for uncommitted changes); for an
    installed copy, the commit pip recorded installing it from git, else `quietdepth==<version>`; else `unknown`."""
    return _checkout_commit() or _installed_commit() or "unknown"


def _checkout_commit() -> str | None:
    """HEAD of the git checkout that tracks this code (`-dirty` for uncommitted changes under its folder); None if
    none does (an installed copy, even in a site-packages inside some other project's checkout)."""
    here = Path(__file__).resolve()
    repo = here.parents[1]
    try:
        git = {"cwd": repo, "capture_output": True, "text": True, "check": True}
        subprocess.run(["git", "ls-files", "--error-unmatch", "--", str(here.relative_to(repo))], **git)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], **git)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _installed_commit() -> str | None:
    """For code pip installed (the quietdepth distribution whose files these are): the git commit it was
    installed from (direct_url.json, PEP 610), else its version; None for code no distribution holds."""
    try:
        dist = importlib.metadata.distribution("quietdepth")
    except importlib.metadata.PackageNotFoundError:
        return None
    if Path(dist.locate_file("evals/results.py")).resolve() != Path(__file__).resolve():
        return None
    commit = json.loads(dist.read_text("direct_url.json") or "{}").get("vcs_info", {}).get("commit_id")
    return commit or f"quietdepth=={dist.version}"
