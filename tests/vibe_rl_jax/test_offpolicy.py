"""DQN and SAC on the JAX backend: targets, squashing, buffer contents, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from common import presets
from vibe_rl_jax import dqn, envs, offpolicy, sac
from vibe_rl_jax import train as jax_train
from vibe_rl_jax.distributions import DiagGaussian


def test_double_dqn_target_selection():
    # Online net prefers action 1 in the next state; the target net values it at 2.0
    # (its own max would be 5.0 at action 0).
    next_online = jnp.array([[1.0, 3.0], [1.0, 3.0]])
    next_target = jnp.array([[5.0, 2.0], [5.0, 2.0]])
    reward = jnp.array([1.0, 1.0])
    terminated = jnp.array([0.0, 1.0])
    double = dqn.double_dqn_target(reward, terminated, next_online, next_target, 0.5, True)
    np.testing.assert_allclose(double, [1.0 + 0.5 * 2.0, 1.0])
    plain = dqn.double_dqn_target(reward, terminated, next_online, next_target, 0.5, False)
    np.testing.assert_allclose(plain, [1.0 + 0.5 * 5.0, 1.0])


def test_squashed_log_prob_matches_torch_transformed_distribution():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(5, 2)).astype(np.float32)
    log_std = (rng.normal(size=(5, 2)) * 0.3).astype(np.float32)
    u = rng.normal(size=(5, 2)).astype(np.float32) * 2
    low, high = np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32)
    ours_action = sac.squash(jnp.asarray(u), low, high)
    ours = sac.squashed_log_prob(DiagGaussian(jnp.asarray(mean), jnp.asarray(log_std)),
                                 jnp.asarray(u), low, high)
    T = torch.distributions.transforms
    ref_dist = torch.distributions.TransformedDistribution(
        torch.distributions.Independent(
            torch.distributions.Normal(torch.tensor(mean), torch.tensor(log_std).exp()), 1),
        [T.TanhTransform(), T.AffineTransform(torch.tensor((low + high) / 2),
                                              torch.tensor((high - low) / 2))])
    ref_action = (torch.tanh(torch.tensor(u)) * torch.tensor((high - low) / 2)
                  + torch.tensor((low + high) / 2))
    np.testing.assert_allclose(ours_action, ref_action.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, ref_dist.log_prob(ref_action).numpy(), rtol=1e-4, atol=1e-4)


def test_buffer_stores_true_final_obs_and_terminated_only():
    venv = envs.VecEnv("Pendulum-v1", 2)
    buffer = offpolicy.make_buffer(400, 8)
    obs, env_state = venv.reset(jax.random.PRNGKey(0))
    state = buffer.init(offpolicy.example_transition(venv.obs_shape, jnp.zeros((1,))))
    col = jax.jit(lambda es, o, bs: offpolicy.collect(
        venv, buffer, env_state=es, obs=o, rng=jax.random.PRNGKey(1), buffer_state=bs,
        num_steps=200, reward_scale=1.0,
        select_action=lambda k, o: (jnp.zeros((2, 1)), jnp.zeros((2, 1)))))(env_state, obs, state)
    exp = jax.tree.map(lambda x: np.asarray(x)[0], col.buffer_state.experience)  # [400, ...]
    assert float(col.episode_count) == 2.0  # both envs truncated at step 200
    assert exp["terminated"].sum() == 0.0  # truncation is not termination
    # Last transition of env 0 (item 398): next_obs continues the trajectory, it is not the reset.
    last_next = exp["next_obs"][398]
    assert np.abs(last_next - exp["obs"][398]).max() < 1.0
    assert not np.allclose(last_next, np.asarray(col.obs)[0])
    # Elsewhere next_obs of step t is obs of step t+1 (same env: item + 2).
    np.testing.assert_allclose(exp["next_obs"][:396], exp["obs"][2:398])


def small(name, updates, base, **changes):
    changes = {"exp_name": "t", "log_interval": 2, "save_interval": 2, "progress_bar": False,
               "checkpoint_base_dir": str(base), **changes}
    cfg = presets.replace(presets.get_preset(name), **changes)
    return presets.replace(cfg, total_timesteps=updates * cfg.steps_per_update)


@pytest.mark.parametrize("name, extra", [
    ("cartpole_dqn", {"algo.learning_starts": 40, "algo.batch_size": 16, "algo.buffer_size": 500,
                      "algo.target_update_interval": 3}),
    ("cartpole_dqn", {"algo.learning_starts": 40, "algo.batch_size": 16, "algo.buffer_size": 500,
                      "algo.target_update_interval": 3, "algo.n_step": 3}),
    ("pendulum_sac", {"algo.learning_starts": 40, "algo.batch_size": 16, "algo.buffer_size": 500,
                      "algo.hidden_sizes": (32, 32)}),
])
def test_offpolicy_resume_is_bit_exact(name, extra, ckpt_base):
    """Buffer, cursor, env states, RNG, targets, temperature and optimizers all resume."""
    straight = jax_train.train(small(name, 12, ckpt_base / "a", **extra))
    jax_train.train(small(name, 12, ckpt_base / "b", **extra), stop_at=6)
    resumed = jax_train.train(small(name, 12, ckpt_base / "b", resume=True, **extra))
    a = jax.tree.leaves(jax.device_get(straight.runner))
    b = jax.tree.leaves(jax.device_get(resumed.runner))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # Learning really happened in both halves (so the comparison covers the update path).
    assert not np.isnan(resumed.history[-1]["train/q_values"])


def test_dqn_update_draws_from_philox_not_threefry(ckpt_base):
    """On CPU threefry lowers to rolled while loops (~10-15 us per draw in DQN's small update);
    every draw inside DQN's update must come from the philox training key (offpolicy docstring)."""
    from vibe_rl_jax import sharding

    algo = dqn.DQN(small("cartpole_dqn", 2, ckpt_base), sharding.make_mesh(1))
    runner = algo.init(jax.random.PRNGKey(0))
    assert runner.rng.dtype == jnp.uint32 and runner.rng.shape == (2,)  # raw data: checkpointable
    hlo = jax.jit(algo.update).lower(runner).as_text()
    assert "philox" in hlo and "threefry" not in hlo


DQN_SMALL = {"algo.learning_starts": 40, "algo.batch_size": 16, "algo.buffer_size": 500,
             "algo.target_update_interval": 3}


def test_dqn_scheduler_option_is_applied_and_changes_no_parameter(ckpt_base, monkeypatch):
    """DQN's chunk compiles with the memory-optimised XLA scheduler (algorithms.py: speed only);
    the trained parameters must equal a default-scheduler compile bit for bit."""
    from vibe_rl_jax import algorithms

    seen = []
    real_compile = jax_train._compile
    monkeypatch.setattr(jax_train, "_compile",
                        lambda lowered, options: seen.append(options) or real_compile(lowered, options))
    tuned = jax_train.train(small("cartpole_dqn", 12, ckpt_base / "a", **DQN_SMALL))
    assert seen == [{"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}]
    monkeypatch.setattr(algorithms, "CPU_COMPILER_OPTIONS", {})
    plain = jax_train.train(small("cartpole_dqn", 12, ckpt_base / "b", **DQN_SMALL))
    assert seen[-1] == {}
    for x, y in zip(jax.tree.leaves(jax.device_get(tuned.runner)),
                    jax.tree.leaves(jax.device_get(plain.runner))):
        np.testing.assert_array_equal(x, y)


def test_unknown_compile_option_warns_and_trains_without_it(ckpt_base, monkeypatch, caplog):
    from vibe_rl_jax import algorithms

    monkeypatch.setattr(algorithms, "CPU_COMPILER_OPTIONS", {"dqn": {"xla_cpu_no_such_option": "1"}})
    result = jax_train.train(small("cartpole_dqn", 2, ckpt_base, **DQN_SMALL))
    assert result.final_step == 2
    assert any("xla_cpu_no_such_option" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_offpolicy_checks_action_space(ckpt_base):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="discrete action space"):
        jax_train.train(small("cartpole_dqn", 2, ckpt_base, **{"env.id": "Pendulum-v1",
                                                                "env.num_envs": 2}))
    with pytest.raises(ConfigError, match="Box"):
        jax_train.train(small("pendulum_sac", 2, ckpt_base, **{"env.id": "CartPole-v1"}))


@pytest.mark.slow
def test_cartpole_dqn_reaches_475(ckpt_base):
    cfg = presets.replace(presets.get_preset("cartpole_dqn"), exp_name="full",
                          checkpoint_base_dir=str(ckpt_base), progress_bar=False)
    result = jax_train.train(cfg)
    final = np.mean([h["train/episode_return"] for h in result.history[-10:]])
    assert final >= 475, final


@pytest.mark.slow
def test_pendulum_sac_beats_minus_250(ckpt_base):
    cfg = presets.replace(presets.get_preset("pendulum_sac"), exp_name="full",
                          checkpoint_base_dir=str(ckpt_base), progress_bar=False)
    result = jax_train.train(cfg)
    final = np.mean([h["train/episode_return"] for h in result.history[-5:]])  # last 1e4 steps
    assert final > -250, final


def test_nstep_windows_in_jax_match_the_numpy_reference():
    from tests.common.test_rl_math import nstep_example, nstep_run

    steps = nstep_example()
    for n_step in (1, 3):
        ref = nstep_run(np, n_step, 0.5, steps)
        got = nstep_run(jnp, n_step, 0.5, steps)
        for r, g in zip(ref, got):
            for key in r:
                np.testing.assert_allclose(g[key], r[key], rtol=1e-6, err_msg=key)


def test_dqn_nstep_buffer_holds_discounted_sums(ckpt_base):
    """CartPole pays 1 per step, so an m-step transition stores 1 + g + ... + g^(m-1) with
    discount g^m; windows shorter than n end their episode (terminated, or truncated at 500)."""
    gamma = 0.9
    cfg = small("cartpole_dqn", 60, ckpt_base, **{"algo.n_step": 3, "algo.gamma": gamma,
                                                  "algo.learning_starts": 10_000})
    result = jax_train.train(cfg)
    exp = jax.tree.map(lambda x: np.asarray(x)[0], result.runner.buffer.experience)
    filled = int(np.asarray(result.runner.buffer.current_index))  # 60 x 10 - 2 x 10 added
    assert filled == (60 - 2) * 10
    reward, discount = exp["reward"][:filled], exp["discount"][:filled]
    m = np.rint(np.log(discount) / np.log(gamma)).astype(int)
    assert set(m) <= {1, 2, 3} and (m == 3).mean() > 0.8
    np.testing.assert_allclose(reward, (1 - gamma**m) / (1 - gamma), rtol=1e-6)
    assert exp["terminated"][:filled][m < 3].all()  # no truncation within 60 steps
    assert exp["terminated"][:filled].sum() > 0
