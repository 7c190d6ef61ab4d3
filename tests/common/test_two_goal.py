"""The two-goal task: dynamics, the bimodal expert, the gymnasium env, and why mean regression fails."""

import numpy as np
import pytest

from common import two_goal as tg

P = tg.TwoGoalParams()


def test_actions_are_clipped_to_max_speed():
    action = np.array([[3.0, 4.0], [0.03, 0.04]], np.float32)
    clipped = tg.clip_action(P, action)
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=-1), [P.max_speed, 0.05], rtol=1e-6)
    np.testing.assert_allclose(clipped[0] / np.linalg.norm(clipped[0]), [0.6, 0.8], rtol=1e-6)


def test_step_success_termination_and_time_limit():
    goal = np.array(P.goals[1], np.float32)
    near = (goal - np.array([0.15, 0.0], np.float32))[None]
    out = tg.step(P, near, np.array([[0.1, 0.0]], np.float32), t=0)
    assert out["success"][0] and out["terminated"][0] and not out["truncated"][0]
    assert out["reward"][0] == 1.0
    far = np.zeros((1, 2), np.float32)
    out = tg.step(P, far, np.zeros((1, 2), np.float32), t=P.max_steps - 2)
    assert not out["truncated"][0]
    out = tg.step(P, far, np.zeros((1, 2), np.float32), t=P.max_steps - 1)
    assert out["truncated"][0] and not out["terminated"][0] and out["reward"][0] == 0.0
    out = tg.step(P, np.array([[1.49, 0.0]], np.float32), np.array([[0.1, 0.0]], np.float32), t=0)
    assert out["position"][0, 0] == pytest.approx(P.bound)


def test_step_runs_in_jax_with_the_same_result():
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(0)
    position = rng.uniform(-1, 1, (8, 2)).astype(np.float32)
    action = rng.normal(0, 0.2, (8, 2)).astype(np.float32)
    ref = tg.step(P, position, action, 3)
    out = tg.step(P, jnp.asarray(position), jnp.asarray(action), 3, xp=jnp)
    for key in ("position", "reward", "success", "truncated"):
        np.testing.assert_allclose(np.asarray(out[key]), ref[key], atol=1e-6)


def _expert_rollout(n, seed):
    expert = tg.ScriptedExpert(P, seed=seed)
    goals = expert.reset(n)
    result = tg.rollout(P, expert, tg.sample_start(P, np.random.default_rng(seed + 1), n))
    return goals, result


def test_expert_succeeds_and_is_bimodal():
    goals, result = _expert_rollout(400, seed=0)
    assert result["success"].mean() > 0.95
    assert result["length"].max() <= P.max_steps
    # Goals are chosen uniformly: 400 fair coin flips stay within 5 sigma of 200.
    assert abs(np.sum(goals == 1) - 200) < 5 * np.sqrt(100)
    first_actions = result["actions"][0]
    assert np.all(np.sign(first_actions[:, 0]) == np.where(goals == 1, 1, -1))
    np.testing.assert_allclose(np.linalg.norm(first_actions, axis=-1), P.max_speed, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_least_squares_regressor_fails_where_expert_succeeds(seed):
    """Mean regression averages the two modes (straight up) and reaches neither goal."""
    _, demos = _expert_rollout(200, seed=seed)
    obs = demos["observations"][demos["active"]]
    actions = demos["actions"][demos["active"]]
    features = lambda x: np.c_[x, np.ones(len(x))]  # noqa: E731
    weights, *_ = np.linalg.lstsq(features(obs), actions, rcond=None)
    starts = tg.sample_start(P, np.random.default_rng(100 + seed), 200)
    regressor = tg.rollout(P, lambda x: features(x) @ weights, starts)
    expert = tg.ScriptedExpert(P, seed=seed + 50)
    expert.reset(200)
    assert tg.rollout(P, expert, starts)["success"].mean() > 0.95
    assert regressor["success"].mean() < 0.2
    # It fails by going up between the goals, not by standing still.
    final = regressor["observations"][regressor["length"] - 1, np.arange(200)]
    assert np.median(np.abs(final[:, 0])) < 0.5 and np.median(final[:, 1]) > 0.5


def test_gymnasium_env_registered_and_valid():
    gym = pytest.importorskip("gymnasium")
    from gymnasium.utils.env_checker import check_env

    from common import two_goal_gym  # noqa: F401

    env = gym.make(tg.ENV_ID, render_mode="rgb_array")
    check_env(env.unwrapped, skip_render_check=False)
    obs, info = env.reset(seed=3)
    assert obs.shape == (2,) and obs.dtype == np.float32 and info["success"] is False
    expert = tg.ScriptedExpert(env.unwrapped.params, seed=0)
    expert.reset(1)
    steps, terminated, truncated = 0, False, False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, info = env.step(expert(obs))
        steps += 1
    assert terminated and info["success"] and reward == 1.0 and steps <= P.max_steps
    image = env.render()
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.max() > 0
    # A policy that never moves is truncated at the time limit, without success.
    env.reset(seed=0)
    for _ in range(P.max_steps):
        _, _, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert truncated and not terminated and not info["success"]


def test_module_import_keeps_common_framework_free():
    import subprocess
    import sys

    code = ("import sys, common.two_goal, common.transforms, common.normalize, common.lerobot_data; "
            "bad = [m for m in ('jax', 'torch', 'gymnasium', 'lerobot') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
