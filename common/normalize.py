"""Normalisation statistics: the `norm_stats.json` file and a streaming, mergeable accumulator.

File schema (openpi's, so openpi tooling reads ours and the reverse)::

    {"norm_stats": {"<key>": {"mean": [...], "std": [...], "q01": [...], "q99": [...]}}}

`RunningStats` sees the data once, chunk by chunk, never holding it whole, and
two accumulators fed with different chunks (or by different workers) `merge`
into the accumulator of their union. Its quantiles are the quantiles of the
whole data set, not an average of per-chunk quantiles (the mistake behind
openpi #504 / LeRobot #3804: the average of per-episode q01s is not the q01 of
the data).

How the quantiles work, and how wrong they can be
-------------------------------------------------
Each value is put in a bucket of a fixed, data-independent grid: its float64
sign, exponent and top `m` mantissa bits. Counts per bucket are exact integers,
so adding chunks or merging workers in any order gives the same counts; no
re-binning when the range grows (openpi's fixed-bin histograms smear counts
each time they re-bin, and one outlier stretches every bin). A quantile is
located in its bucket exactly and interpolated inside it, so::

    |estimate - numpy.quantile| <= 2**-m * max(|x_lo|, |x_hi|)

where x_lo, x_hi are the two order statistics numpy interpolates between: a
relative error of 2**-m (m = 16: 1.5e-5), whatever the outliers or the spread
between chunks. To bound memory, a dimension whose bucket count exceeds
`max_buckets` drops one mantissa bit at a time (m - 1 merges bucket pairs);
`resolution()` reports the final 2**-m per dimension. The final m depends only
on the data as a whole (it is the largest m whose bucket count fits), so merge
order never changes the result. Mean and standard deviation are float64 with
Chan et al.'s pairwise update, stable for data far from zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

NORM_STATS_FILE = "norm_stats.json"
COMPUTE_COMMAND = "python scripts/compute_norm_stats.py {preset}"


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one data key (e.g. "state", "actions")."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    """1st percentile; None only in files written without quantiles (quantile mode then refuses them)."""
    q99: np.ndarray | None = None
    """99th percentile."""

    def to_json(self) -> dict[str, list[float]]:
        out = {"mean": _to_list(self.mean), "std": _to_list(self.std)}
        if self.q01 is not None:
            out["q01"] = _to_list(self.q01)
        if self.q99 is not None:
            out["q99"] = _to_list(self.q99)
        return out


def _to_list(x: np.ndarray) -> list[float]:
    return np.asarray(x, dtype=np.float64).tolist()


def missing_stats_message(path: os.PathLike | str, preset: str | None = None) -> str:
    command = COMPUTE_COMMAND.format(preset=preset or "<preset>")
    return (f"Norm stats not found at {path}. Compute them first: `{command}` "
            f"(it writes {path}).")


def save(path: os.PathLike | str, stats: Mapping[str, NormStats]) -> pathlib.Path:
    """Writes `{"norm_stats": {...}}` atomically (temp file + rename); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"norm_stats": {key: value.to_json() for key, value in stats.items()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def load(path: os.PathLike | str, *, preset: str | None = None) -> dict[str, NormStats]:
    """Reads a norm_stats.json; a missing file names the command that writes it."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / NORM_STATS_FILE
    if not path.exists():
        raise FileNotFoundError(missing_stats_message(path, preset))
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    return from_json(payload, source=str(path))


def from_json(payload: Any, *, source: str = "norm stats") -> dict[str, NormStats]:
    if not isinstance(payload, dict) or not isinstance(payload.get("norm_stats"), dict):
        raise ValueError(f"{source}: expected {{\"norm_stats\": {{key: {{mean, std, q01, q99}}}}}} "
                         f"at the top level.")
    result = {}
    for key, entry in payload["norm_stats"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: norm_stats[{key!r}] must be an object with mean/std/q01/q99.")
        fields = {}
        for name in ("mean", "std", "q01", "q99"):
            value = entry.get(name)
            if value is None:
                if name in ("mean", "std"):
                    raise ValueError(f"{source}: norm_stats[{key!r}] has no {name!r}.")
                fields[name] = None
                continue
            try:
                array = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: norm_stats[{key!r}][{name!r}] is not a list of "
                                 f"numbers.") from None
            if array.ndim != 1:
                raise ValueError(f"{source}: norm_stats[{key!r}][{name!r}] must be a flat list, "
                                 f"got shape {array.shape}.")
            fields[name] = array
        sizes = {name: value.shape[0] for name, value in fields.items() if value is not None}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{source}: norm_stats[{key!r}] fields differ in length: {sizes}.")
        result[key] = NormStats(**fields)
    return result


# --- the streaming accumulator -----------------------------------------------------

_MANTISSA = 52  # float64 mantissa bits
_DIM_SHIFT = 42  # keys are (dim << 42) | bucket; a bucket has 12 + m <= 41 bits
_MAX_MANTISSA_BITS = 29


def _ordered_bits(x: np.ndarray) -> np.ndarray:
    """Maps float64 to uint64 so that integer order is float order (-0.0 sorts just below +0.0)."""
    bits = np.ascontiguousarray(x, dtype=np.float64).view(np.uint64)
    negative = (bits >> np.uint64(63)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def _from_ordered_bits(key: np.ndarray) -> np.ndarray:
    key = np.asarray(key, dtype=np.uint64)
    positive = key >= np.uint64(1 << 63)
    bits = np.where(positive, key & np.uint64((1 << 63) - 1), ~key)
    return bits.view(np.float64)


class RunningStats:
    """Streaming mean/std/min/max/quantiles per dimension of a `(..., D)` array.

    `update(batch)` adds a chunk; `merge(other)` adds another accumulator (a
    different worker or shard); `get_statistics()` returns `NormStats`. See the
    module docstring for the quantile error bound (`resolution()` per dim).
    """

    def __init__(self, *, mantissa_bits: int = 16, max_buckets: int = 1 << 16,
                 fold_size: int = 1 << 20):
        if not 0 <= mantissa_bits <= _MAX_MANTISSA_BITS:
            raise ValueError(f"mantissa_bits must be in [0, {_MAX_MANTISSA_BITS}], got {mantissa_bits}.")
        if max_buckets < 2:
            raise ValueError(f"max_buckets must be >= 2, got {max_buckets}.")
        self._initial_bits = mantissa_bits
        self._max_buckets = max_buckets
        self._fold_size = fold_size
        self._dim: int | None = None
        self._count = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None
        self._min: np.ndarray | None = None
        self._max: np.ndarray | None = None
        self._bits: np.ndarray | None = None  # mantissa bits kept, per dim
        self._keys = np.zeros(0, np.uint64)  # sorted unique (dim << 42) | bucket
        self._counts = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    # -- feeding ----------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    def _init_dims(self, dim: int) -> None:
        self._dim = dim
        self._mean = np.zeros(dim)
        self._m2 = np.zeros(dim)
        self._min = np.full(dim, np.inf)
        self._max = np.full(dim, -np.inf)
        self._bits = np.full(dim, self._initial_bits, dtype=np.int64)

    def update(self, batch: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Adds the vectors of `batch` (shape `(..., D)`); `valid` (shape `batch.shape[:-1]`)
        selects which ones count, e.g. `~actions_is_pad`."""
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim == 0:
            raise ValueError("RunningStats.update expects an array of shape (..., D), got a scalar.")
        if valid is not None:
            batch = batch[np.broadcast_to(np.asarray(valid, bool), batch.shape[:-1])]
        batch = batch.reshape(-1, batch.shape[-1])
        if self._dim is None:
            self._init_dims(batch.shape[1])
        elif batch.shape[1] != self._dim:
            raise ValueError(f"RunningStats: got vectors of {batch.shape[1]} dims after {self._dim}.")
        if batch.shape[0] == 0:
            return
        if not np.isfinite(batch).all():
            raise ValueError("RunningStats: the data contains NaN or inf; norm stats would be NaN.")
        n = batch.shape[0]
        mean = batch.mean(axis=0)
        m2 = ((batch - mean) ** 2).sum(axis=0)
        self._combine_moments(n, mean, m2)
        self._min = np.minimum(self._min, batch.min(axis=0))
        self._max = np.maximum(self._max, batch.max(axis=0))
        shifts = (_MANTISSA - self._bits).astype(np.uint64)
        buckets = _ordered_bits(batch) >> shifts
        dims = np.arange(self._dim, dtype=np.uint64) << np.uint64(_DIM_SHIFT)
        self._pending.append((buckets | dims).ravel())
        self._pending_size += buckets.size
        if self._pending_size >= max(self._fold_size, self._keys.size):
            self._fold()

    def _combine_moments(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self._count + n
        delta = mean - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta ** 2 * (self._count * n / total)
        self._count = total

    def _fold(self) -> None:
        """Moves pending bucket keys into the sorted (keys, counts) state."""
        if not self._pending:
            return
        keys, counts = np.unique(np.concatenate(self._pending), return_counts=True)
        self._pending, self._pending_size = [], 0
        self._keys, self._counts = _add_sorted(self._keys, self._counts, keys, counts)
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        while True:
            dims = (self._keys >> np.uint64(_DIM_SHIFT)).astype(np.int64)
            occupancy = np.bincount(dims, minlength=self._dim)
            over = occupancy > self._max_buckets
            if not over.any():
                return
            self._coarsen(np.where(over, self._bits - 1, self._bits))

    def _coarsen(self, bits: np.ndarray) -> None:
        """Lowers the mantissa bits per dim to `bits` (<= current), merging buckets."""
        if np.any(bits < 0):
            raise ValueError("RunningStats: max_buckets too small even at the coarsest grid.")
        drop = self._bits - bits
        if not drop.any():
            return
        dims = self._keys >> np.uint64(_DIM_SHIFT)
        buckets = self._keys & np.uint64((1 << _DIM_SHIFT) - 1)
        buckets = buckets >> drop[dims.astype(np.int64)].astype(np.uint64)
        keys = (dims << np.uint64(_DIM_SHIFT)) | buckets
        # Coarsening keeps the order, so equal keys are adjacent: sum runs.
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self._keys = keys[starts]
        self._counts = np.add.reduceat(self._counts, starts)
        self._bits = bits.copy()

    def merge(self, other: RunningStats) -> RunningStats:
        """Adds `other`'s data to this accumulator (in place; returns self)."""
        if other._dim is None:
            return self
        if self._dim is None:
            self._init_dims(other._dim)
        elif other._dim != self._dim:
            raise ValueError(f"RunningStats.merge: {other._dim} dims vs {self._dim}.")
        self._fold()
        other._fold()
        self._combine_moments(other._count, other._mean, other._m2)
        self._min = np.minimum(self._min, other._min)
        self._max = np.maximum(self._max, other._max)
        bits = np.minimum(self._bits, other._bits)
        self._coarsen(bits)
        theirs = other._copy_state()
        theirs._coarsen(bits)
        self._keys, self._counts = _add_sorted(self._keys, self._counts, theirs._keys, theirs._counts)
        self._enforce_cap()
        return self

    def _copy_state(self) -> RunningStats:
        copy = RunningStats(mantissa_bits=self._initial_bits, max_buckets=self._max_buckets)
        copy._dim, copy._bits = self._dim, self._bits.copy()
        copy._keys, copy._counts = self._keys.copy(), self._counts.copy()
        return copy

    # -- reading ----------------------------------------------------------------

    def resolution(self) -> np.ndarray:
        """Relative quantile error bound per dim: 2**-m for the mantissa bits m kept."""
        self._fold()
        return 2.0 ** -self._bits.astype(np.float64)

    def quantiles(self, qs: np.ndarray | list[float]) -> np.ndarray:
        """Quantiles `qs` (in [0, 1]) per dim, numpy's default ("linear") definition; shape (len(qs), D)."""
        self._require_data()
        self._fold()
        qs = np.asarray(qs, dtype=np.float64)
        if np.any((qs < 0) | (qs > 1)):
            raise ValueError(f"quantiles must be in [0, 1], got {qs}.")
        dims = (self._keys >> np.uint64(_DIM_SHIFT)).astype(np.int64)
        bounds = np.searchsorted(dims, np.arange(self._dim + 1))
        out = np.empty((qs.size, self._dim))
        for d in range(self._dim):
            lo, hi = bounds[d], bounds[d + 1]
            out[:, d] = self._dim_quantiles(qs, self._keys[lo:hi], self._counts[lo:hi], d)
        return out

    def _dim_quantiles(self, qs: np.ndarray, keys: np.ndarray, counts: np.ndarray, d: int) -> np.ndarray:
        shift = np.uint64(_MANTISSA - self._bits[d])
        buckets = keys & np.uint64((1 << _DIM_SHIFT) - 1)
        lower = _from_ordered_bits(buckets << shift)
        upper = _from_ordered_bits((buckets + np.uint64(1)) << shift)
        cumulative = np.cumsum(counts)
        position = (self._count - 1) * qs
        below, above = np.floor(position), np.ceil(position)

        def order_statistic(rank: np.ndarray) -> np.ndarray:
            # The rank-th smallest value (0-based) lies in the first bucket whose cumulative
            # count exceeds rank; place it evenly among that bucket's samples.
            j = np.searchsorted(cumulative, rank, side="right")
            before = np.where(j > 0, cumulative[np.maximum(j - 1, 0)], 0)
            fraction = (rank - before + 0.5) / counts[j]
            value = lower[j] + fraction * (upper[j] - lower[j])
            value = np.where(rank == 0, self._min[d], value)  # the extremes are known exactly
            value = np.where(rank == self._count - 1, self._max[d], value)
            return np.clip(value, self._min[d], self._max[d])

        x_below, x_above = order_statistic(below), order_statistic(above)
        return x_below + (position - below) * (x_above - x_below)

    def _require_data(self) -> None:
        if self._count == 0:
            raise ValueError("RunningStats: no data was added; cannot compute statistics.")

    def get_statistics(self) -> NormStats:
        """mean, population std, q01 and q99 of everything added so far."""
        self._require_data()
        q01, q99 = self.quantiles([0.01, 0.99])
        return NormStats(mean=self._mean.copy(), std=np.sqrt(self._m2 / self._count),
                         q01=q01, q99=q99)

    @property
    def min(self) -> np.ndarray:
        self._require_data()
        return self._min.copy()

    @property
    def max(self) -> np.ndarray:
        self._require_data()
        return self._max.copy()


def _add_sorted(keys_a: np.ndarray, counts_a: np.ndarray, keys_b: np.ndarray,
                counts_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of two sorted unique key arrays with their counts summed."""
    if keys_a.size == 0:
        return keys_b, counts_b
    if keys_b.size == 0:
        return keys_a, counts_a
    keys = np.concatenate([keys_a, keys_b])
    counts = np.concatenate([counts_a, counts_b])
    order = np.argsort(keys, kind="stable")  # two sorted runs: timsort merges them in O(n)
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts, starts)
