"""Flax networks. Layer names are the canonical parameter names (DESIGN.md, contract 3).

The actor-critic exports `actor/dense_<i>/{kernel,bias}`, `actor/head/...`,
`critic/dense_<i>/...`, `critic/head/...` and, for continuous actions,
`log_std`; Dense kernels are (in, out). The Torch mirror uses the same names.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vibe_rl_jax.distributions import Categorical, DiagGaussian

ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


class MLP(nn.Module):
    """Hidden Dense layers then a linear head; orthogonal init (CleanRL/PureJaxRL)."""

    hidden_sizes: Sequence[int]
    out_dim: int
    activation: str = "tanh"
    head_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden_sizes):
            x = act(nn.Dense(width, name=f"dense_{i}",
                             kernel_init=nn.initializers.orthogonal(math.sqrt(2)),
                             bias_init=nn.initializers.zeros)(x))
        return nn.Dense(self.out_dim, name="head",
                        kernel_init=nn.initializers.orthogonal(self.head_scale),
                        bias_init=nn.initializers.zeros)(x)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs; returns (action distribution, value)."""

    action_dim: int
    continuous: bool
    hidden_sizes: Sequence[int] = (64, 64)
    activation: str = "tanh"
    init_log_std: float = 0.0

    @nn.compact
    def __call__(self, obs: jax.Array):
        out = MLP(self.hidden_sizes, self.action_dim, self.activation, 0.01, name="actor")(obs)
        value = MLP(self.hidden_sizes, 1, self.activation, 1.0, name="critic")(obs)[..., 0]
        if self.continuous:
            log_std = self.param("log_std", nn.initializers.constant(self.init_log_std),
                                 (self.action_dim,))
            return DiagGaussian(out, jnp.broadcast_to(log_std, out.shape)), value
        return Categorical(out), value


class QNetwork(nn.Module):
    """Q(s, .) for discrete actions; canonical names `q/dense_<i>/...`, `q/head/...`."""

    num_actions: int
    hidden_sizes: Sequence[int] = (120, 84)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        return MLP(self.hidden_sizes, self.num_actions, self.activation, 1.0, name="q")(obs)


class SACActor(nn.Module):
    """Gaussian head before the tanh squash: returns (mean, log_std) of the pre-tanh action.

    log_std is squashed into [log_std_min, log_std_max] with tanh (CleanRL), which
    keeps gradients where hard clipping would cut them. Canonical names:
    `actor/dense_<i>/...`, `actor/mean/...`, `actor/log_std/...`.
    """

    action_dim: int
    hidden_sizes: Sequence[int] = (256, 256)
    activation: str = "relu"
    log_std_min: float = -5.0
    log_std_max: float = 2.0

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        act = ACTIVATIONS[self.activation]
        x = obs
        for i, width in enumerate(self.hidden_sizes):
            x = act(nn.Dense(width, name=f"dense_{i}")(x))
        mean = nn.Dense(self.action_dim, name="mean")(x)
        log_std = jnp.tanh(nn.Dense(self.action_dim, name="log_std")(x))
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (log_std + 1.0)
        return mean, log_std


class TwinCritic(nn.Module):
    """Two independent Q(s, a) MLPs: `critic_0/...` and `critic_1/...`."""

    hidden_sizes: Sequence[int] = (256, 256)
    activation: str = "relu"

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jnp.concatenate([obs, action], axis=-1)
        q1 = MLP(self.hidden_sizes, 1, self.activation, 1.0, name="critic_0")(x)[..., 0]
        q2 = MLP(self.hidden_sizes, 1, self.activation, 1.0, name="critic_1")(x)[..., 0]
        return q1, q2
