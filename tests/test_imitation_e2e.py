"""Imitation end to end, as the README recipe runs it: collect demos -> norm stats -> train -> evaluate.

Each step goes through the scripts' own entry points in-process (collect_demos.main,
compute_norm_stats.main, presets.cli + entrypoint.run = scripts/train.py), with
only paths and run length changed on the command line.

Two-goal task: the flow policy succeeds in >= 90% of evaluation episodes (JAX
and Torch), the regression baseline (same data and network) fails (< 50%): it
averages the two goals. Pendulum-v1: a short PPO run is the expert; the flow policy trained on
its demos gets within 10% of the expert's return on the same evaluation seeds.
"""

import pathlib

import numpy as np
import pytest

pytest.importorskip("lerobot")

import scripts.collect_demos as collect_demos  # noqa: E402
import scripts.compute_norm_stats as compute_norm_stats  # noqa: E402
from common import chunk_eval, entrypoint, presets  # noqa: E402
from common.policy import create_trained_policy  # noqa: E402
from common import imitation  # noqa: E402

pytestmark = pytest.mark.slow


def _train(preset: str, base: pathlib.Path, *flags: str):
    config = presets.cli([preset, "--exp-name", "f1", "--checkpoint-base-dir", str(base),
                          "--no-progress-bar", *flags])
    return entrypoint.run(config)


def _served_chunk_fn(run_dir):
    policy = create_trained_policy(run_dir, deterministic=False)
    return lambda obs: policy.infer_batch({"observation": obs})["actions"]


@pytest.fixture(scope="module")
def two_goal_flags(hf_home, tmp_path_factory):
    """200 scripted-expert demos and their norm stats; the data flags that point a preset at them."""
    base = tmp_path_factory.mktemp("two_goal")
    root, stats = base / "data" / "two_goal", base / "assets" / "norm_stats.json"
    collect_demos.main(["--root", str(root), "--num-episodes", "200"])
    data_flags = ["--data.root", str(root), "--data.norm-stats-path", str(stats)]
    assert compute_norm_stats.main(["two_goal_flow", *data_flags]) == stats
    return data_flags


def test_two_goal_flow_succeeds_where_regression_fails(two_goal_flags, tmp_path):
    data_flags = two_goal_flags
    flow = _train("two_goal_flow", tmp_path / "ck", *data_flags)
    regression = _train("two_goal_regression", tmp_path / "ck", *data_flags)
    wait = max(h["perf/data_wait_frac"] for h in flow.history if "perf/data_wait_frac" in h)
    print(f"\ntwo-goal success: flow {flow.eval['success_rate']:.2f} "
          f"({flow.train_seconds:.1f} s, data wait <= {wait:.1%}), regression "
          f"{regression.eval['success_rate']:.2f} ({regression.train_seconds:.1f} s)")
    assert flow.eval["success_rate"] >= 0.9
    assert regression.eval["success_rate"] < 0.5
    # The served checkpoint (norm stats from its assets/) does as well as the in-training eval.
    config = presets.get_preset("two_goal_flow")
    served = chunk_eval.evaluate(_served_chunk_fn(flow.run_dir), config.env.id, episodes=200,
                                 execute_horizon=config.algo.execute_horizon,
                                 seed=imitation.EVAL_SEED + 1000)
    print(f"two-goal served flow policy: success {served['success_rate']:.2f}")
    assert served["success_rate"] >= 0.9


@pytest.fixture(scope="module")
def pendulum_demos(hf_home, tmp_path_factory):
    """An RL expert, its demos and norm stats, and its return on the flow evaluation seeds."""
    tmp = tmp_path_factory.mktemp("pendulum")
    # The expert: 200k steps of pendulum_ppo (~10 s; mean return about -150).
    expert = _train("pendulum_ppo", tmp / "ck", "--total-timesteps", "204800")
    root, stats = tmp / "data" / "pendulum", tmp / "assets" / "norm_stats.json"
    collect_demos.main(["--env", "Pendulum-v1", "--policy", str(expert.run_dir),
                        "--num-episodes", "30", "--root", str(root)])
    data_flags = ["--data.root", str(root), "--data.norm-stats-path", str(stats)]
    compute_norm_stats.main(["pendulum_flow", *data_flags])
    # The expert on the flow policy's evaluation seeds, one action per step.
    expert_policy = create_trained_policy(expert.run_dir)
    expert_eval = chunk_eval.evaluate(
        lambda obs: expert_policy.infer_batch({"observation": obs})["actions"][:, None],
        "Pendulum-v1", episodes=presets.get_preset("pendulum_flow").algo.eval_episodes,
        execute_horizon=1, seed=imitation.EVAL_SEED)
    assert expert_eval["episode_return"] > -250  # the expert swings up and balances
    return data_flags, expert_eval["episode_return"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_pendulum_flow_matches_the_rl_expert(pendulum_demos, backend, tmp_path):
    data_flags, expert_return = pendulum_demos
    flow = _train("pendulum_flow", tmp_path / "ck", *data_flags, "--backend", backend)
    flow_return = flow.eval["episode_return"]
    print(f"\npendulum return ({backend}): flow {flow_return:.1f} ({flow.train_seconds:.1f} s), "
          f"expert {expert_return:.1f}")
    # Returns are negative: "90% of the expert" = at most 10% worse than the expert.
    assert flow_return >= expert_return - 0.1 * abs(expert_return)
    assert np.isfinite(flow_return)


def test_two_goal_flow_on_the_torch_backend(two_goal_flags, tmp_path):
    """The same recipe with --backend torch: same data, same preset, same threshold."""
    flow = _train("two_goal_flow", tmp_path / "ck", *two_goal_flags, "--backend", "torch")
    wait = max(h["perf/data_wait_frac"] for h in flow.history if "perf/data_wait_frac" in h)
    print(f"\ntwo-goal success (torch): flow {flow.eval['success_rate']:.2f} "
          f"({flow.train_seconds:.1f} s, data wait <= {wait:.1%})")
    assert flow.eval["success_rate"] >= 0.9
    config = presets.get_preset("two_goal_flow")
    served = chunk_eval.evaluate(_served_chunk_fn(flow.run_dir), config.env.id, episodes=200,
                                 execute_horizon=config.algo.execute_horizon,
                                 seed=imitation.EVAL_SEED + 1000)
    print(f"two-goal served torch flow policy: success {served['success_rate']:.2f}")
    assert served["success_rate"] >= 0.9
