"""The few action distributions PPO/SAC need, from jax.random / jax.nn / jax.scipy.

distrax would be the usual choice, but it only imports with a nightly
TensorFlow Probability on jax 0.10 (DESIGN.md, "Environment"), and a library
cannot depend on a nightly build. These are tested against
`torch.distributions` in tests/vibe_rl_jax/test_distributions.py.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

_LOG_2PI_E = math.log(2 * math.pi * math.e)


class Categorical(NamedTuple):
    logits: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        return jax.random.categorical(key, self.logits, axis=-1)

    def log_prob(self, action: jax.Array) -> jax.Array:
        log_p = jax.nn.log_softmax(self.logits, axis=-1)
        return jnp.take_along_axis(log_p, action[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def entropy(self) -> jax.Array:
        log_p = jax.nn.log_softmax(self.logits, axis=-1)
        return -(jnp.exp(log_p) * log_p).sum(-1)

    def mode(self) -> jax.Array:
        return jnp.argmax(self.logits, axis=-1)


class DiagGaussian(NamedTuple):
    mean: jax.Array
    log_std: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        noise = jax.random.normal(key, jnp.broadcast_shapes(self.mean.shape, self.log_std.shape))
        return self.mean + jnp.exp(self.log_std) * noise

    def log_prob(self, action: jax.Array) -> jax.Array:
        return norm.logpdf(action, self.mean, jnp.exp(self.log_std)).sum(-1)

    def entropy(self) -> jax.Array:
        log_std = jnp.broadcast_to(self.log_std, self.mean.shape)
        return (0.5 * _LOG_2PI_E + log_std).sum(-1)

    def mode(self) -> jax.Array:
        return self.mean


def tanh_log_det_jacobian(pre_tanh: jax.Array) -> jax.Array:
    """log |d tanh(u)/du| summed over the action dims, in the stable form
    2 (log 2 - u - softplus(-2u)) (SAC appendix C; the form torch's TanhTransform uses)."""
    return (2.0 * (math.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh))).sum(-1)
