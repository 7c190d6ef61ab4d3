"""Gymnasium vector envs: final observations, flags, normalisation parity with JAX, exact state."""

import pickle

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest

from common.config import ConfigError
from vibe_rl_jax import envs as jax_envs
from vibe_rl_torch import envs

import torch_toy_envs  # noqa: F401


def test_terminated_truncated_and_final_obs_are_separate():
    venv = envs.VecEnv("torch_toy_envs:CounterTrunc-v0", 2)
    obs = venv.reset([0, 1])
    np.testing.assert_array_equal(obs[:, 0], 0)
    for _ in range(2):
        out = venv.step(np.array([0, 1]))
        assert not out.done.any()
        np.testing.assert_array_equal(out.final_obs, out.obs)
    out = venv.step(np.array([0, 1]))
    assert out.truncated.all() and not out.terminated.any()
    np.testing.assert_array_equal(out.final_obs[:, 0], 3)  # the true last observation...
    np.testing.assert_array_equal(out.obs[:, 0], 0)  # ...while the policy sees the reset one
    np.testing.assert_array_equal(out.episode_return, 1 + 2 + 3)
    np.testing.assert_array_equal(out.episode_length, 3)

    venv = envs.VecEnv("torch_toy_envs:Counter-v0", 1)
    venv.reset([0])
    flags = [venv.step(np.array([0])) for _ in range(4)]
    assert [bool(f.terminated[0]) for f in flags] == [False, False, False, True]
    assert not any(f.truncated[0] for f in flags)


def test_running_stats_and_transform_match_jax():
    rng = np.random.default_rng(0)
    ours = envs.RunningMeanStd((3,))
    theirs = jax_envs.init_rms((3,))
    for size in (4, 4, 7, 1):
        batch = (rng.normal(size=(size, 3)) * [1, 10, 0.1] + [0, 5, -2]).astype(np.float32)
        ours.update(*envs.local_moments(batch))
        theirs = jax_envs.update_rms(theirs, jnp.asarray(batch))
    np.testing.assert_allclose(ours.mean, theirs.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var, theirs.var, rtol=1e-5, atol=1e-6)
    obs = (rng.normal(size=(6, 3)) * 100).astype(np.float32)  # some beyond the clip of 10
    np.testing.assert_allclose(envs.normalize(obs, ours.mean, ours.var),
                               jax_envs.normalize(jnp.asarray(obs), theirs.mean, theirs.var),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(envs.normalize(obs, ours.mean, ours.var)).max() == 10.0


def test_normalised_env_updates_stats_from_next_observations_like_jax():
    """Stats see the reset batch, then every batch of next observations (not final ones)."""
    venv = envs.VecEnv("torch_toy_envs:CounterTrunc-v0", 2, normalize_obs=True)
    venv.reset([0, 1])
    raw = [np.array([[0.0, 1.0]] * 2, np.float32)]
    for t in range(4):
        out = venv.step(np.array([0, 0]))
        raw.append(np.array([[(t + 1) % 3, 1.0]] * 2, np.float32))
    ref = jax_envs.init_rms((2,))
    for batch in raw:
        ref = jax_envs.update_rms(ref, jnp.asarray(batch))
    np.testing.assert_allclose(venv.rms.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(venv.rms.var, ref.var, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.obs, np.asarray(jax_envs.normalize(jnp.asarray(raw[-1]), ref.mean,
                                                                      ref.var)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("env_id,normalize", [("CartPole-v1", False), ("Pendulum-v1", True)])
def test_state_dict_continues_exactly(env_id, normalize):
    rng = np.random.default_rng(0)
    venv = envs.VecEnv(env_id, 3, normalize_obs=normalize)
    venv.reset([5, 6, 7])
    spec = venv.action_spec

    def act():
        if spec.continuous:
            return rng.normal(size=(3, spec.dim)).astype(np.float32) * 3
        return rng.integers(0, spec.dim, size=3)

    for _ in range(30):
        venv.step(act())
    state = pickle.loads(pickle.dumps(venv.state_dict()))  # as it travels through a checkpoint
    clone = envs.VecEnv(env_id, 3, normalize_obs=normalize)
    clone.reset([0, 0, 0])  # different state first: loading must replace all of it
    assert clone.load_state_dict(state)
    np.testing.assert_array_equal(clone.obs, venv.obs)
    for _ in range(300):  # CartPole episodes end inside this window: resets are exact too
        a = act()
        x, y = venv.step(a), clone.step(a)
        for name, u, v in zip(x._fields, x, y):
            np.testing.assert_array_equal(u, v, err_msg=name)


def test_unknown_or_unsupported_envs_are_config_errors():
    with pytest.raises(ConfigError, match=r"--env.id 'CartPol-v1'.*CartPole-v1"):
        envs.check_env_id("CartPol-v1")
    with pytest.raises(ConfigError, match="cannot import module"):
        envs.check_env_id("no_such_module_xyz:Thing-v0")
    with pytest.raises(ConfigError, match="1-D Box observation"):
        envs.VecEnv("FrozenLake-v1", 1)


def test_vectorised_cartpole_resets_in_the_step_that_ends_an_episode():
    """CartPole runs on gymnasium's numpy CartPoleVectorEnv with the SAME_STEP contract: the
    step that ends an episode returns the true final observation apart and the reset one."""
    venv = envs.VecEnv("CartPole-v1", 3)
    assert isinstance(venv.envs, envs.SameStepCartPole)
    venv.reset([0, 1, 2])
    prev, ends = venv.obs, 0
    for _ in range(100):
        out = venv.step(np.zeros(3, np.int64))  # always push left: the pole falls within ~10 steps
        done = out.done
        assert not out.truncated.any() and (out.terminated == done).all()
        np.testing.assert_array_equal(out.final_obs[~done], out.obs[~done])
        if done.any():
            final = out.final_obs[done]
            assert ((np.abs(final[:, 0]) > 2.4) | (np.abs(final[:, 2]) > 12 * 2 * np.pi / 360)).all()
            assert (np.abs(out.obs[done]) <= 0.05).all()  # a fresh reset state
            assert (np.abs(prev[done, 2]) <= 12 * 2 * np.pi / 360).all()  # was alive a step ago
            ends += int(done.sum())
        prev = out.obs
    assert ends > 10

    # Truncation (a 5-step limit) resets the step counter in the same step: the next one
    # comes 5 steps later, never flagged as terminated.
    vec = envs.SameStepCartPole(
        gym.make_vec("CartPole-v1", 2, vectorization_mode="vector_entry_point",
                          max_episode_steps=5))
    vec.reset(seed=[0, 1])
    flags = []
    for t in range(10):
        obs, _, terminated, truncated, info = vec.step(np.array([t % 2, (t + 1) % 2]))
        flags.append(bool(truncated.all()))
        assert not terminated.any()
        if truncated.any():
            assert info["_final_obs"].all() and not np.array_equal(info["final_obs"], obs)
    assert flags == [False] * 4 + [True] + [False] * 4 + [True]
