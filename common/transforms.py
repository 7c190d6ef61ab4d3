"""Data transforms shared by the training data path and the served Policy (openpi's shape).

A transform is any callable that takes a nested dict of numpy arrays and returns
one. A `Group` holds the input transforms (dataset/observation -> model) and the
output transforms (model -> actions for the robot); `push` composes groups so
the output side mirrors the input side: new inputs run last, new outputs run
first, so `Normalize` pushed after a repack is undone by its `Unnormalize`
before anything the repack group adds on the way out.

Every transform here works on one sample or on a batch: arrays are indexed on
their trailing dims only (state `(..., D)`, images `(..., H, W, C)`), so the
data loader applies the group to whole batches and the Policy to one
observation, with one definition and no drift.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from common.normalize import NormStats

DataDict = dict[str, Any]
DataTransformFn = Callable[[DataDict], DataDict]

# Added to the denominator of both normalisations so a constant dimension
# (std = 0, or q99 = q01) maps to a finite value; openpi's constant.
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Group:
    """Input and output transforms that belong together (e.g. Normalize / Unnormalize)."""

    inputs: Sequence[DataTransformFn] = ()
    """Applied to the data going into the model, in order."""
    outputs: Sequence[DataTransformFn] = ()
    """Applied to the model's outputs, in order."""

    def push(self, *, inputs: Sequence[DataTransformFn] = (),
             outputs: Sequence[DataTransformFn] = ()) -> Group:
        """A new group: `inputs` run after the current inputs, `outputs` before the current outputs."""
        return Group(inputs=(*self.inputs, *inputs), outputs=(*outputs, *self.outputs))

    def input_fn(self) -> DataTransformFn:
        return compose(self.inputs)

    def output_fn(self) -> DataTransformFn:
        return compose(self.outputs)


@dataclasses.dataclass(frozen=True)
class CompositeTransform:
    """Applies a sequence of transforms in order."""

    transforms: Sequence[DataTransformFn]

    def __call__(self, data: DataDict) -> DataDict:
        for transform in self.transforms:
            data = transform(data)
        return data


def compose(transforms: Sequence[DataTransformFn]) -> DataTransformFn:
    """One transform that applies `transforms` left to right."""
    return CompositeTransform(tuple(transforms))


# --- nested dict paths ("a/b/c") ------------------------------------------------

SEP = "/"


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": x}}` -> `{"a/b": x}`. Keys may contain '.', never '/'."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, path + SEP))
        else:
            flat[path] = value
    return flat


def unflatten_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_dict`; a leaf that is also a node (`a` and `a/b`) is an error."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(SEP)
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"Path {path!r} goes through leaf {part!r}.")
            node = child
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"Leaf {path!r} would replace a node of the same name.")
        node[leaf] = value
    return tree


def _map_structure(fn: Callable[[str], Any], structure: Any) -> Any:
    if isinstance(structure, Mapping):
        return {key: _map_structure(fn, value) for key, value in structure.items()}
    return fn(structure)


@dataclasses.dataclass(frozen=True)
class RepackTransform:
    """Builds a new dict from paths of the old one (rename and select in one step).

    `structure` is a nested dict whose leaves are '/'-separated paths into the
    input, e.g. for a LeRobot sample::

        {"state": "observation.state", "actions": "action",
         "images": {"top": "observation.images.top"}}

    Keys not named in `structure` are dropped.
    """

    structure: Mapping[str, Any]

    def __call__(self, data: DataDict) -> DataDict:
        flat = flatten_dict(data)

        def lookup(path: str) -> Any:
            if path not in flat:
                raise KeyError(f"RepackTransform: key {path!r} is not in the data; "
                               f"available keys: {sorted(flat)}.")
            return flat[path]

        return _map_structure(lookup, self.structure)


# --- normalisation ---------------------------------------------------------------
#
# Dimension rule (openpi's): stats computed on a wider vector than the data (e.g. a
# shared 32-dim stats file and a 14-dim robot) are sliced to their first d entries,
# where d is the data's last dim. Data wider than the stats is a mismatch for
# `Normalize` (an error naming the key and both sizes: the stats were computed for
# other data). For `Unnormalize` the extra trailing dims are model padding (see
# `PadToDim`) and pass through unchanged, so the output transforms can slice them off.


def _stat(stats: NormStats | Mapping[str, Any], name: str, key: str) -> np.ndarray:
    """One field of a key's stats: a `NormStats`, or a mapping with the same field names."""
    value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name)
    if value is None:
        raise ValueError(f"Norm stats for {key!r} have no {name!r}"
                         + ("; quantile normalisation needs q01 and q99" if name in ("q01", "q99")
                            else "") + " (recompute with scripts/compute_norm_stats.py).")
    return np.asarray(value)


def _check_dims(key: str, x: np.ndarray, stats_dim: int) -> None:
    if x.shape[-1] > stats_dim:
        raise ValueError(f"Normalize: {key!r} has {x.shape[-1]} dims but its norm stats have "
                         f"{stats_dim}; the stats were computed for other data (recompute them "
                         f"with scripts/compute_norm_stats.py).")


def _apply_stats(data: DataDict, norm_stats: Mapping[str, NormStats],
                 fn: Callable[[str, np.ndarray, NormStats], np.ndarray], strict: bool,
                 who: str) -> DataDict:
    flat = flatten_dict(data)
    if strict:
        missing = [key for key in norm_stats if key not in flat]
        if missing:
            raise KeyError(f"{who}: norm stats cover {missing} but the data has no such key; "
                           f"data keys: {sorted(flat)}.")
    out = {key: fn(key, np.asarray(value), norm_stats[key]) if key in norm_stats else value
           for key, value in flat.items()}
    return unflatten_dict(out)


@dataclasses.dataclass(frozen=True)
class Normalize:
    """Normalises every key that has stats; z-score or quantile (to about [-1, 1]).

    z-score: (x - mean) / (std + 1e-6); quantile: (x - q01) / (q99 - q01 + 1e-6) * 2 - 1.
    With `strict`, a key in the stats that is missing from the data is an error
    naming it (instead of being skipped).
    """

    norm_stats: Mapping[str, NormStats] | None
    use_quantiles: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        if self.norm_stats is not None and self.use_quantiles:
            for key, stats in self.norm_stats.items():
                _stat(stats, "q01", key), _stat(stats, "q99", key)

    def __call__(self, data: DataDict) -> DataDict:
        if self.norm_stats is None:
            return data
        return _apply_stats(data, self.norm_stats, self._normalize, self.strict, "Normalize")

    def _normalize(self, key: str, x: np.ndarray, stats: NormStats) -> np.ndarray:
        d = x.shape[-1]
        if self.use_quantiles:
            q01, q99 = _stat(stats, "q01", key), _stat(stats, "q99", key)
            _check_dims(key, x, q01.shape[-1])
            q01, q99 = q01[..., :d], q99[..., :d]
            y = (x - q01) / (q99 - q01 + EPS) * 2.0 - 1.0
        else:
            mean, std = _stat(stats, "mean", key), _stat(stats, "std", key)
            _check_dims(key, x, mean.shape[-1])
            y = (x - mean[..., :d]) / (std[..., :d] + EPS)
        return y.astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else y.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Unnormalize:
    """Inverse of `Normalize`: x * (std + 1e-6) + mean, or (x + 1) / 2 * (q99 - q01 + 1e-6) + q01.

    Every key in the stats must be in the data (strict, as in openpi): a model
    output that silently skipped unnormalisation would drive a robot with
    normalised actions.
    """

    norm_stats: Mapping[str, NormStats] | None
    use_quantiles: bool = False

    def __post_init__(self) -> None:
        if self.norm_stats is not None and self.use_quantiles:
            for key, stats in self.norm_stats.items():
                _stat(stats, "q01", key), _stat(stats, "q99", key)

    def __call__(self, data: DataDict) -> DataDict:
        if self.norm_stats is None:
            return data
        return _apply_stats(data, self.norm_stats, self._unnormalize, True, "Unnormalize")

    def _unnormalize(self, key: str, x: np.ndarray, stats: NormStats) -> np.ndarray:
        if self.use_quantiles:
            lo, hi = _stat(stats, "q01", key), _stat(stats, "q99", key)
            scale, shift = (hi - lo + EPS) / 2.0, lo + (hi - lo + EPS) / 2.0
        else:
            scale, shift = _stat(stats, "std", key) + EPS, _stat(stats, "mean", key)
        d = min(x.shape[-1], scale.shape[-1])
        head = x[..., :d] * scale[..., :d] + shift[..., :d]
        y = np.concatenate([head, x[..., d:]], axis=-1) if d < x.shape[-1] else head
        return y.astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else y


# --- shapes ----------------------------------------------------------------------


def pad_to_dim(x: np.ndarray, dim: int, axis: int = -1, value: float = 0.0) -> np.ndarray:
    """Pads `axis` of `x` up to `dim` with `value`; an axis already that wide or wider is unchanged."""
    x = np.asarray(x)
    current = x.shape[axis]
    if current >= dim:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, dim - current)
    return np.pad(x, widths, constant_values=value)


@dataclasses.dataclass(frozen=True)
class PadToDim:
    """Zero-pads the last dim of `keys` to the model's dimension (openpi's PadStatesAndActions).

    A key wider than `dim` is an error: truncating would silently drop joints.
    Missing keys are skipped (observations at serving time carry no actions).
    """

    dim: int
    keys: Sequence[str] = ("state", "actions")

    def __call__(self, data: DataDict) -> DataDict:
        flat = flatten_dict(data)
        for key in self.keys:
            if key not in flat:
                continue
            x = np.asarray(flat[key])
            if x.shape[-1] > self.dim:
                raise ValueError(f"PadToDim: {key!r} has {x.shape[-1]} dims, more than the "
                                 f"model's {self.dim}; raise the model dimension.")
            flat[key] = pad_to_dim(x, self.dim)
        return unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class SliceDim:
    """Keeps the first `dim` entries of the last dim of `keys` (undoes `PadToDim` on outputs)."""

    dim: int
    keys: Sequence[str] = ("actions",)

    def __call__(self, data: DataDict) -> DataDict:
        flat = flatten_dict(data)
        for key in self.keys:
            if key in flat:
                flat[key] = np.asarray(flat[key])[..., : self.dim]
        return unflatten_dict(flat)


# --- images ----------------------------------------------------------------------


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """One (H, W, C) image through PIL: RGB uint8 in one go, anything else channel by channel."""
    from PIL import Image

    if image.dtype == np.uint8 and image.shape[-1] == 3:
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    channels = []
    for c in range(image.shape[-1]):
        channel = image[..., c]
        channel = channel if channel.dtype == np.uint8 else channel.astype(np.float32)
        channels.append(np.asarray(Image.fromarray(channel).resize((width, height), Image.BILINEAR)))
    return np.stack(channels, axis=-1)


def resize_with_pad(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes `(..., H, W, C)` images to `(..., height, width, C)` keeping the aspect ratio.

    The image is scaled to fit (bilinear, PIL) and centred; the border is zero
    (tf.image.resize_with_pad / openpi's image_tools). uint8 stays uint8, float
    images stay in their float dtype (PIL's 32-bit float mode, channel by channel).
    """
    images = np.asarray(images)
    if images.ndim < 3:
        raise ValueError(f"resize_with_pad expects (..., H, W, C) images, got shape {images.shape}.")
    if images.shape[-3:-1] == (height, width):
        return images
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"resize_with_pad supports uint8 and float images, got {images.dtype}.")
    lead, (cur_h, cur_w, channels) = images.shape[:-3], images.shape[-3:]
    ratio = max(cur_w / width, cur_h / height)
    new_h, new_w = max(1, int(cur_h / ratio)), max(1, int(cur_w / ratio))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    flat = images.reshape(-1, cur_h, cur_w, channels)
    out = np.zeros((flat.shape[0], height, width, channels), dtype=images.dtype)
    for i, image in enumerate(flat):
        out[i, top:top + new_h, left:left + new_w] = _resize(image, new_w, new_h).astype(images.dtype)
    return out.reshape(*lead, height, width, channels)


@dataclasses.dataclass(frozen=True)
class ResizeImages:
    """Resizes every image under `key` (a dict of name -> (..., H, W, C)) with `resize_with_pad`."""

    height: int
    width: int
    key: str = "images"

    def __call__(self, data: DataDict) -> DataDict:
        if self.key not in data:
            return data
        resized = {name: resize_with_pad(image, self.height, self.width)
                   for name, image in data[self.key].items()}
        return {**data, self.key: resized}
