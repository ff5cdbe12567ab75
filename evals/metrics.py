"""Aggregate metrics as lm-evaluation-harness reports them: the mean and its standard error."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean of per-item scores and its standard error (sample std, ddof=1, over sqrt(n))."""
    n = len(values)
    if n == 0:
        raise ValueError("no scores to aggregate")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
