"""The JAX GAE and loss against the shared numpy reference and hand-computed values."""

import jax.numpy as jnp
import numpy as np

from common import rl_math
from vibe_rl_jax import ppo, schedules


def test_gae_matches_hand_values():
    adv, ret = ppo.gae(jnp.array([1.0, 1.0, 1.0]), jnp.array([1.0, 2.0, 3.0]),
                       jnp.array([2.0, 4.0, 10.0]), jnp.array([False, False, True]),
                       jnp.array([False, True, False]), 0.5, 0.5)
    np.testing.assert_allclose(adv, [1.25, 1.0, -2.0])
    np.testing.assert_allclose(ret, [2.25, 3.0, 1.0])


def test_gae_matches_reference_on_random_rollouts():
    rng = np.random.default_rng(1)
    shape = (64, 8)
    r, v, nv = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
    term, trunc = rng.random(shape) < 0.05, rng.random(shape) < 0.05
    adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(nv), jnp.asarray(term),
                       jnp.asarray(trunc), 0.99, 0.95)
    ref_adv, ref_ret = rl_math.gae(r, v, nv, term, trunc, 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


def test_ppo_loss_same_numbers_in_jax():
    rng = np.random.default_rng(2)
    args = {k: rng.normal(size=32).astype(np.float32) for k in
            ("log_prob", "old_log_prob", "advantages", "values", "old_values", "returns", "entropy")}
    kw = dict(clip_eps=0.2, clip_value=True, vf_coef=0.5, ent_coef=0.01, normalize_advantages=True)
    ref = rl_math.ppo_loss(np, **args, **kw)
    out = rl_math.ppo_loss(jnp, **{k: jnp.asarray(v) for k, v in args.items()}, **kw)
    for a, b in zip(ref, out):
        np.testing.assert_allclose(float(b), float(a), rtol=1e-5, atol=1e-6)


def test_schedules():
    lin = schedules.make("linear", 1.0, total_steps=100)
    assert float(lin(0)) == 1.0 and abs(float(lin(50)) - 0.5) < 1e-6 and float(lin(100)) == 0.0
    cos = schedules.make("warmup_cosine", 2.0, total_steps=110, warmup_steps=10)
    assert float(cos(0)) == 0.0 and abs(float(cos(10)) - 2.0) < 1e-6
    assert abs(float(cos(60)) - 1.0) < 1e-5 and float(cos(110)) < 1e-6
    assert float(schedules.make("constant", 0.3, total_steps=5)(1000)) == np.float32(0.3)
