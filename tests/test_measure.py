"""tokctl.measure: one quantile definition, paired speed figures, interleaved order."""

import statistics

import numpy as np
import pytest

from tokctl import measure


def test_one_quantile_definition():
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    q25, med, q75 = measure.quantiles(xs)
    assert (q25, med, q75) == pytest.approx(tuple(np.quantile(xs, [0.25, 0.5, 0.75])))
    inclusive = statistics.quantiles(xs, n=4, method="inclusive")
    assert (q25, q75) == pytest.approx((inclusive[0], inclusive[2]))
    assert measure.quantiles([2.0]) == (2.0, 2.0, 2.0)
    assert measure.quantiles([]) == (None, None, None)


def test_speed_figures_from_paired_times():
    base, method = [2.0, 4.0, 3.0], [1.0, 1.0, 3.0]
    figures = measure.compare(base, method)
    assert set(figures) == set(measure.SPEEDUP_KEYS)
    assert figures["speedup"] == pytest.approx(9.0 / 5.0)  # from the totals
    assert figures["speedup_median"] == pytest.approx(2.0)  # per-item ratios 2, 4, 1
    assert figures["speedup_q25"] == pytest.approx(1.5) and figures["speedup_q75"] == pytest.approx(3.0)
    # work-weighted: the method made twice the tokens in the same time
    assert measure.compare([1.0], [1.0], [10], [20])["speedup"] == pytest.approx(2.0)
    assert measure.ratio(1.0, 0.0) is None
    with pytest.raises(ValueError):
        measure.compare([1.0], [1.0, 2.0])


def test_order_rotates_and_warm_up_is_not_timed():
    assert measure.rotated("ab", 0) == ["a", "b"] and measure.rotated("ab", 1) == ["b", "a"]
    assert measure.rotated("abc", 4) == ["b", "c", "a"]
    calls, after = [], []
    times = measure.round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                rounds=3, warmup=1, after=after.append)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # each goes first equally often
    assert after == calls  # the untimed hook runs right after each call
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    out = measure.interleaved({"x": lambda: 7}, 0)
    assert out["x"][1] == 7 and out["x"][0] >= 0
