"""Norm stats: the JSON file, and RunningStats against numpy on hard data (outliers, disjoint chunks).

Tolerance of the quantile checks: the module's stated bound,
`resolution * max(|x_lo|, |x_hi|)`, where x_lo / x_hi are the two order
statistics numpy.quantile interpolates between (taken from the sorted data) and
`resolution` = 2**-m is what the accumulator reports for the mantissa bits it
kept. Counts are exact, so the true quantile and the estimate share a bucket of
that relative width; nothing here is a tuned constant.
"""

import itertools
import json

import numpy as np
import pytest

from common import normalize
from common.normalize import NormStats, RunningStats

QS = np.array([0.0, 0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999, 1.0])


def _feed(stats, data, chunk=997):
    for start in range(0, len(data), chunk):
        stats.update(data[start:start + chunk])
    return stats


def _assert_within_bound(stats, data, qs=QS):
    estimate = stats.quantiles(qs)
    expected = np.quantile(data, qs, axis=0)
    ordered = np.sort(data, axis=0)
    position = (len(data) - 1) * qs
    lo, hi = np.floor(position).astype(int), np.ceil(position).astype(int)
    bound = stats.resolution() * np.maximum(np.abs(ordered[lo]), np.abs(ordered[hi]))
    assert np.all(np.abs(estimate - expected) <= bound + 1e-300), (estimate - expected, bound)
    return estimate, expected


# --- the file ---------------------------------------------------------------------


def test_save_load_roundtrip_in_openpi_schema(tmp_path):
    stats = {"state": NormStats(np.array([1.0, 2.0]), np.array([0.5, 0.25]), np.array([-1.0, 0.0]),
                                np.array([3.0, 4.0])),
             "actions": NormStats(np.array([0.0]), np.array([1.0]), np.array([-2.0]), np.array([2.0]))}
    path = normalize.save(tmp_path / "assets" / "p" / "norm_stats.json", stats)
    payload = json.loads(path.read_text())
    assert payload == {"norm_stats": {
        "state": {"mean": [1.0, 2.0], "std": [0.5, 0.25], "q01": [-1.0, 0.0], "q99": [3.0, 4.0]},
        "actions": {"mean": [0.0], "std": [1.0], "q01": [-2.0], "q99": [2.0]}}}
    loaded = normalize.load(path)
    assert set(loaded) == {"state", "actions"}
    for key in stats:
        for field in ("mean", "std", "q01", "q99"):
            np.testing.assert_array_equal(getattr(loaded[key], field), getattr(stats[key], field))
    assert set(normalize.load(path.parent)) == {"state", "actions"}  # a directory finds the file
    assert not list(path.parent.glob("*.tmp"))


def test_missing_file_names_path_and_command(tmp_path):
    path = tmp_path / "assets" / "two_goal_flow" / "norm_stats.json"
    with pytest.raises(FileNotFoundError) as info:
        normalize.load(path, preset="two_goal_flow")
    message = str(info.value)
    assert str(path) in message
    assert "python scripts/compute_norm_stats.py two_goal_flow" in message


@pytest.mark.parametrize("payload, match", [
    ("not json", "not valid JSON"),
    ('{"stats": {}}', "norm_stats"),
    ('{"norm_stats": {"actions": {"mean": [0.0]}}}', r"'actions'.*'std'"),
    ('{"norm_stats": {"state": {"mean": [0.0], "std": ["a"]}}}', r"'state'.*'std'"),
    ('{"norm_stats": {"state": {"mean": [0, 1], "std": [1, 1], "q01": [0]}}}', r"'state'.*length"),
    ('{"norm_stats": {"state": [1, 2]}}', r"'state'"),
])
def test_malformed_file_names_the_problem(tmp_path, payload, match):
    path = tmp_path / "norm_stats.json"
    path.write_text(payload)
    with pytest.raises(ValueError, match=match):
        normalize.load(path)


def test_file_without_quantiles_loads_with_none(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text('{"norm_stats": {"state": {"mean": [0, 1], "std": [1, 2]}}}')
    stats = normalize.load(path)["state"]
    assert stats.q01 is None and stats.q99 is None


# --- RunningStats -------------------------------------------------------------------


def test_mean_std_match_numpy_far_from_zero():
    rng = np.random.default_rng(0)
    data = 1e6 + rng.normal(0, 1e-2, size=(20_000, 3))  # naive sum-of-squares loses all digits
    stats = _feed(RunningStats(), data).get_statistics()
    np.testing.assert_allclose(stats.mean, data.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(stats.std, data.std(axis=0), rtol=1e-8)


def test_quantiles_with_outliers():
    rng = np.random.default_rng(1)
    data = rng.standard_cauchy(size=(30_000, 2))
    data[::1000, 0] = 1e9  # a few huge outliers: fixed-range histograms lose all resolution
    data[5, 1] = -1e12
    stats = _feed(RunningStats(), data)
    _assert_within_bound(stats, data)
    np.testing.assert_array_equal(stats.quantiles([0.0, 1.0]), [data.min(0), data.max(0)])


def test_quantiles_with_very_different_chunks_are_global():
    rng = np.random.default_rng(2)
    first = rng.normal(0, 1, size=(40_000, 2))
    second = rng.normal(100, 0.1, size=(10_000, 2))
    data = np.concatenate([first, second])
    stats = _feed(RunningStats(), data, chunk=4096)
    estimate, expected = _assert_within_bound(stats, data)
    # Global q99 is inside the second cluster; the count-weighted mean of per-chunk q99s
    # (LeRobot's aggregation) lands in the empty gap between the clusters.
    averaged = (0.8 * np.quantile(first, 0.99, axis=0) + 0.2 * np.quantile(second, 0.99, axis=0))
    q99 = list(QS).index(0.99)
    assert np.all(np.abs(averaged - expected[q99]) > 10)
    assert np.all(np.abs(estimate[q99] - expected[q99]) < 1e-2)


def test_get_statistics_quantiles_are_q01_q99():
    rng = np.random.default_rng(3)
    data = rng.exponential(size=(5000, 4))
    stats = _feed(RunningStats(), data)
    result = stats.get_statistics()
    np.testing.assert_allclose(result.q01, stats.quantiles([0.01])[0])
    np.testing.assert_allclose(result.q99, stats.quantiles([0.99])[0])
    _assert_within_bound(stats, data, np.array([0.01, 0.99]))


def test_merge_order_invariance_and_equal_to_one_stream():
    rng = np.random.default_rng(4)
    chunks = [rng.normal(loc, scale, size=(n, 3)) for loc, scale, n in
              [(0, 1, 3000), (100, 0.1, 500), (-5, 20, 2000), (0, 1e-3, 800), (1e4, 1, 100)]]
    data = np.concatenate(chunks)
    # Small caps make the accumulators coarsen at different moments in each order.
    make = lambda: RunningStats(max_buckets=256, fold_size=1000)  # noqa: E731
    single = _feed(make(), data, chunk=700)
    results = []
    for order in itertools.permutations(range(len(chunks)), len(chunks)):
        if len(results) >= 6:
            break
        workers = []
        for i in order:
            worker = make()
            worker.update(chunks[i])
            workers.append(worker)
        # A tree of merges, not just a chain.
        left = workers[0].merge(workers[1])
        right = workers[2].merge(workers[3]).merge(workers[4])
        results.append(right.merge(left))
    reference = single.quantiles(QS)
    for merged in results:
        np.testing.assert_array_equal(merged.quantiles(QS), reference)
        np.testing.assert_array_equal(merged.resolution(), single.resolution())
        np.testing.assert_allclose(merged.get_statistics().mean, data.mean(0), rtol=1e-12)
        np.testing.assert_allclose(merged.get_statistics().std, data.std(0), rtol=1e-10)
    _assert_within_bound(single, data)


def test_memory_is_bounded_by_the_bucket_cap():
    rng = np.random.default_rng(5)
    stats = RunningStats(max_buckets=128, fold_size=5000)
    for _ in range(40):
        stats.update(rng.normal(size=(1000, 2)))
        assert stats._pending_size < 5000 + 2000  # folded once the pending keys reach fold_size
    stats.resolution()  # folds what is pending
    assert stats._keys.size <= 2 * 128  # 40,000 vectors summarised in at most 128 buckets per dim
    assert stats.resolution()[0] <= 2 ** -2


def test_coarse_grid_still_meets_its_bound():
    rng = np.random.default_rng(6)
    data = rng.lognormal(0, 2, size=(20_000, 1)) * np.where(rng.uniform(size=(20_000, 1)) < 0.5, -1, 1)
    stats = _feed(RunningStats(max_buckets=64), data)
    assert stats.resolution()[0] >= 2 ** -6  # coarsened
    _assert_within_bound(stats, data)


def test_valid_mask_excludes_padded_steps():
    actions = np.arange(24, dtype=float).reshape(2, 4, 3)
    is_pad = np.array([[False, False, True, True], [False, True, True, True]])
    stats = RunningStats()
    stats.update(actions, ~is_pad)
    kept = actions[~is_pad]
    np.testing.assert_allclose(stats.get_statistics().mean, kept.mean(0))
    assert stats.count == 3


def test_errors_name_the_problem():
    stats = RunningStats()
    with pytest.raises(ValueError, match="no data"):
        stats.get_statistics()
    stats.update(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 dims after 2"):
        stats.update(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.array([[0.0, np.nan]]))
    other = RunningStats()
    other.update(np.zeros((2, 1)))
    with pytest.raises(ValueError, match="merge: 1 dims vs 2"):
        stats.merge(other)


def test_constant_and_single_value_data():
    stats = RunningStats()
    stats.update(np.full((10, 2), 3.5))
    result = stats.get_statistics()
    np.testing.assert_array_equal(result.q01, [3.5, 3.5])
    np.testing.assert_array_equal(result.std, [0.0, 0.0])
