"""The torch side of the map: an `nn.Module`'s parameters <-> the canonical dict (imports torch).

The canonical layout of a module is read from its layer types, with the rules
of convert/layout.py: `nn.Linear` -> dense kernel + bias, `nn.Conv{1,2,3}d`
-> conv kernel + bias, `nn.LayerNorm` -> scale + bias, and an `nn.Parameter`
of your own module (log_std) -> a free parameter under its path. Any other
built-in layer with parameters (ConvTranspose, BatchNorm, Embedding, ...) is
refused rather than guessed. Names follow the module paths, "." -> "/".

vibe_rl_torch imports this module; nothing else here needs torch.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from convert import canonical
from convert.layout import Kind, Leaf, shape_from_torch, to_torch, torch_key

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def layout_of(module: nn.Module) -> dict[str, Leaf]:
    """canonical name -> Leaf for every parameter of `module` (the module's own declaration)."""
    leaves: dict[str, Leaf] = {}
    for path, sub in module.named_modules():
        base = path.replace(".", "/")
        direct = dict(sub.named_parameters(recurse=False))
        if not direct:
            continue
        if isinstance(sub, nn.Linear):
            rules = {"weight": ("kernel", Kind.DENSE), "bias": ("bias", Kind.BIAS)}
        elif isinstance(sub, _CONVS):
            rules = {"weight": ("kernel", Kind.CONV), "bias": ("bias", Kind.BIAS)}
        elif isinstance(sub, nn.LayerNorm):
            rules = {"weight": ("scale", Kind.SCALE), "bias": ("bias", Kind.BIAS)}
        elif type(sub).__module__.startswith("torch.nn"):
            raise TypeError(f"No canonical layout for {type(sub).__name__} at "
                            f"{path or '<root>'!r}: add a rule to convert/layout.py and "
                            f"convert/torch_modules.py.")
        else:  # the module's own free parameters
            rules = {name: (name, Kind.PARAM) for name in direct}
        if not base and any(kind is not Kind.PARAM for _, kind in rules.values()):
            raise TypeError(f"Wrap the top-level {type(sub).__name__} in a named submodule: "
                            f"canonical names need a layer name.")
        for attr, param in direct.items():
            leaf_name, kind = rules[attr]
            name = f"{base}/{leaf_name}" if base else leaf_name
            leaves[name] = Leaf(shape_from_torch(tuple(param.shape), kind), kind)
    params = dict(module.named_parameters())
    persistent = [name for name in module.state_dict() if name not in params]
    if persistent:
        raise TypeError(f"{type(module).__name__} has buffers {persistent}; the canonical dict "
                        f"holds parameters only.")
    return leaves


def canonical_params(module: nn.Module) -> dict[str, np.ndarray]:
    """Flat `{canonical name: float32 numpy array}`; Linear weights become (in, out) kernels."""
    state = {name: param.detach().to("cpu", torch.float32).numpy()
             for name, param in module.named_parameters()}
    return canonical.from_torch_state_dict(state, layout_of(module), type(module).__name__)


def load_canonical(module: nn.Module, flat: Mapping[str, np.ndarray]) -> None:
    """Copy a canonical dict into `module` in place; strict.

    Every parameter must be present with the right shape and nothing else may
    be: otherwise one CanonicalParamsError lists all missing, unexpected and
    mis-shaped keys, and the module is left untouched.
    """
    layout = layout_of(module)
    canonical.check(flat, layout, f"Canonical params do not fit {type(module).__name__}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, leaf in layout.items():
            param = params[torch_key(name, leaf.kind)]
            # torch.tensor copies: the arrays may be read-only (safetensors, jax)
            param.copy_(torch.tensor(to_torch(np.asarray(flat[name]), leaf.kind),
                                     dtype=param.dtype))
