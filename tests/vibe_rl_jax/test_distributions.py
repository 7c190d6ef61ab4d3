"""Our JAX distributions against torch.distributions (the Torch backend's)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from vibe_rl_jax.distributions import Categorical, DiagGaussian, tanh_log_det_jacobian


def test_categorical_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    actions = rng.integers(0, 4, size=5)
    ours = Categorical(jnp.asarray(logits))
    ref = torch.distributions.Categorical(logits=torch.tensor(logits))
    np.testing.assert_allclose(ours.log_prob(jnp.asarray(actions)),
                               ref.log_prob(torch.tensor(actions)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.entropy(), ref.entropy().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours.mode(), logits.argmax(-1))


def test_categorical_sampling_frequencies():
    probs = np.array([0.1, 0.6, 0.3], np.float32)
    dist = Categorical(jnp.log(jnp.asarray(probs))[None].repeat(20000, 0))
    counts = np.bincount(np.asarray(dist.sample(jax.random.PRNGKey(0))), minlength=3) / 20000
    np.testing.assert_allclose(counts, probs, atol=0.015)


def test_diag_gaussian_matches_torch():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(6, 3)).astype(np.float32)
    log_std = rng.normal(size=(6, 3)).astype(np.float32) * 0.5
    x = rng.normal(size=(6, 3)).astype(np.float32)
    ours = DiagGaussian(jnp.asarray(mean), jnp.asarray(log_std))
    ref = torch.distributions.Independent(
        torch.distributions.Normal(torch.tensor(mean), torch.tensor(log_std).exp()), 1)
    np.testing.assert_allclose(ours.log_prob(jnp.asarray(x)), ref.log_prob(torch.tensor(x)).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.entropy(), ref.entropy().numpy(), rtol=1e-5, atol=1e-5)
    samples = DiagGaussian(jnp.zeros((50000, 1)) + 2.0, jnp.log(jnp.full((50000, 1), 0.5))).sample(
        jax.random.PRNGKey(3))
    assert abs(float(samples.mean()) - 2.0) < 0.01 and abs(float(samples.std()) - 0.5) < 0.01


def test_tanh_correction_matches_torch_transform():
    u = np.linspace(-5, 5, 21, dtype=np.float32)[:, None].repeat(2, 1)
    ref = torch.distributions.transforms.TanhTransform().log_abs_det_jacobian(
        torch.tensor(u), torch.tanh(torch.tensor(u))).sum(-1).numpy()
    np.testing.assert_allclose(tanh_log_det_jacobian(jnp.asarray(u)), ref, rtol=1e-5, atol=1e-5)
    # and the naive formula where it is still accurate
    np.testing.assert_allclose(tanh_log_det_jacobian(jnp.asarray(u[8:13])),
                               np.log(1 - np.tanh(u[8:13]) ** 2).sum(-1), rtol=1e-4, atol=1e-5)
