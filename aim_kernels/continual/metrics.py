"""AP, AF and novel accuracy of DESIGN.md 4 (the VQACL protocol), in percent."""
from __future__ import annotations

import math


def average_performance(R) -> float:
    """AP = mean_j R[T-1][j]."""
    last = R[-1]
    return sum(last) / len(last)


def forgetting(R) -> list[float]:
    """f_j = max_{j<=i<T-1} R[i][j] - R[T-1][j] for every j < T-1."""
    T = len(R)
    return [max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)]


def average_forgetting(R) -> float:
    """AF = mean_{j<T-1} f_j (0 for a single task)."""
    f = forgetting(R)
    return sum(f) / len(f) if f else 0.0


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = list(values)
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
