"""The one checkpoint converter, JAX <-> Torch, through the canonical flat dict and safetensors.

Dependency direction: the core (`layout`, `canonical`, `families`) is numpy
only and imports no backend; both backends import it (the JAX policy loader
checks checkpoints against `families`, vibe_rl_torch maps its modules through
`torch_modules`, the torch adapter). `checkpoint` (the file converter behind
scripts/convert_checkpoint.py) sits on top and imports each backend's
checkpoint reader/writer only when a conversion needs it.

    layout.py         per-kind rules: Dense kernel (in,out) <-> Linear weight (out,in), conv
                      HWIO <-> OIHW, LayerNorm scale <-> weight, bias, free parameters
    canonical.py      flat dict <-> flax tree / JAX params item / torch state_dict, strict
                      checks that list every problem, safetensors I/O, a format-free digest
    families.py       each network family's canonical names and shapes, declared once
    torch_modules.py  nn.Module <-> canonical dict (imports torch)
    checkpoint.py     convert a step directory to the other backend (params, assets, provenance)
"""

from convert.canonical import CanonicalParamsError
from convert.families import Spaces, checkpoint_layout, policy_layout, register_policy_family
from convert.layout import Kind, Leaf

__all__ = ["CanonicalParamsError", "Kind", "Leaf", "Spaces", "checkpoint_layout", "policy_layout",
           "register_policy_family"]
