"""Vectorised gymnax envs keep terminated, truncated and the true final observation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.config import ConfigError
from vibe_rl_jax import envs


def _roll(venv, steps, action):
    obs, state = venv.reset(jax.random.PRNGKey(0))
    step = jax.jit(venv.step)
    outs = []
    key = jax.random.PRNGKey(1)
    for _ in range(steps):
        key, k = jax.random.split(key)
        out = step(k, state, action)
        outs.append(out)
        state = out.state
    return outs


def test_pendulum_truncates_with_true_final_observation():
    venv = envs.VecEnv("Pendulum-v1", 2)
    outs = _roll(venv, 200, jnp.zeros((2, 1)))
    last = outs[-1]
    assert bool(last.truncated.all()) and not bool(last.terminated.any())
    assert not any(bool(o.truncated.any()) for o in outs[:-1])
    # The returned obs is a fresh reset; the final obs continues the trajectory.
    prev_obs = outs[-2].obs
    assert np.abs(np.asarray(last.final_obs - prev_obs)).max() < 1.0
    assert not np.allclose(last.final_obs, last.obs)
    assert int(last.episode_length[0]) == 200
    np.testing.assert_allclose(last.episode_return, sum(o.reward for o in outs), rtol=1e-5)
    assert int(last.state.episode_length[0]) == 0


def test_cartpole_terminates_not_truncates():
    venv = envs.VecEnv("CartPole-v1", 3)
    outs = _roll(venv, 60, jnp.ones(3, jnp.int32))  # always push right: falls over fast
    ended = [o for o in outs if bool(o.terminated.any())]
    assert ended and not any(bool(o.truncated.any()) for o in outs)
    first = ended[0]
    i = int(np.argmax(np.asarray(first.terminated)))
    # A terminal CartPole obs is out of bounds (angle or position); the reset obs is near 0.
    assert abs(float(first.final_obs[i, 2])) > 0.2 or abs(float(first.final_obs[i, 0])) > 2.4
    assert np.abs(np.asarray(first.obs[i])).max() < 0.06


def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(16, 3)).astype(np.float32) for _ in range(5)]
    rms = envs.init_rms((3,))
    for b in batches:
        rms = envs.update_rms(rms, jnp.asarray(b))
    data = np.concatenate(batches)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-4)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-3)


def test_normalize_wrapper_normalises_obs_and_final_obs():
    venv = envs.make_vec_env("Pendulum-v1", 4, normalize_obs=True)
    raw_env = envs.VecEnv("Pendulum-v1", 4)
    obs, state = venv.reset(jax.random.PRNGKey(0))
    raw_obs, raw_state = raw_env.reset(jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(obs).mean(0), 0.0, atol=1e-3)  # first batch's own stats
    out = venv.step(jax.random.PRNGKey(1), state, jnp.zeros((4, 1)))
    raw = raw_env.step(jax.random.PRNGKey(1), raw_state, jnp.zeros((4, 1)))
    rms = envs.obs_normalizer(out.state)
    expected = envs.update_rms(envs.update_rms(envs.init_rms((3,)), raw_obs), raw.obs)
    np.testing.assert_allclose(rms.mean, expected.mean, rtol=1e-6)
    np.testing.assert_allclose(out.obs, envs.normalize(raw.obs, rms.mean, rms.var), rtol=1e-5)
    np.testing.assert_allclose(out.final_obs, envs.normalize(raw.final_obs, rms.mean, rms.var),
                               rtol=1e-5)


def test_unknown_env_id_suggests():
    with pytest.raises(ConfigError, match="CartPole-v1"):
        envs.check_env_id("CartPole-v0")
