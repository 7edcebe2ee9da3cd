"""AP / AF / novel of DESIGN.md 4 on hand-made accuracy matrices."""
from __future__ import annotations

import pytest

from aim_kernels.continual import metrics


def test_ap_af_on_a_hand_made_matrix():
    R = [[90, 10, 0],
         [60, 80, 5],
         [70, 50, 95]]
    assert metrics.average_performance(R) == pytest.approx((70 + 50 + 95) / 3)
    # task 0: max(90, 60) - 70 = 20; task 1: max(80) - 50 = 30
    assert metrics.forgetting(R) == [20, 30]
    assert metrics.average_forgetting(R) == 25


def test_no_forgetting_and_negative_forgetting():
    assert metrics.average_forgetting([[50, 0], [50, 90]]) == 0
    assert metrics.average_forgetting([[50, 0], [70, 90]]) == -20     # backward transfer
    assert metrics.average_forgetting([[80]]) == 0.0


def test_mean_std():
    assert metrics.mean_std([1.0]) == (1.0, 0.0)
    m, s = metrics.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
