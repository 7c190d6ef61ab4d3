"""Layout rules: how one canonical parameter looks in each framework (DESIGN.md, contract 3).

A canonical parameter has a flat name (`actor/dense_0/kernel`) and a *kind*.
The canonical layout is flax's, so a flax tree maps onto canonical names and
arrays with no change at all; the kind says what torch does differently:

    kind      canonical / flax                  torch
    dense     .../kernel  (in, out)             ....weight  (out, in)
    conv      .../kernel  (*spatial, in, out)   ....weight  (out, in, *spatial)   (HWIO <-> OIHW)
    scale     .../scale   (d,)                  ....weight  (d,)                  (LayerNorm)
    bias      .../bias                          ....bias
    param     any name, as is                   same name with "." for "/", as is

This module is numpy only: both backends and the checkpoint converter use it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Mapping

import numpy as np


class Kind(str, enum.Enum):
    DENSE = "dense"
    CONV = "conv"
    SCALE = "scale"
    BIAS = "bias"
    PARAM = "param"


# The last path component a canonical name of each kind must end with (None: any).
_CANONICAL_LEAF = {Kind.DENSE: "kernel", Kind.CONV: "kernel", Kind.SCALE: "scale",
                   Kind.BIAS: "bias", Kind.PARAM: None}
_TORCH_LEAF = {Kind.DENSE: "weight", Kind.CONV: "weight", Kind.SCALE: "weight", Kind.BIAS: "bias",
               Kind.PARAM: None}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One canonical parameter: its shape in the canonical (flax) layout and its kind."""

    shape: tuple[int, ...]
    kind: Kind = Kind.PARAM

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.kind is Kind.DENSE and len(self.shape) != 2:
            raise ValueError(f"A dense kernel is (in, out), got shape {self.shape}.")
        if self.kind is Kind.CONV and len(self.shape) < 3:
            raise ValueError(f"A conv kernel is (*spatial, in, out), got shape {self.shape}.")

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return _torch_axes_shape(self.shape, self.kind)


Layout = Mapping[str, Leaf]
"""canonical name -> Leaf: everything a network family declares about its parameters."""


def check_name(name: str, kind: Kind) -> None:
    """A canonical name must fit its kind (a dense kernel ends in /kernel, ...)."""
    parts = name.split("/")
    if not name or any(not p or "." in p for p in parts):
        raise ValueError(f"Canonical name {name!r}: '/'-separated, non-empty parts without '.'.")
    want = _CANONICAL_LEAF[Kind(kind)]
    if want is not None and (len(parts) < 2 or parts[-1] != want):
        raise ValueError(f"Canonical name {name!r} of kind {Kind(kind).value} must end in /{want}.")


def torch_key(name: str, kind: Kind) -> str:
    """Torch state_dict key of canonical `name`: actor/dense_0/kernel -> actor.dense_0.weight."""
    check_name(name, kind)
    parts = name.split("/")
    leaf = _TORCH_LEAF[Kind(kind)]
    if leaf is not None:
        parts[-1] = leaf
    return ".".join(parts)


def _torch_axes(ndim: int, kind: Kind) -> tuple[int, ...] | None:
    """Axis order that turns a canonical array into its torch layout (None: unchanged)."""
    if kind is Kind.DENSE:
        return (1, 0)
    if kind is Kind.CONV:  # (*spatial, in, out) -> (out, in, *spatial)
        return (ndim - 1, ndim - 2, *range(ndim - 2))
    return None


def _torch_axes_shape(shape: tuple[int, ...], kind: Kind) -> tuple[int, ...]:
    axes = _torch_axes(len(shape), kind)
    return tuple(shape) if axes is None else tuple(shape[a] for a in axes)


def shape_from_torch(shape: tuple[int, ...], kind: Kind) -> tuple[int, ...]:
    """The canonical shape of a parameter whose torch shape is `shape`."""
    axes = _torch_axes(len(shape), Kind(kind))
    return tuple(shape) if axes is None else tuple(shape[a] for a in np.argsort(axes))


def to_torch(value: np.ndarray, kind: Kind) -> np.ndarray:
    """Canonical array -> torch layout (a contiguous copy when axes move)."""
    value = np.asarray(value)
    axes = _torch_axes(value.ndim, Kind(kind))
    return value if axes is None else np.ascontiguousarray(value.transpose(axes))


def from_torch(value: np.ndarray, kind: Kind) -> np.ndarray:
    """Torch layout -> canonical array (the inverse of `to_torch`)."""
    value = np.asarray(value)
    axes = _torch_axes(value.ndim, Kind(kind))
    return value if axes is None else np.ascontiguousarray(value.transpose(np.argsort(axes)))


# ------------------------------------------------------------------ building blocks of families
def dense(prefix: str, in_dim: int, out_dim: int, *, bias: bool = True) -> dict[str, Leaf]:
    """`<prefix>/kernel` (in, out) and `<prefix>/bias` (out,): a flax Dense / torch Linear."""
    out = {f"{prefix}/kernel": Leaf((in_dim, out_dim), Kind.DENSE)}
    if bias:
        out[f"{prefix}/bias"] = Leaf((out_dim,), Kind.BIAS)
    return out


def conv(prefix: str, kernel_size: tuple[int, ...], in_ch: int, out_ch: int, *,
         bias: bool = True) -> dict[str, Leaf]:
    """`<prefix>/kernel` (*kernel_size, in, out) and `<prefix>/bias`: flax Conv / torch ConvNd."""
    out = {f"{prefix}/kernel": Leaf((*kernel_size, in_ch, out_ch), Kind.CONV)}
    if bias:
        out[f"{prefix}/bias"] = Leaf((out_ch,), Kind.BIAS)
    return out


def layer_norm(prefix: str, dim: int) -> dict[str, Leaf]:
    """`<prefix>/scale` and `<prefix>/bias`: flax LayerNorm / torch LayerNorm (weight, bias)."""
    return {f"{prefix}/scale": Leaf((dim,), Kind.SCALE), f"{prefix}/bias": Leaf((dim,), Kind.BIAS)}


def mlp(prefix: str, in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int, *,
        head: str = "head") -> dict[str, Leaf]:
    """Dense layers `<prefix>/dense_<i>` then `<prefix>/<head>` (the MLPs of both backends)."""
    out: dict[str, Leaf] = {}
    for i, width in enumerate(hidden_sizes):
        out.update(dense(f"{prefix}/dense_{i}", in_dim, width))
        in_dim = width
    out.update(dense(f"{prefix}/{head}", in_dim, out_dim))
    return out
