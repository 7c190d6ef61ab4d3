"""Torch networks that mirror vibe_rl_jax/networks.py layer for layer, with canonical names.

Module names are chosen so the native `state_dict` keys map 1:1 onto the
canonical flat names of DESIGN.md (contract 3):

    actor.dense_0.weight  (out, in)  <->  actor/dense_0/kernel  (in, out)
    actor.head.bias                  <->  actor/head/bias
    critic.dense_1.weight            <->  critic/dense_1/kernel
    log_std                          <->  log_std          (Box actions only)
    q.dense_0.weight                 <->  q/dense_0/kernel      (QNetwork, DQN)
    actor.mean.weight                <->  actor/mean/kernel     (SACActor; also actor/log_std/...)
    critic_1.head.bias               <->  critic_1/head/bias    (TwinCritic, SAC)

`canonical_params` and `load_canonical` are that map (convert/torch_modules.py, the one
implementation of it); loading is strict.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from convert import torch_modules
from convert.canonical import CanonicalParamsError  # noqa: F401 - raised by load_canonical

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}


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

    @torch.no_grad()
    def frozen_forward(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """`forward` for acting while the parameters stay as they are now (a rollout).

        Actor and critic become one MLP whose layers stack or block-diagonally join theirs,
        so each step runs one matmul per layer instead of two: on a rollout's tiny batches the
        per-call cost, not the arithmetic, is what counts. The result equals `forward`'s up to
        float rounding (the padding zeros are exact; the summation order may differ).
        """
        pairs = [(self.actor[name], self.critic[name]) for name in self.actor.keys()]
        layers = [(torch.cat([pairs[0][0].weight, pairs[0][1].weight]),
                   torch.cat([pairs[0][0].bias, pairs[0][1].bias]))]
        layers += [(torch.block_diag(a.weight, c.weight), torch.cat([a.bias, c.bias]))
                   for a, c in pairs[1:]]
        act, num_out = self.actor._act, pairs[-1][0].out_features

        def forward(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = obs
            for weight, bias in layers[:-1]:
                x = act(F.linear(x, weight, bias))
            x = F.linear(x, *layers[-1])
            return x[..., :num_out], x[..., num_out]

        return forward

    def distribution(self, out: torch.Tensor) -> torch.distributions.Distribution:
        """The action distribution for the actor output `out` (logits, or the Gaussian mean)."""
        if self.continuous:
            std = self.log_std.exp().expand_as(out)
            return torch.distributions.Independent(
                torch.distributions.Normal(out, std, validate_args=False), 1, validate_args=False)
        return torch.distributions.Categorical(logits=out, validate_args=False)


# ------------------------------------------------------------------ off-policy networks
def _lecun_linear(in_dim: int, out_dim: int, generator: torch.Generator | None) -> nn.Linear:
    """flax `nn.Dense`'s default init: truncated-normal lecun kernel (variance 1/fan_in), zero bias."""
    layer = nn.Linear(in_dim, out_dim)
    # flax variance_scaling(1, fan_in, truncated_normal): N(0, s) cut at +-2 s, s rescaled so the
    # truncated distribution has variance 1/fan_in (0.8796... = std of a unit normal cut at +-2).
    std = math.sqrt(1.0 / in_dim) / 0.87962566103423978
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer


class QNetwork(nn.Module):
    """Q(s, .) for discrete actions (vibe_rl_jax.networks.QNetwork): `q/dense_<i>/...`, `q/head/...`."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: Sequence[int] = (120, 84),
                 activation: str = "relu", generator: torch.Generator | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        self.q = MLP(obs_dim, hidden_sizes, num_actions, activation, 1.0, generator)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q(obs)


class SACActor(nn.Module):
    """Mean and log-std of the pre-tanh Gaussian (vibe_rl_jax.networks.SACActor, same math).

    log_std = min + (max - min) (tanh(h) + 1) / 2 (CleanRL's squashing, not a hard clip).
    Canonical names `actor/dense_<i>/...`, `actor/mean/...`, `actor/log_std/...`; flax
    `Dense`'s default (lecun-normal) init, as on the JAX side.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int] = (256, 256),
                 activation: str = "relu", log_std_min: float = -5.0, log_std_max: float = 2.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        layers: dict[str, nn.Module] = {}
        in_dim = obs_dim
        for i, width in enumerate(hidden_sizes):
            layers[f"dense_{i}"] = _lecun_linear(in_dim, width, generator)
            in_dim = width
        layers["mean"] = _lecun_linear(in_dim, action_dim, generator)
        layers["log_std"] = _lecun_linear(in_dim, action_dim, generator)
        self.actor = nn.ModuleDict(layers)
        self._act = ACTIVATIONS[activation]
        self._hidden = tuple(layers[f"dense_{i}"] for i in range(len(hidden_sizes)))
        self.log_std_min = float(log_std_min)
        self.log_std_max = float(log_std_max)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = obs
        for layer in self._hidden:
            x = self._act(F.linear(x, layer.weight, layer.bias))
        mean_layer, log_std_layer = self.actor["mean"], self.actor["log_std"]
        mean = F.linear(x, mean_layer.weight, mean_layer.bias)
        log_std = torch.tanh(F.linear(x, log_std_layer.weight, log_std_layer.bias))
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1.0)
        return mean, log_std


class TwinCritic(nn.Module):
    """Two independent Q(s, a) MLPs on concat(obs, action): `critic_0/...`, `critic_1/...`."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: Sequence[int] = (256, 256),
                 activation: str = "relu", generator: torch.Generator | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
        in_dim = obs_dim + action_dim
        self.critic_0 = MLP(in_dim, hidden_sizes, 1, activation, 1.0, generator)
        self.critic_1 = MLP(in_dim, hidden_sizes, 1, activation, 1.0, generator)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], dim=-1)
        return self.critic_0(x)[..., 0], self.critic_1(x)[..., 0]


# ------------------------------------------------------------------ canonical names
# The map lives in convert/ (one implementation for every family and both directions):
# Linear weight (out, in) <-> kernel (in, out), conv OIHW <-> HWIO, LayerNorm weight <-> scale.
canonical_params = torch_modules.canonical_params
load_canonical = torch_modules.load_canonical
