"""Torch networks that mirror vibe_rl_jax/networks.py layer for layer, with canonical names.

Module names are chosen so the native `state_dict` keys map 1:1 onto the
canonical flat names of DESIGN.md (contract 3):

    actor.dense_0.weight  (out, in)  <->  actor/dense_0/kernel  (in, out)
    actor.head.bias                  <->  actor/head/bias
    critic.dense_1.weight            <->  critic/dense_1/kernel
    log_std                          <->  log_std          (Box actions only)

`canonical_params` and `load_canonical` are that map; loading is strict.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


class CanonicalParamsError(KeyError):
    """A canonical parameter dict does not fit the module (missing, unexpected or mis-shaped keys)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _orthogonal_linear(in_dim: int, out_dim: int, gain: float,
                       generator: torch.Generator | None) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    nn.init.orthogonal_(layer.weight, gain=gain, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.ModuleDict):
    """Hidden layers `dense_<i>` then a linear `head`; orthogonal init, zero biases (CleanRL)."""

    def __init__(self, in_dim: int, hidden_sizes: Sequence[int], out_dim: int, activation: str,
                 head_scale: float, generator: torch.Generator | None = None):
        layers: dict[str, nn.Module] = {}
        for i, width in enumerate(hidden_sizes):
            layers[f"dense_{i}"] = _orthogonal_linear(in_dim, width, math.sqrt(2), generator)
            in_dim = width
        layers["head"] = _orthogonal_linear(in_dim, out_dim, head_scale, generator)
        super().__init__(layers)
        self._act = ACTIVATIONS[activation]
        self._hidden = tuple(layers[f"dense_{i}"] for i in range(len(hidden_sizes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear on the layers' own parameters: the same math as calling each Linear, without
        # the per-module call overhead that dominates at these sizes (rollouts call this per step).
        for layer in self._hidden:
            x = self._act(F.linear(x, layer.weight, layer.bias))
        head = self["head"]
        return F.linear(x, head.weight, head.bias)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs. `forward` returns (logits or mean, value).

    For Box actions the policy is a diagonal Gaussian with a state-independent
    `log_std` parameter, as on the JAX side.
    """

    def __init__(self, obs_dim: int, action_dim: int, continuous: bool,
                 hidden_sizes: Sequence[int] = (64, 64), activation: str = "tanh",
                 init_log_std: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.continuous = continuous
        self.actor = MLP(obs_dim, hidden_sizes, action_dim, activation, 0.01, generator)
        self.critic = MLP(obs_dim, hidden_sizes, 1, activation, 1.0, generator)
        if continuous:
            self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor(obs), self.critic(obs)[..., 0]

    def distribution(self, out: torch.Tensor) -> torch.distributions.Distribution:
        """The action distribution for the actor output `out` (logits, or the Gaussian mean)."""
        if self.continuous:
            std = self.log_std.exp().expand_as(out)
            return torch.distributions.Independent(
                torch.distributions.Normal(out, std, validate_args=False), 1, validate_args=False)
        return torch.distributions.Categorical(logits=out, validate_args=False)


# ------------------------------------------------------------------ canonical names
def _canonical_entries(module: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """canonical name -> (native parameter, transposed?) for every parameter of `module`."""
    entries: dict[str, tuple[torch.Tensor, bool]] = {}
    linear_params = set()
    for path, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            base = path.replace(".", "/")
            entries[f"{base}/kernel"] = (sub.weight, True)
            linear_params.add(id(sub.weight))
            if sub.bias is not None:
                entries[f"{base}/bias"] = (sub.bias, False)
                linear_params.add(id(sub.bias))
    for name, param in module.named_parameters():
        if id(param) in linear_params:
            continue
        if "." in name:
            raise TypeError(f"No canonical name for parameter {name!r} "
                            f"(only Linear layers and top-level parameters are mapped).")
        entries[name] = (param, False)
    return entries


def canonical_params(module: nn.Module) -> dict[str, np.ndarray]:
    """Flat `{canonical name: float32 numpy array}`; Linear weights become (in, out) kernels."""
    out = {}
    for name, (param, transpose) in _canonical_entries(module).items():
        value = param.detach().to("cpu", torch.float32)
        out[name] = np.ascontiguousarray((value.T if transpose else value).numpy())
    return out


def load_canonical(module: nn.Module, flat: Mapping[str, np.ndarray]) -> None:
    """Copy a canonical dict into `module` in place; strict.

    Every parameter must be present with the right shape and nothing else may
    be: otherwise one CanonicalParamsError lists all missing, unexpected and
    mis-shaped keys, and the module is left untouched.
    """
    entries = _canonical_entries(module)
    missing = sorted(set(entries) - set(flat))
    unexpected = sorted(set(flat) - set(entries))
    misshaped = []
    for name in sorted(set(entries) & set(flat)):
        param, transpose = entries[name]
        want = tuple(param.shape[::-1]) if transpose else tuple(param.shape)
        got = tuple(np.shape(flat[name]))
        if got != want:
            misshaped.append(f"{name}: expected {want}, got {got}")
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped keys: {'; '.join(misshaped)}")
        raise CanonicalParamsError(
            f"Canonical params do not fit {type(module).__name__}: " + " | ".join(parts))
    with torch.no_grad():
        for name, (param, transpose) in entries.items():
            value = torch.as_tensor(np.asarray(flat[name]), dtype=param.dtype)
            param.copy_(value.T if transpose else value)
