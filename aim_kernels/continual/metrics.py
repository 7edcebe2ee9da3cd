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


# ---- MCITlib's convention (DESIGN.md 4) ----------------------------------------------
def last_average(R) -> float:
    """Last = mean of R[T-1] (MCITlib); the same number as AP, named as MCITlib names it."""
    return average_performance(R)


def backward_transfer(R) -> float:
    """BWT = mean_{j<T-1} (R[T-1][j] - R[j][j]); negative = forgotten (0 for one task).
    Unlike AF it compares with the accuracy right after training task j, not the best one."""
    T = len(R)
    if T < 2:
        return 0.0
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


# ---- was each task learnt? -------------------------------------------------------------
LEARNT_FRACTION = 0.2   # of the way from chance to 100%


def chance_level(n_candidates: int, majority_share: float = 0.0) -> float:
    """Chance accuracy in percent: the better of a uniform guess over the candidates and
    always answering the test split's most frequent answer (``majority_share`` in [0, 1])."""
    return 100.0 * max(1.0 / max(n_candidates, 1), majority_share)


def learnt_threshold(chance: float) -> float:
    """Accuracy a task must reach to count as learnt: ``LEARNT_FRACTION`` of the way from
    chance to 100% (chance 16.7% -> 33.3%, chance 50% -> 60%), so a task left at chance
    plus test-split noise (a few points at 300 examples) is never called learnt."""
    return chance + LEARNT_FRACTION * (100.0 - chance)


def unlearnt_tasks(R, order, chance: dict[str, float]) -> list[dict]:
    """The tasks whose accuracy right after their own training (R[j][j]; for a one-row R,
    joint's, R[0][j]) stays below :func:`learnt_threshold`."""
    out = []
    for j, task in enumerate(order):
        acc = R[min(j, len(R) - 1)][j]
        if acc < learnt_threshold(chance[task]):
            out.append({"task": task, "acc": round(float(acc), 2), "chance": round(chance[task], 2),
                        "threshold": round(learnt_threshold(chance[task]), 2)})
    return out


# ---- paired differences against a baseline -----------------------------------------------
# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (no scipy needed).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df   # within 0.002 of the exact value


def paired_difference(values, baseline) -> dict:
    """Mean of ``values[k] - baseline[k]`` (paired by seed x order) with its 95% t-interval.
    One pair has no interval (``low``/``high`` None) and is never called significant."""
    if len(values) != len(baseline) or not values:
        raise ValueError(f"paired_difference needs equally many values and baselines, got "
                         f"{len(values)} and {len(baseline)}")
    d = [float(a) - float(b) for a, b in zip(values, baseline)]
    m, s = mean_std(d)
    out = {"mean": round(m, 3), "n": len(d), "low": None, "high": None, "significant": False}
    if len(d) > 1:
        half = t975(len(d) - 1) * s / math.sqrt(len(d))
        out.update(low=round(m - half, 3), high=round(m + half, 3),
                   significant=bool(m - half > 0 or m + half < 0))
    return out
