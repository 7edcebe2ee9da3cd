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


def test_mcitlib_last_and_bwt():
    R = [[90, 10, 0],
         [60, 80, 5],
         [70, 50, 95]]
    assert metrics.last_average(R) == metrics.average_performance(R)
    # BWT = ((70 - 90) + (50 - 80)) / 2 -- against R[j][j], not the best row as AF
    assert metrics.backward_transfer(R) == -25
    assert metrics.backward_transfer([[40, 0], [40, 0], [90, 90]][1:]) == 50.0
    assert metrics.backward_transfer([[80]]) == 0.0


def test_chance_and_learnt_threshold():
    assert metrics.chance_level(6) == pytest.approx(100 / 6)
    assert metrics.chance_level(4, majority_share=0.4) == 40.0        # skewed test split
    assert metrics.learnt_threshold(50.0) == 60.0
    R = [[19.7, 0], [10, 80]]
    flagged = metrics.unlearnt_tasks(R, ["colour", "count"], {"colour": 100 / 6, "count": 25.0})
    assert [u["task"] for u in flagged] == ["colour"] and flagged[0]["acc"] == 19.7
    # joint's one-row R is checked on that row
    assert [u["task"] for u in metrics.unlearnt_tasks([[90, 30]], ["a", "b"], {"a": 50, "b": 50})] == ["b"]


def test_paired_difference_interval_and_significance():
    d = metrics.paired_difference([12, 11, 13], [10, 10, 10])
    # mean 2, sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732 = 2.48 > 2
    assert d["mean"] == 2 and d["n"] == 3
    assert d["low"] == pytest.approx(2 - 4.303 / 3 ** 0.5, abs=1e-3)
    assert d["high"] == pytest.approx(2 + 4.303 / 3 ** 0.5, abs=1e-3) and not d["significant"]
    tight = metrics.paired_difference([12, 12.5, 11.5], [10, 10, 10])      # half-width 1.24
    assert tight["low"] > 0 and tight["significant"]
    worse = metrics.paired_difference([8, 7.5, 8.5], [10, 10, 10])
    assert worse["high"] < 0 and worse["significant"]
    one = metrics.paired_difference([15], [10])
    assert one["low"] is None and not one["significant"]
    assert metrics.t975(10) == 2.228 and abs(metrics.t975(60) - 2.000) < 3e-3
    with pytest.raises(ValueError, match="equally many"):
        metrics.paired_difference([1, 2], [1])
