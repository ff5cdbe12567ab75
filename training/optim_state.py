"""Optimizer state in checkpoints keyed by parameter name, so that it moves between strategies.

torch's `Optimizer.state_dict()` numbers the parameters in the order of its param groups (quietdepth's
AdamW: the matrices, then the vectors), while Lightning numbers an FSDP full checkpoint's parameters in
`named_parameters()` order and reads numbered state back in that order. Between the two, moments land on
the wrong parameters (or fail on a shape). Keyed by name, the state reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _numbered(state: dict[str, Any]) -> bool:
    return any(isinstance(p, int) for group in state.get("param_groups", []) for p in group["params"])


def by_name(state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """`state` (an optimizer state_dict numbering parameter `names[i]` as i) keyed by parameter name; a
    state already keyed by name, or empty, as it is."""
    if not _numbered(state):
        return state
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def by_number(state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The inverse of `by_name`: `state` keyed by parameter name, numbered so that `names[i]` is i (a state
    already numbered, as written before checkpoints were keyed by name, as it is)."""
    if _numbered(state) or not state.get("param_groups"):
        return state
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({p for g in state["param_groups"] for p in g["params"]} - index.keys())
    if unknown:
        raise ValueError(f"the checkpoint's optimizer state holds parameters this model lacks: {unknown[:5]}")
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}
