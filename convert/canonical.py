"""The canonical flat dict and its maps to each framework's native tree, strict both ways.

    canonical:  {"actor/dense_0/kernel": (in, out) array, ..., "obs_normalizer/mean": ...}
    flax/JAX:   the same names as a nested dict; a JAX checkpoint's params/ item is
                {"model": <flax params>, "obs_normalizer": {"mean", "var"}}
    torch:      a state_dict, {"actor.dense_0.weight": (out, in), ...} (layout.py's rules)
    file:       safetensors with the canonical names (what Torch checkpoints store)

Every map checks the dict against the family's `Layout` first and raises one
`CanonicalParamsError` that lists every missing, unexpected and mis-shaped key,
so nothing is ever loaded half-way or with a silently dropped tensor (openpi's
converter loads with strict=False). numpy only.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Any, Mapping

import numpy as np

from convert.layout import Layout, from_torch, to_torch, torch_key

OBS_NORMALIZER = "obs_normalizer"
"""Prefix of the observation statistics saved beside the weights (`obs_normalizer/{mean,var}`)."""
JAX_MODEL_KEY = "model"
"""Where a JAX checkpoint's params item keeps the flax params."""


class CanonicalParamsError(KeyError):
    """Parameters do not fit a network (missing, unexpected or mis-shaped keys), all listed."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# ------------------------------------------------------------------ nested <-> flat
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays -> `{"a/b/c": array}` (arrays as numpy, no copy when possible)."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = np.asarray(value)
    return out


def shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """A nested dict -> `{"a/b/c": shape}`; leaves may be arrays or `jax.ShapeDtypeStruct`s
    (what `jax.eval_shape` gives), so a network's expected layout needs no materialising."""
    out: dict[str, tuple[int, ...]] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(shapes(value, name + "/"))
        else:
            out[name] = tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a/b/c": array}` -> a nested dict (the flax params tree)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CanonicalParamsError(f"Canonical name {name!r} nests under a parameter.")
        node[leaf] = value
    return tree


# ------------------------------------------------------------------ strict check
def problems(names_shapes: Mapping[str, tuple[int, ...]],
             expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The differences between found and expected `{name: shape}`, one part per kind."""
    missing = sorted(set(expected) - set(names_shapes))
    unexpected = sorted(set(names_shapes) - set(expected))
    misshaped = [f"{name}: expected {tuple(expected[name])}, got {tuple(names_shapes[name])}"
                 for name in sorted(set(expected) & set(names_shapes))
                 if tuple(names_shapes[name]) != tuple(expected[name])]
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected)}")
    if misshaped:
        parts.append(f"mis-shaped keys: {'; '.join(misshaped)}")
    return parts


def check(flat: Mapping[str, Any], layout: Layout, what: str = "Canonical params") -> None:
    """Raise one CanonicalParamsError unless `flat` has exactly the layout's names and shapes."""
    found = {name: tuple(np.shape(value)) for name, value in flat.items()}
    parts = problems(found, {name: leaf.shape for name, leaf in layout.items()})
    bad_dtype = sorted(name for name, value in flat.items() if name in layout
                       and not np.issubdtype(np.asarray(value).dtype, np.floating))
    if bad_dtype:
        parts.append(f"non-float keys: {', '.join(bad_dtype)}")
    if parts:
        raise CanonicalParamsError(f"{what}: " + " | ".join(parts))


# ------------------------------------------------------------------ flax / JAX checkpoint trees
def from_flax(tree: Mapping[str, Any], layout: Layout,
              what: str = "Flax params") -> dict[str, np.ndarray]:
    """A flax params tree -> the canonical dict (same names and layout; checked)."""
    flat = flatten(tree)
    check(flat, layout, what)
    return flat


def to_flax(flat: Mapping[str, Any], layout: Layout,
            what: str = "Canonical params") -> dict[str, Any]:
    """The canonical dict -> a flax params tree (checked)."""
    check(flat, layout, what)
    return unflatten({name: np.asarray(value) for name, value in flat.items()})


def from_jax_checkpoint(params: Mapping[str, Any], layout: Layout,
                        what: str = "JAX checkpoint params") -> dict[str, np.ndarray]:
    """A JAX checkpoint's params item (`{"model": ..., "obs_normalizer": ...}`) -> canonical."""
    params = dict(params)
    model = params.pop(JAX_MODEL_KEY, {})
    flat = flatten(model)
    for name, value in flatten(params).items():
        if name in flat:
            raise CanonicalParamsError(f"{what}: {name!r} is both a model parameter and a "
                                       f"top-level entry of the params item.")
        flat[name] = value
    check(flat, layout, what)
    return flat


def to_jax_checkpoint(flat: Mapping[str, Any], layout: Layout,
                      what: str = "Canonical params") -> dict[str, Any]:
    """The canonical dict -> a JAX checkpoint's params item (the inverse of the above)."""
    check(flat, layout, what)
    extra = {n: np.asarray(v) for n, v in flat.items() if n.startswith(OBS_NORMALIZER + "/")}
    model = {n: np.asarray(v) for n, v in flat.items() if n not in extra}
    return {JAX_MODEL_KEY: unflatten(model), **unflatten(extra)}


# ------------------------------------------------------------------ torch state_dict
def to_torch_state_dict(flat: Mapping[str, Any], layout: Layout,
                        what: str = "Canonical params") -> dict[str, np.ndarray]:
    """The canonical dict -> `{torch key: array in torch layout}` (checked)."""
    check(flat, layout, what)
    return {torch_key(name, leaf.kind): to_torch(flat[name], leaf.kind)
            for name, leaf in layout.items()}


def from_torch_state_dict(state: Mapping[str, Any], layout: Layout,
                          what: str = "Torch state_dict") -> dict[str, np.ndarray]:
    """`{torch key: array}` -> the canonical dict; problems are listed under the torch keys."""
    by_key = {torch_key(name, leaf.kind): (name, leaf) for name, leaf in layout.items()}
    if len(by_key) != len(layout):
        raise ValueError("Two canonical names map to the same torch key; fix the layout.")
    found = {key: tuple(np.shape(value)) for key, value in state.items()}
    parts = problems(found, {key: leaf.torch_shape for key, (_, leaf) in by_key.items()})
    if parts:
        raise CanonicalParamsError(f"{what}: " + " | ".join(parts))
    return {name: from_torch(np.asarray(state[key]), leaf.kind)
            for key, (name, leaf) in by_key.items()}


# ------------------------------------------------------------------ file and digest
def save_safetensors(path: pathlib.Path | str, flat: Mapping[str, Any],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write the canonical dict as safetensors (contiguous copies; names as given)."""
    import safetensors.numpy

    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(path),
                                metadata=dict(metadata or {}))


def load_safetensors(path: pathlib.Path | str) -> dict[str, np.ndarray]:
    import safetensors.numpy

    return safetensors.numpy.load_file(str(path))


def digest(flat: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and bytes in name order: equal iff the params are.

    It does not depend on the file format, so a JAX checkpoint and its Torch
    conversion have the same digest (provenance records it).
    """
    h = hashlib.sha256()
    for name in sorted(flat):
        value = np.ascontiguousarray(flat[name])
        h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()

