"""scripts/collect_demos.py: expert and checkpoint policies -> LeRobot datasets that the adapter reads."""

import os
import pathlib

import numpy as np
import pytest

pytest.importorskip("lerobot")
pytest.importorskip("gymnasium")

import scripts.collect_demos as collect_demos  # noqa: E402
from common import lerobot_data as ld  # noqa: E402
from common import two_goal as tg  # noqa: E402


@pytest.fixture(scope="module")
def expert_demos(hf_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("demos") / "two_goal"
    summary = collect_demos.collect(collect_demos.Args(root=str(root), num_episodes=100, seed=0))
    return root, summary


def test_expert_demos_are_a_readable_dataset(expert_demos):
    root, summary = expert_demos
    assert summary["episodes"] == 100 and summary["success_rate"] == 1.0
    source = ld.open_dataset(ld.DataConfig(root=str(root), action_horizon=4))
    assert len(source) == summary["frames"] and source.num_episodes == 100
    assert source.fps == 10
    batch = source.get_batch(np.arange(len(source)))
    for key in ("next.success", "next.done", "next.reward"):
        assert key in source.features
    ends = np.flatnonzero(np.r_[batch["episode_index"][1:] != batch["episode_index"][:-1], True])
    done = source.dataset.hf_dataset.with_format("numpy")["next.done"]
    success = source.dataset.hf_dataset.with_format("numpy")["next.success"]
    np.testing.assert_array_equal(np.flatnonzero(done), ends)
    np.testing.assert_array_equal(np.flatnonzero(success), ends)
    # Both goals appear: the first action of each episode points left or right, about evenly.
    first = batch["action"][batch["frame_index"] == 0][:, 0, 0]
    assert 30 <= np.sum(first > 0) <= 70 and np.all(np.abs(first) > 0.05)


def test_regression_on_collected_demos_fails_where_expert_succeeds(expert_demos):
    """A least-squares policy fitted to the dataset averages the modes: < 20% vs the expert's > 95%."""
    root, summary = expert_demos
    source = ld.open_dataset(ld.DataConfig(root=str(root), action_horizon=1))
    batch = source.get_batch(np.arange(len(source)))
    states, actions = batch["observation.state"], batch["action"][:, 0]
    features = lambda x: np.c_[x, np.ones(len(x))]  # noqa: E731
    weights, *_ = np.linalg.lstsq(features(states), actions, rcond=None)
    params = tg.TwoGoalParams()
    starts = tg.sample_start(params, np.random.default_rng(123), 200)
    regression = tg.rollout(params, lambda x: features(x) @ weights, starts)["success"].mean()
    expert = tg.ScriptedExpert(params, seed=5)
    expert.reset(200)
    assert summary["success_rate"] > 0.95
    assert tg.rollout(params, expert, starts)["success"].mean() > 0.95
    assert regression < 0.2


def test_expert_noise_records_clean_actions(hf_home, tmp_path):
    args = collect_demos.Args(root=str(tmp_path / "noisy"), num_episodes=3, expert_noise=0.03)
    collect_demos.collect(args)
    source = ld.open_dataset(ld.DataConfig(root=args.root, action_horizon=1))
    batch = source.get_batch(np.arange(len(source)))
    early = batch["frame_index"] < 5
    speeds = np.linalg.norm(batch["action"][early, 0], axis=-1)
    np.testing.assert_allclose(speeds, tg.TwoGoalParams().max_speed, rtol=1e-5)  # clean labels
    y = batch["observation.state"][:, 1]
    assert np.any(np.abs(np.diff(y)[batch["frame_index"][1:] > 0] - 0.0707) > 0.005)  # noisy path


class _FakePolicy:
    """Stands in for common.policy.create_trained_policy's Policy (infer on {"observation": obs})."""

    def __init__(self, action_fn):
        self.action_fn, self.calls = action_fn, 0

    def infer(self, obs):
        assert set(obs) == {"observation"}
        self.calls += 1
        return {"actions": self.action_fn(obs["observation"])}


@pytest.mark.parametrize("env_id, action_fn, dtype, shape", [
    ("Pendulum-v1", lambda obs: np.array([0.5], np.float32), np.float32, (1,)),
    ("CartPole-v1", lambda obs: np.int64(obs[2] > 0), np.int64, (1,)),
    ("MountainCarContinuous-v0", lambda obs: np.array([1.0], np.float32), np.float32, (1,)),
])
def test_checkpoint_policy_on_gymnasium_envs(hf_home, tmp_path, monkeypatch, env_id, action_fn,
                                             dtype, shape):
    import common.policy

    checkpoint = tmp_path / "checkpoints" / "run"
    checkpoint.mkdir(parents=True)
    policy = _FakePolicy(action_fn)
    monkeypatch.setattr(common.policy, "create_trained_policy", lambda path: policy)
    root = tmp_path / "demos"
    summary = collect_demos.collect(collect_demos.Args(
        root=str(root), env=env_id, policy=str(checkpoint), num_episodes=2,
        max_episode_steps=12))
    assert summary["frames"] == 24 and policy.calls == 24
    source = ld.open_dataset(ld.DataConfig(root=str(root), action_horizon=2))
    batch = source.get_batch(np.arange(len(source)))
    assert batch["action"].dtype == dtype and batch["action"].shape == (24, 2, *shape)
    assert batch["observation.state"].shape[1:] == source.dataset.meta.features[
        "observation.state"]["shape"]


class _FakeChunkPolicy:
    """A chunk policy: 4 actions per query, action j of query n is 10 * n + j (run 3 of them)."""

    metadata = {"action_spec": {"type": "chunk"}, "execute_horizon": 3}

    def __init__(self):
        self.calls = 0

    def infer(self, obs):
        self.calls += 1
        n = self.calls - 1
        return {"actions": np.array([[10.0 * n + j] for j in range(4)], np.float32) / 100.0}


def test_chunk_policy_runs_with_its_receding_horizon(hf_home, tmp_path, monkeypatch):
    import common.policy

    checkpoint = tmp_path / "checkpoints" / "flow"
    checkpoint.mkdir(parents=True)
    policy = _FakeChunkPolicy()
    monkeypatch.setattr(common.policy, "create_trained_policy", lambda path: policy)
    root = tmp_path / "demos"
    summary = collect_demos.collect(collect_demos.Args(
        root=str(root), env="Pendulum-v1", policy=str(checkpoint), num_episodes=2,
        max_episode_steps=7))
    # 7 steps per episode at 3 actions per chunk: 3 queries, the queue is cleared at each reset.
    assert summary["frames"] == 14 and policy.calls == 6
    assert "3 actions executed per chunk" in summary["policy"]
    source = ld.open_dataset(ld.DataConfig(root=str(root), action_horizon=1))
    actions = source.get_batch(np.arange(len(source)))["action"][:, 0, 0] * 100.0
    first = [0, 1, 2, 10, 11, 12, 20]
    np.testing.assert_allclose(actions, first + [30 + a for a in first], atol=1e-4)


def test_errors_say_what_to_do(hf_home, tmp_path):
    with pytest.raises(SystemExit, match="scripted expert of vibe_rl/TwoGoal-v0"):
        collect_demos.collect(collect_demos.Args(root=str(tmp_path / "a"), env="Pendulum-v1"))
    with pytest.raises(SystemExit, match="neither 'expert' nor an existing checkpoint"):
        collect_demos.collect(collect_demos.Args(root=str(tmp_path / "b"), policy="nope/nothing"))
    existing = tmp_path / "c"
    existing.mkdir()
    with pytest.raises(SystemExit, match="--overwrite"):
        collect_demos.collect(collect_demos.Args(root=str(existing), num_episodes=1))


def test_cli_with_images(hf_home, tmp_path):
    from tests.conftest import run_script

    root = tmp_path / "with_images"
    result = run_script(["scripts/collect_demos.py", "--root", str(root), "--num-episodes", "3",
                         "--images", "--image-size", "32", "--seed", "4"],
                        env={"HF_HOME": os.environ["HF_HOME"]})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote 3 episodes" in result.stderr
    source = ld.open_dataset(ld.DataConfig(root=str(root), image_keys=(collect_demos.IMAGE_KEY,)))
    sample = source[0]
    image = sample[collect_demos.IMAGE_KEY]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    red, green = image[..., 0].astype(int), image[..., 1].astype(int)
    assert np.any(green > 100) and np.any((red > 100) & (green < red))  # goals and the agent
    assert not pathlib.Path(root, "images").exists() or not any(pathlib.Path(root, "images").rglob("*.png"))
