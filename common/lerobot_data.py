"""LeRobot datasets as numpy batches: the data config, the dataset adapter and resumable batching.

Datasets are read through the released `lerobot` package (`LeRobotDataset`, format
v3.0 as written by lerobot 0.4.x), never by parsing its files ourselves: a local
`root`, or a hub `repo_id` when the machine is online. `delta_timestamps` come
from the policy's action horizon and the dataset's fps, so each sample carries
an action chunk `[t, t + 1/fps, ..., t + (H-1)/fps]` with lerobot's `*_is_pad`
mask for steps past the episode end.

`lerobot` and `torch` are imported inside the functions that need them: `common`
must import neither framework at module level (lerobot imports torch), so the
JAX backend and the policy server load without them.

Batches come from a seeded shuffle whose position (seed, epoch, index in the
epoch's permutation) is a small dict (`state_dict()`), saved in `train_state`:
restoring it continues at the same sample. `BatchIterator` yields numpy batches
(the JAX backend places them on devices through its `device_put` hook);
`make_torch_loader` wraps the same order in a `torch.utils.data.DataLoader`.
Both record how long the consumer waited for data (`data_wait_s`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import queue
import sys
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from common import normalize as normalize_lib
from common import transforms as transforms_lib
from common.config import ConfigError

logger = logging.getLogger("vibe_rl")

SUPPORTED_LEROBOT = "lerobot 0.4.x (dataset format v3.0)"
SUPPORTED_CODEBASE_VERSION = "v3.0"
INSTALL_HINT = ("pip install -e '.[data]' && pip install --no-deps lerobot==0.4.4 "
                "(see README, 'Install': lerobot pins an older torch, hence --no-deps)")
NORM_KEYS = ("state", "actions")
"""Keys of the repacked sample that get norm stats (and are normalised)."""
OUTPUT_NORM_KEYS = ("actions",)
"""Keys of the model output that are unnormalised."""


class DatasetError(ValueError):
    """The dataset cannot be used as configured; the message names the key or layout."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the demonstrations are and how they become batches (embedded in imitation TrainConfigs)."""

    repo_id: str = "local/demos"
    """LeRobot dataset id; downloaded from the hub when `root` is empty and the machine is online."""
    root: str | None = None
    """Local dataset directory (what scripts/collect_demos.py writes); read offline."""
    state_key: str = "observation.state"
    """Dataset feature used as the policy's proprioceptive state."""
    action_key: str = "action"
    """Dataset feature used as the action."""
    image_keys: tuple[str, ...] = ()
    """Image features (dtype 'image'); each appears as images/<last dotted part> after repacking."""
    action_horizon: int = 8
    """Actions per chunk H: the sample at t holds actions t .. t+H-1 (delta_timestamps k/fps)."""
    use_norm_stats: bool = True
    """Normalise state and actions with the dataset's norm stats (norm_stats.json)."""
    use_quantile_norm: bool = False
    """Quantile normalisation (q01/q99 -> -1/1) instead of z-score."""
    norm_stats_path: str | None = None
    """Where norm_stats.json is; empty: <assets_dir>/<preset>/norm_stats.json."""
    assets_dir: str = "assets"
    """Root of per-preset assets (norm stats) written by scripts/compute_norm_stats.py."""
    batch_size: int = 64
    """Samples per training step over all processes (the global batch; each JAX process or torchrun
    rank loads its slice of it, so it must divide by their number)."""
    seed: int = 0
    """Seed of the shuffle order (the order is a pure function of seed and epoch)."""
    shuffle: bool = True
    """Shuffle each epoch; off: dataset order."""
    num_workers: int = 0
    """Torch DataLoader worker processes (0: load in the main process)."""
    prefetch: int = 2
    """Batches the numpy iterator prepares ahead in a background thread (0: none)."""

    def __post_init__(self) -> None:
        for name in ("action_horizon", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--data.{name.replace('_', '-')} must be positive, "
                                  f"got {getattr(self, name)!r}.")
        for name in ("num_workers", "prefetch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--data.{name.replace('_', '-')} must be >= 0, "
                                  f"got {getattr(self, name)!r}.")
        if not self.root and not self.repo_id:
            raise ConfigError("--data.root or --data.repo-id must name a dataset.")


def image_name(key: str) -> str:
    """`observation.images.top` -> `top`: the name of an image after repacking."""
    return key.rsplit(".", 1)[-1]


def norm_stats_path(config: DataConfig, preset: str) -> pathlib.Path:
    """Where compute_norm_stats.py writes and training reads the stats of `preset`."""
    if config.norm_stats_path:
        return pathlib.Path(config.norm_stats_path)
    return pathlib.Path(config.assets_dir) / preset / normalize_lib.NORM_STATS_FILE


def load_norm_stats(config: DataConfig, preset: str) -> dict[str, normalize_lib.NormStats]:
    """The preset's stats; missing is an error naming the path and the command that writes it."""
    return normalize_lib.load(norm_stats_path(config, preset), preset=preset)


def repack_structure(config: DataConfig) -> dict[str, Any]:
    """LeRobot keys -> the names the policy sees (state, actions, actions_is_pad, images/<name>)."""
    structure: dict[str, Any] = {
        "state": config.state_key,
        "actions": config.action_key,
        "actions_is_pad": f"{config.action_key}_is_pad",
    }
    if config.image_keys:
        names = [image_name(key) for key in config.image_keys]
        if len(set(names)) != len(names):
            raise ConfigError(f"--data.image-keys {config.image_keys} give duplicate image names "
                              f"{names}; the last dotted part of each key must differ.")
        structure["images"] = dict(zip(names, config.image_keys))
    return structure


def repack_transforms(config: DataConfig) -> transforms_lib.Group:
    """The data-loader-only group: dataset keys -> policy keys (the Policy gets repacked input)."""
    return transforms_lib.Group(inputs=[transforms_lib.RepackTransform(repack_structure(config))])


def norm_transforms(config: DataConfig,
                    norm_stats: Mapping[str, normalize_lib.NormStats] | None) -> transforms_lib.Group:
    """Normalize on the way in, Unnormalize on the way out (shared by training and serving).

    The output side unnormalises the actions only (the model outputs actions,
    not state); it is strict, so an output without "actions" is an error rather
    than normalised actions reaching a robot.
    """
    if not config.use_norm_stats:
        return transforms_lib.Group()
    outputs = None
    if norm_stats is not None:
        outputs = {key: value for key, value in norm_stats.items() if key in OUTPUT_NORM_KEYS}
    return transforms_lib.Group(
        inputs=[transforms_lib.Normalize(norm_stats, use_quantiles=config.use_quantile_norm)],
        outputs=[transforms_lib.Unnormalize(outputs, use_quantiles=config.use_quantile_norm)])


def action_delta_timestamps(fps: float, horizon: int) -> list[float]:
    """[0, 1/fps, ..., (horizon-1)/fps]: the timestamps of one action chunk."""
    return [k / fps for k in range(horizon)]


# --- opening a dataset ---------------------------------------------------------------


def _import_lerobot():
    """lerobot (and with it torch) only when a dataset is opened: `common` stays framework-free."""
    try:
        import lerobot
        from lerobot.datasets import lerobot_dataset
    except ImportError as error:
        raise ImportError(f"Reading LeRobot datasets needs the lerobot package ({SUPPORTED_LEROBOT}),"
                          f" which failed to import ({error}). Install it: {INSTALL_HINT}.") from error
    version = getattr(lerobot, "__version__", "unknown")
    if not version.startswith("0.4."):
        logger.warning("lerobot %s is installed; vibe-rl is tested with %s.", version,
                       SUPPORTED_LEROBOT)
    return lerobot_dataset


class LeRobotSource:
    """A LeRobot dataset as numpy samples and batches, with action chunks and `*_is_pad` masks.

    `get_batch(indices)` is vectorised: one columnar read per key from the
    arrow table lerobot loaded (action windows included), with lerobot's
    episode-boundary rule (clamp to the episode, flag `*_is_pad`). Images come
    back `(H, W, C)` uint8 as stored; lerobot's own `__getitem__` returns them
    `(C, H, W)` float in [0, 1]. A test pins every key to `__getitem__`.
    Frame `i` is row `i` (checked when opening).
    """

    def __init__(self, dataset: Any, delta_timestamps: Mapping[str, Sequence[float]],
                 keys: Sequence[str]):
        self.dataset = dataset
        meta = dataset.meta
        self.fps = meta.fps
        self.features = dict(meta.features)
        self.keys = tuple(keys)
        self.delta_timestamps = {k: list(v) for k, v in delta_timestamps.items()}
        self.delta_indices = {k: np.rint(np.asarray(v) * self.fps).astype(np.int64)
                              for k, v in self.delta_timestamps.items()}
        episodes = meta.episodes
        self._episode_starts = np.asarray(episodes["dataset_from_index"], dtype=np.int64)
        self._episode_ends = np.asarray(episodes["dataset_to_index"], dtype=np.int64)
        order = np.argsort(self._episode_starts)
        self._episode_starts, self._episode_ends = self._episode_starts[order], self._episode_ends[order]
        self._num_frames = int(len(dataset.hf_dataset))
        self._columns = dataset.hf_dataset.with_format("numpy")
        hf = dataset.hf_dataset
        # Rows of the arrow table are frames unless `datasets` holds a row selection.
        self._table = hf.data.table if getattr(hf, "_indices", None) is None else None
        self._current_keys = [k for k in self.keys if k not in self.delta_indices]
        self._check_layout()

    def _check_layout(self) -> None:
        if self._num_frames == 0:
            raise DatasetError(f"Dataset {self.dataset.root} has no frames.")
        expected = int(self._episode_ends.max()) if self._episode_ends.size else 0
        first_last = self._read("index", np.array([0, self._num_frames - 1]))
        if expected != self._num_frames or list(first_last) != [0, self._num_frames - 1]:
            raise DatasetError(
                f"Dataset {self.dataset.root}: frame indices do not run 0..{self._num_frames - 1} "
                f"in row order (episodes index to {expected}); this layout is not supported "
                f"({SUPPORTED_LEROBOT}).")

    def __len__(self) -> int:
        return self._num_frames

    def select(self, keys: Sequence[str]) -> LeRobotSource:
        """The same dataset reading only `keys` (e.g. no images for norm stats)."""
        delta = {k: v for k, v in self.delta_timestamps.items() if k in keys}
        return LeRobotSource(self.dataset, delta, keys)

    @property
    def num_episodes(self) -> int:
        return int(self._episode_starts.size)

    def episode_bounds(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start (inclusive) and end (exclusive) frame of the episode holding each frame."""
        episode = np.searchsorted(self._episode_starts, indices, side="right") - 1
        return self._episode_starts[episode], self._episode_ends[episode]

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Samples `indices` stacked: current-frame keys `(B, ...)`, chunked keys `(B, H, ...)`
        with `<key>_is_pad` `(B, H)`, plus `index`, `episode_index`, `frame_index`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self._num_frames):
            raise IndexError(f"Frame index out of range [0, {self._num_frames}).")
        batch = {key: self._read(key, indices)
                 for key in (*self._current_keys, "index", "episode_index", "frame_index")}
        if self.delta_indices:
            start, end = self.episode_bounds(indices)
        for key, deltas in self.delta_indices.items():
            query = indices[:, None] + deltas[None, :]
            batch[f"{key}_is_pad"] = (query < start[:, None]) | (query >= end[:, None])
            query = np.clip(query, start[:, None], end[:, None] - 1)
            values = self._read(key, query.ravel())
            batch[key] = values.reshape(*query.shape, *values.shape[1:])
        return batch

    def _read(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Column `key` at `rows` as numpy, with the feature's shape.

        Read straight from lerobot's memory-mapped arrow table (100x faster than
        `datasets` row formatting for action windows); images are the stored PNG
        bytes decoded by PIL, as `datasets` would. Shape-(1,) features, which
        lerobot stores as scalar columns, come back as (B, 1).
        """
        feature = self.features.get(key)
        if self._table is None:  # a row-selected dataset: let `datasets` map the rows
            array = _as_array(self._columns.select_columns([key])[rows.tolist()][key])
        else:
            column = self._table.column(key).take(rows)
            if feature is not None and feature["dtype"] == "image":
                array = _decode_images(column)
            else:
                array = _arrow_to_numpy(column.combine_chunks())
        if feature is None or feature["dtype"] in ("image", "video") or key in _SCALAR_COLUMNS:
            return array
        return array.reshape(array.shape[0], *feature["shape"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: value[0] for key, value in self.get_batch([index]).items()}


_SCALAR_COLUMNS = ("index", "episode_index", "frame_index", "timestamp", "task_index")


def _arrow_to_numpy(array: Any) -> np.ndarray:
    """A (possibly nested) fixed-size-list or primitive arrow array -> numpy (n, *dims)."""
    import pyarrow as pa  # a dependency of `datasets`, imported with lerobot

    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return _as_array(array.to_pylist())
    # A copy: zero-copy views of the memory-mapped table are read-only, and transforms
    # (and torch's collate) may write.
    return np.array(array.to_numpy(zero_copy_only=False), copy=True).reshape(shape)


def _decode_images(column: Any) -> np.ndarray:
    import io

    from PIL import Image

    images = []
    for item in column.to_pylist():
        if item.get("bytes") is not None:
            image = Image.open(io.BytesIO(item["bytes"]))
        else:
            image = Image.open(item["path"])
        images.append(np.asarray(image))
    return np.stack(images)


def _as_array(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object:  # variable-length rows would come back as objects
        array = np.stack([np.asarray(v) for v in value])
    return array


def _check_features(features: Mapping[str, Any], config: DataConfig, where: str) -> None:
    wanted = {"--data.state-key": config.state_key, "--data.action-key": config.action_key}
    wanted.update({f"--data.image-keys[{i}]": key for i, key in enumerate(config.image_keys)})
    for flag, key in wanted.items():
        if key not in features:
            available = sorted(k for k in features if k not in _SCALAR_COLUMNS)
            raise DatasetError(f"{where} has no feature {key!r} ({flag}); its features are "
                               f"{available} (as read by {SUPPORTED_LEROBOT}).")
    for key in config.image_keys:
        dtype = features[key]["dtype"]
        if dtype == "video":
            raise DatasetError(
                f"{where}: feature {key!r} is stored as video, which this setup does not decode "
                f"(torchvision 0.29 has no VideoReader, torchcodec needs system FFmpeg). Record "
                f"images as dtype 'image' (scripts/collect_demos.py does).")
        if dtype != "image":
            raise DatasetError(f"{where}: --data.image-keys names {key!r}, a {dtype!r} feature, "
                               f"not an image.")
    for key in (config.state_key, config.action_key):
        dtype = features[key]["dtype"]
        if dtype in ("image", "video", "string"):
            raise DatasetError(f"{where}: {key!r} is a {dtype!r} feature; state and action must be "
                               f"numeric vectors.")


def _check_version(version: Any, where: str) -> None:
    if version != SUPPORTED_CODEBASE_VERSION:
        raise DatasetError(f"{where} is LeRobot format {version!r}; supported is "
                           f"{SUPPORTED_CODEBASE_VERSION} ({SUPPORTED_LEROBOT}). Convert it with "
                           f"lerobot's convert_dataset_v21_to_v30.")


def _check_local_dataset(root: pathlib.Path, config: DataConfig) -> None:
    """A local root must be a complete dataset: lerobot would otherwise try the hub for the
    missing files (a confusing offline error, or a download into the user's directory)."""
    info = root / "meta" / "info.json"
    if not info.exists():
        raise DatasetError(
            f"No LeRobot dataset at --data.root {root} (no meta/info.json). Write one with "
            f"`python scripts/collect_demos.py --root {root} ...`, or leave --data.root empty to "
            f"download --data.repo-id {config.repo_id!r} from the hub.")
    try:
        version = json.loads(info.read_text()).get("codebase_version")
    except (json.JSONDecodeError, AttributeError) as error:
        raise DatasetError(f"{info} is not a LeRobot info.json ({error}).") from None
    _check_version(version, str(root))
    missing = [name for name in ("meta/tasks.parquet", "meta/episodes", "data")
               if not (root / name).exists()]
    if missing:
        raise DatasetError(
            f"Dataset {root} is incomplete: {missing} missing. A recording that was never "
            f"finalized (LeRobotDataset.finalize()) has no episodes index; re-run the collection.")


def save_episode(dataset: Any) -> None:
    """`dataset.save_episode()` for features of shape (1,) under numpy >= 2.4.

    lerobot 0.4.4 validates such frames as shape-(1,) arrays but stores the
    feature as a scalar column, whose encoder calls float() on each row; numpy
    2.4 made float() of a 1-element 1-D array an error. Squeezing the buffered
    rows to 0-d just before saving stores exactly what older numpy stored.
    """
    buffer = dataset.episode_buffer
    for key, feature in dataset.features.items():
        if (key in buffer and isinstance(buffer[key], list) and key not in _SCALAR_COLUMNS
                and tuple(feature["shape"]) == (1,)
                and feature["dtype"] not in ("image", "video", "string")):
            buffer[key] = [np.asarray(value).reshape(()) for value in buffer[key]]
    with warnings.catch_warnings():
        # lerobot's per-episode stats histogram bool features and warn about it each time.
        warnings.filterwarnings("ignore", "Converting input from bool", RuntimeWarning)
        dataset.save_episode()


def open_dataset(config: DataConfig, *, action_horizon: int | None = None) -> LeRobotSource:
    """Opens the configured dataset through `LeRobotDataset` with action-chunk delta_timestamps."""
    lerobot_dataset = _import_lerobot()
    horizon = action_horizon or config.action_horizon
    root = pathlib.Path(config.root).expanduser() if config.root else None
    if root is not None:
        _check_local_dataset(root, config)
    where = str(root) if root else f"hub dataset {config.repo_id!r}"
    if root is None and os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise DatasetError(f"{where}: HF_HUB_OFFLINE is set and --data.root is empty; pass the "
                           f"local dataset directory as --data.root.")
    try:
        meta = lerobot_dataset.LeRobotDatasetMetadata(config.repo_id, root=root)
    except Exception as error:  # lerobot raises its own types for old formats and hub failures
        raise DatasetError(f"Could not read the metadata of {where} with {SUPPORTED_LEROBOT}: "
                           f"{type(error).__name__}: {error}") from error
    _check_version(meta.info.get("codebase_version"), where)
    _check_features(meta.features, config, where)
    delta = {config.action_key: action_delta_timestamps(meta.fps, horizon)}
    try:
        dataset = lerobot_dataset.LeRobotDataset(config.repo_id, root=root, delta_timestamps=delta)
    except Exception as error:
        raise DatasetError(f"Could not open {where} with {SUPPORTED_LEROBOT}: "
                           f"{type(error).__name__}: {error}") from error
    keys = [config.state_key, config.action_key, *config.image_keys]
    return LeRobotSource(dataset, delta, keys)


# --- the shuffle order and its resumable position -------------------------------------


@dataclasses.dataclass(frozen=True)
class ShuffleOrder:
    """Which samples make each batch: epoch e is a permutation seeded by (seed, e).

    With `num_shards` data-parallel processes, every process walks the same
    global batches of `batch_size * num_shards` samples and takes slice
    `shard_index` of each, so all processes share one position.
    """

    num_samples: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.num_shards}).")
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"The dataset has {self.num_samples} samples, fewer than one batch of "
                f"{self.global_batch} (--data.batch-size); lower it or collect more data.")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_shards

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch
        return math.ceil(self.num_samples / self.global_batch)

    def permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def start(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": 0, "index": 0}

    def advance(self, position: Mapping[str, int], batches: int = 1) -> dict[str, int]:
        """The position `batches` batches after `position`."""
        step = int(position["index"]) // self.global_batch + batches
        epoch = int(position["epoch"]) + step // self.batches_per_epoch
        return {"seed": self.seed, "epoch": epoch,
                "index": (step % self.batches_per_epoch) * self.global_batch}

    def indices(self, position: Mapping[str, int], permutation: np.ndarray | None = None) -> np.ndarray:
        """This process's sample indices of the batch at `position`."""
        if permutation is None:
            permutation = self.permutation(int(position["epoch"]))
        start = int(position["index"])
        batch = permutation[start:start + self.global_batch]
        per_shard = math.ceil(batch.size / self.num_shards)
        return batch[self.shard_index * per_shard:(self.shard_index + 1) * per_shard]

    def iter_positions(self, position: Mapping[str, int]) -> Iterator[tuple[dict, np.ndarray]]:
        """Endless (position after the batch, indices of the batch) from `position` on."""
        position = dict(position)
        epoch, permutation = None, None
        while True:
            if position["epoch"] != epoch:
                epoch, permutation = position["epoch"], self.permutation(position["epoch"])
            indices = self.indices(position, permutation)
            position = self.advance(position)
            yield position, indices

    def validate_state(self, state: Mapping[str, Any]) -> dict[str, int]:
        """Checks a saved position against this order; returns the position part."""
        missing = [k for k in ("seed", "epoch", "index") if k not in state]
        if missing:
            raise ValueError(f"Loader state lacks {missing}: {dict(state)}.")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Loader state was saved with seed {state['seed']}, this run uses "
                             f"{self.seed}; resume with the same --data.seed.")
        for name, mine in (("num_samples", self.num_samples), ("global_batch", self.global_batch)):
            if name in state and int(state[name]) != mine:
                raise ValueError(f"Loader state was saved with {name}={state[name]}, this run has "
                                 f"{mine}: the dataset or batch size changed, so the saved position "
                                 f"no longer names the same samples.")
        if int(state["index"]) % self.global_batch:
            raise ValueError(f"Loader state index {state['index']} is not a multiple of the global "
                             f"batch {self.global_batch}.")
        return {"seed": self.seed, "epoch": int(state["epoch"]), "index": int(state["index"])}

    def state_dict(self, position: Mapping[str, int]) -> dict[str, int]:
        return {**position, "num_samples": self.num_samples, "global_batch": self.global_batch}


# --- the numpy batch iterator (JAX backend) -------------------------------------------


Transform = Callable[[dict], dict]


class BatchIterator:
    """Endless numpy batches in `ShuffleOrder`, transformed, optionally prefetched.

    `transform` runs on whole batches (every transform in common/transforms.py
    works on leading batch dims). `device_put` is the JAX backend's hook: it
    receives the transformed numpy batch and returns what the training step
    consumes (e.g. arrays sharded along the mesh's data axis); it runs in the
    prefetch thread so the host-to-device copy overlaps the step.

    `state_dict()` is the position after the last batch handed out (not after
    the prefetched ones), so a checkpoint taken between steps resumes exactly.
    `data_wait_s` accumulates the time `next()` blocked.
    """

    def __init__(self, source: Any, order: ShuffleOrder, *, transform: Transform | None = None,
                 device_put: Callable[[dict], Any] | None = None, prefetch: int = 2):
        if len(source) != order.num_samples:
            raise ValueError(f"ShuffleOrder is for {order.num_samples} samples, the source has "
                             f"{len(source)}.")
        self.source = source
        self.order = order
        self.transform = transform
        self.device_put = device_put
        self.prefetch = prefetch
        self._position = order.start()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._positions: Iterator | None = None
        self.data_wait_s = 0.0
        self.batches = 0

    def _make(self, indices: np.ndarray) -> Any:
        batch = self.source.get_batch(indices)
        if self.transform is not None:
            batch = self.transform(batch)
        if self.device_put is not None:
            batch = self.device_put(batch)
        return batch

    def _produce(self, positions: Iterator, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for position, indices in positions:
                item = (position, self._make(indices), None)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # hand the error to the consumer
            out.put((None, None, error))

    def _start(self) -> None:
        positions = self.order.iter_positions(self._position)
        if self.prefetch <= 0:
            self._positions = positions
            return
        self._queue, self._stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(positions, self._queue, self._stop),
                                        daemon=True, name="vibe-rl-batches")
        self._thread.start()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        if self._thread is None and self._positions is None:
            self._start()
        if self._queue is not None:
            position, batch, error = self._queue.get()
            if error is not None:
                self.close()
                raise error
        else:
            position, indices = next(self._positions)
            batch = self._make(indices)
        self._position = position
        self.data_wait_s += time.perf_counter() - start
        self.batches += 1
        return batch

    def pop_data_wait(self) -> float:
        """Seconds spent waiting for data since the last call (for perf logging)."""
        wait, self.data_wait_s = self.data_wait_s, 0.0
        return wait

    def state_dict(self) -> dict[str, int]:
        """Position after the last batch returned: {seed, epoch, index, num_samples, global_batch}."""
        return self.order.state_dict(self._position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position (the next batch is the one after it)."""
        position = self.order.validate_state(state)
        self.close()
        self._position = position

    def close(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = self._queue = self._stop = self._positions = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def make_order(config: DataConfig, num_samples: int, *, shard_index: int = 0,
               num_shards: int = 1) -> ShuffleOrder:
    return ShuffleOrder(num_samples=num_samples, batch_size=config.batch_size, seed=config.seed,
                        shuffle=config.shuffle, drop_last=True, shard_index=shard_index,
                        num_shards=num_shards)


def make_batch_iterator(config: DataConfig, source: Any, *, transform: Transform | None = None,
                        device_put: Callable[[dict], Any] | None = None, shard_index: int = 0,
                        num_shards: int = 1) -> BatchIterator:
    """The JAX backend's loader: numpy batches of `config.batch_size`, shuffled by `config.seed`."""
    order = make_order(config, len(source), shard_index=shard_index, num_shards=num_shards)
    return BatchIterator(source, order, transform=transform, device_put=device_put,
                         prefetch=config.prefetch)


def iterate_once(source: Any, batch_size: int, *, transform: Transform | None = None,
                 max_samples: int | None = None, seed: int = 0) -> Iterator[dict]:
    """Every sample once in dataset order, last batch partial (for norm stats).

    With `max_samples` below the dataset size, a seeded random subset of that
    many frames (still read in order), so a cap does not just take the first
    episodes.
    """
    total = len(source)
    if max_samples is not None and max_samples < total:
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(total, size=max_samples, replace=False))
    else:
        indices = np.arange(total)
    for start in range(0, indices.size, batch_size):
        batch = source.get_batch(indices[start:start + batch_size])
        yield transform(batch) if transform is not None else batch


def compute_norm_stats(config: DataConfig, *, source: Any | None = None,
                       transform: Transform | None = None, max_frames: int | None = None,
                       batch_size: int = 256,
                       keys: Sequence[str] = NORM_KEYS) -> dict[str, normalize_lib.NormStats]:
    """Norm stats of `keys` after the repack (and `transform`), streamed batch by batch.

    Actions are counted over the action chunks the model trains on, except the
    padded steps past an episode's end (`actions_is_pad`), which repeat the
    last action and would overweight it. Images are not read (`transform`
    sees state and actions only).
    """
    source = source if source is not None else open_dataset(config)
    # Images are neither normalised nor needed here: skip decoding them.
    source = source.select([config.state_key, config.action_key])
    config = dataclasses.replace(config, image_keys=())
    pipeline = transforms_lib.compose(
        [*repack_transforms(config).inputs, *([transform] if transform is not None else [])])
    stats = {key: normalize_lib.RunningStats() for key in keys}
    for batch in iterate_once(source, batch_size, transform=pipeline, max_samples=max_frames,
                              seed=config.seed):
        flat = transforms_lib.flatten_dict(batch)
        for key in keys:
            if key not in flat:
                raise DatasetError(f"Norm stats: the transformed data has no {key!r}; it has "
                                   f"{sorted(flat)}.")
            valid = flat.get(f"{key}_is_pad")
            stats[key].update(flat[key], None if valid is None else ~np.asarray(valid, bool))
    return {key: value.get_statistics() for key, value in stats.items()}


# --- the torch DataLoader (Torch backend) ---------------------------------------------


class _BatchDataset:
    """Map-style dataset whose item is a whole batch (the sampler yields index lists)."""

    def __init__(self, source: Any, transform: Transform | None):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices: Sequence[int]) -> dict:
        batch = self.source.get_batch(np.asarray(indices))
        return self.transform(batch) if self.transform is not None else batch


class _PositionSampler:
    """Yields the index lists of `order` from a start position, forever."""

    def __init__(self, order: ShuffleOrder, position: Mapping[str, int]):
        self.order, self.position = order, dict(position)

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.order.iter_positions(self.position):
            yield indices.tolist()


class TorchBatchLoader:
    """A `torch.utils.data.DataLoader` over the same order as `BatchIterator`, resumable.

    Workers prefetch ahead, so the position is counted on the consumer side:
    `state_dict()` is the position after the batches actually yielded.
    """

    def __init__(self, source: Any, order: ShuffleOrder, *, transform: Transform | None = None,
                 num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2):
        self.source, self.order = source, order
        self._dataset = _BatchDataset(source, transform)
        # Forking a process that has started JAX's thread pools can deadlock the child (JAX
        # warns about it); spawn then, e.g. when a test process or a notebook imported both.
        context = "spawn" if num_workers and "jax" in sys.modules else None
        self._loader_kwargs = dict(num_workers=num_workers, pin_memory=pin_memory,
                                   prefetch_factor=prefetch_factor if num_workers else None,
                                   persistent_workers=False, multiprocessing_context=context)
        self._position = order.start()
        self._iterator = None
        self.data_wait_s = 0.0
        self.batches = 0

    def _dataloader(self):
        import torch.utils.data  # lazily: only the Torch backend's loader (data extra) needs it

        return torch.utils.data.DataLoader(self._dataset, batch_size=None,
                                           sampler=_PositionSampler(self.order, self._position),
                                           **self._loader_kwargs)

    def __iter__(self) -> TorchBatchLoader:
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        if self._iterator is None:
            self._iterator = iter(self._dataloader())
        batch = next(self._iterator)
        self._position = self.order.advance(self._position)
        self.data_wait_s += time.perf_counter() - start
        self.batches += 1
        return batch

    def pop_data_wait(self) -> float:
        wait, self.data_wait_s = self.data_wait_s, 0.0
        return wait

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict(self._position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._position = self.order.validate_state(state)
        self._iterator = None  # the next batch starts a DataLoader at the restored position


def make_torch_loader(config: DataConfig, source: Any, *, transform: Transform | None = None,
                      shard_index: int = 0, num_shards: int = 1,
                      pin_memory: bool = False) -> TorchBatchLoader:
    """The Torch backend's loader: batches of tensors in the same seeded, resumable order."""
    order = make_order(config, len(source), shard_index=shard_index, num_shards=num_shards)
    return TorchBatchLoader(source, order, transform=transform, num_workers=config.num_workers,
                            pin_memory=pin_memory)
