"""The LeRobot adapter, resumable batching and norm-stats computation on a tiny generated dataset."""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("lerobot")

from common import lerobot_data as ld  # noqa: E402
from common import normalize  # noqa: E402
from common.config import ConfigError  # noqa: E402

EPISODE_LENGTHS = (12, 20, 9)
FPS = 10
HORIZON = 4


def _frame(episode, t, rng):
    return {
        "observation.state": np.array([episode, t, rng.normal()], np.float32),
        "action": np.array([100 * episode + t, -t], np.float32),
        "observation.images.top": rng.integers(0, 255, (6, 8, 3), dtype=np.uint8),
        "next.reward": np.array([float(t == 0)], np.float32),
        "task": "test",
    }


@pytest.fixture(scope="module")
def dataset_root(hf_home, tmp_path_factory):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path_factory.mktemp("data") / "tiny"
    features = {
        "observation.state": {"dtype": "float32", "shape": (3,), "names": None},
        "action": {"dtype": "float32", "shape": (2,), "names": None},
        "observation.images.top": {"dtype": "image", "shape": (6, 8, 3),
                                   "names": ["height", "width", "channel"]},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
    }
    dataset = LeRobotDataset.create("test/tiny", fps=FPS, features=features, root=root,
                                    use_videos=False)
    rng = np.random.default_rng(0)
    for episode, length in enumerate(EPISODE_LENGTHS):
        for t in range(length):
            dataset.add_frame(_frame(episode, t, rng))
        ld.save_episode(dataset)
    dataset.finalize()
    return root


@pytest.fixture(scope="module")
def config(dataset_root):
    return ld.DataConfig(repo_id="test/tiny", root=str(dataset_root), action_horizon=HORIZON,
                         image_keys=("observation.images.top",), batch_size=4, prefetch=2)


@pytest.fixture(scope="module")
def source(config):
    return ld.open_dataset(config)


def _ends():
    return np.cumsum(EPISODE_LENGTHS)


def test_delta_timestamps_from_fps_and_horizon(source):
    assert ld.action_delta_timestamps(10, 4) == [0.0, 0.1, 0.2, 0.3]
    assert source.delta_timestamps == {"action": [0.0, 0.1, 0.2, 0.3]}
    np.testing.assert_array_equal(source.delta_indices["action"], [0, 1, 2, 3])
    assert len(source) == sum(EPISODE_LENGTHS) and source.num_episodes == 3 and source.fps == FPS


def test_batches_match_lerobot_getitem(source):
    """Every frame: our vectorised read == LeRobotDataset.__getitem__ (the reference reader)."""
    indices = np.arange(len(source))
    batch = source.get_batch(indices)
    assert batch["action"].shape == (len(source), HORIZON, 2)
    assert batch["action_is_pad"].shape == (len(source), HORIZON)
    assert batch["observation.images.top"].shape == (len(source), 6, 8, 3)
    assert batch["observation.images.top"].dtype == np.uint8
    for i in indices:
        item = source.dataset[int(i)]
        np.testing.assert_array_equal(batch["observation.state"][i], item["observation.state"].numpy())
        np.testing.assert_array_equal(batch["action"][i], item["action"].numpy())
        np.testing.assert_array_equal(batch["action_is_pad"][i], item["action_is_pad"].numpy())
        image = (item["observation.images.top"].numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(batch["observation.images.top"][i], image.transpose(1, 2, 0))
        assert batch["episode_index"][i] == item["episode_index"].item()


def test_action_chunks_pad_at_episode_end(source):
    last = _ends()[0] - 1  # last frame of episode 0 (t = 11)
    sample = source[int(last) - 1]  # t = 10: one real step after it
    np.testing.assert_array_equal(sample["action_is_pad"], [False, False, True, True])
    np.testing.assert_array_equal(sample["action"][:, 0], [10, 11, 11, 11])  # padded = repeated last
    first_of_next = source[int(last) + 1]
    np.testing.assert_array_equal(first_of_next["action"][:, 0], [100, 101, 102, 103])
    assert not first_of_next["action_is_pad"].any()


def test_unit_shape_features_keep_their_shape(source):
    """lerobot stores shape-(1,) features as scalar columns; we hand them back as (B, 1)."""
    source_with_reward = ld.LeRobotSource(source.dataset, source.delta_timestamps,
                                          [*source.keys, "next.reward"])
    batch = source_with_reward.get_batch([0, 1])
    np.testing.assert_array_equal(batch["next.reward"], [[1.0], [0.0]])


def test_missing_key_error_names_key_flag_and_version(config):
    bad = ld.DataConfig(root=config.root, state_key="observation.joints")
    with pytest.raises(ld.DatasetError) as info:
        ld.open_dataset(bad)
    message = str(info.value)
    assert "'observation.joints'" in message and "--data.state-key" in message
    assert "observation.state" in message  # lists what exists
    with pytest.raises(ld.DatasetError, match="'observation.state'.*not an image"):
        ld.open_dataset(ld.DataConfig(root=config.root, image_keys=("observation.state",)))


def test_video_features_are_refused_with_the_reason():
    features = {"observation.state": {"dtype": "float32", "shape": [2]},
                "action": {"dtype": "float32", "shape": [2]},
                "observation.images.top": {"dtype": "video", "shape": [6, 8, 3]}}
    config = ld.DataConfig(root="x", image_keys=("observation.images.top",))
    with pytest.raises(ld.DatasetError, match="video.*dtype 'image'"):
        ld._check_features(features, config, "ds")


def test_missing_unfinalized_and_old_datasets_are_clear_errors(dataset_root, tmp_path):
    with pytest.raises(ld.DatasetError, match="collect_demos.py"):
        ld.open_dataset(ld.DataConfig(root=str(tmp_path / "nothing")))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(dataset_root, unfinished)
    shutil.rmtree(unfinished / "meta" / "episodes")
    with pytest.raises(ld.DatasetError, match="finalize"):
        ld.open_dataset(ld.DataConfig(root=str(unfinished)))
    old = tmp_path / "old"
    shutil.copytree(dataset_root, old)
    info = json.loads((old / "meta" / "info.json").read_text())
    info["codebase_version"] = "v2.1"
    (old / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ld.DatasetError, match=r"'v2.1'.*v3.0.*lerobot 0.4"):
        ld.open_dataset(ld.DataConfig(root=str(old)))


def test_hub_download_refused_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ld.DatasetError, match="--data.root"):
        ld.open_dataset(ld.DataConfig(repo_id="lerobot/pusht", root=None))


def test_data_config_validation():
    with pytest.raises(ConfigError, match="--data.action-horizon"):
        ld.DataConfig(action_horizon=0)
    with pytest.raises(ConfigError, match="--data.batch-size"):
        ld.DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="duplicate image names"):
        ld.repack_structure(ld.DataConfig(image_keys=("a.top", "b.top")))


# --- order and resume -----------------------------------------------------------------


def test_shuffle_order_epochs_are_permutations():
    order = ld.ShuffleOrder(num_samples=10, batch_size=3, seed=7)
    assert order.batches_per_epoch == 3
    position, seen = order.start(), []
    for _ in range(3):
        seen.append(order.indices(position))
        position = order.advance(position)
    assert position == {"seed": 7, "epoch": 1, "index": 0}
    flat = np.concatenate(seen)
    assert len(set(flat.tolist())) == 9  # drop_last: 9 of 10, no repeats
    assert not np.array_equal(order.permutation(0), order.permutation(1))
    np.testing.assert_array_equal(order.permutation(1), ld.ShuffleOrder(10, 3, seed=7).permutation(1))
    assert not np.array_equal(order.permutation(0), ld.ShuffleOrder(10, 3, seed=8).permutation(0))
    assert order.advance(order.start(), 7) == {"seed": 7, "epoch": 2, "index": 3}


def test_shards_partition_each_global_batch():
    orders = [ld.ShuffleOrder(20, 3, seed=1, shard_index=i, num_shards=2) for i in range(2)]
    position = orders[0].start()
    for _ in range(5):
        parts = [o.indices(position) for o in orders]
        assert all(len(p) == 3 for p in parts)
        assert not set(parts[0]) & set(parts[1])
        position = orders[0].advance(position)
    with pytest.raises(ld.DatasetError, match="fewer than one batch of"):
        ld.ShuffleOrder(5, 3, num_shards=2)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_continues_at_the_same_sample(config, source, prefetch):
    """2k batches straight == k batches, save, new iterator, restore, k batches (across epochs)."""
    k = 14  # 41 frames / batch 4 = 10 batches per epoch: the run crosses two epoch boundaries
    straight = ld.make_batch_iterator(config, source)
    straight.prefetch = prefetch
    expected = _take(straight, 2 * k)
    first = ld.make_batch_iterator(config, source)
    first.prefetch = prefetch
    head = _take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # it must survive serialisation
    first.close()
    assert state == {"seed": 0, "epoch": 1, "index": 16, "num_samples": 41, "global_batch": 4}
    resumed = ld.make_batch_iterator(config, source)
    resumed.prefetch = prefetch
    resumed.load_state_dict(state)
    _assert_same_batches(head + _take(resumed, k), expected)
    straight.close()
    resumed.close()


def test_torch_loader_same_order_and_resume(config, source):
    torch = pytest.importorskip("torch")
    numpy_batches = _take(ld.make_batch_iterator(config, source), 6)
    loader = ld.make_torch_loader(config, source)
    head = _take(loader, 3)
    assert isinstance(head[0]["action"], torch.Tensor)
    state = loader.state_dict()
    resumed = ld.make_torch_loader(config, source)
    resumed.load_state_dict(state)
    _assert_same_batches(head + _take(resumed, 3), numpy_batches)
    assert loader.batches == 3 and loader.data_wait_s > 0


def test_torch_loader_with_workers(config, source):
    pytest.importorskip("torch")
    workers = ld.DataConfig(**{**config.__dict__, "num_workers": 2})
    expected = _take(ld.make_batch_iterator(config, source), 4)
    loader = ld.make_torch_loader(workers, source)
    got = _take(loader, 4)
    _assert_same_batches(got, expected)
    assert loader.state_dict()["index"] == 16


def test_restore_rejects_a_different_run(config, source):
    iterator = ld.make_batch_iterator(config, source)
    state = iterator.state_dict()
    with pytest.raises(ValueError, match="seed 0.*--data.seed"):
        ld.make_batch_iterator(ld.DataConfig(**{**config.__dict__, "seed": 1}), source) \
            .load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch=4.*8"):
        ld.make_batch_iterator(ld.DataConfig(**{**config.__dict__, "batch_size": 8}), source) \
            .load_state_dict(state)


def test_transform_device_put_hook_and_data_wait(config, source):
    seen = []

    def device_put(batch):
        seen.append(batch["state"].shape)
        return {"on_device": batch}

    group = ld.repack_transforms(config)
    iterator = ld.make_batch_iterator(config, source, transform=group.input_fn(),
                                      device_put=device_put)
    out = next(iterator)
    assert set(out["on_device"]) == {"state", "actions", "actions_is_pad", "images"}
    assert out["on_device"]["images"]["top"].shape == (4, 6, 8, 3)
    assert seen[0] == (4, 3)
    assert iterator.batches == 1 and iterator.data_wait_s > 0
    assert iterator.pop_data_wait() > 0 and iterator.data_wait_s == 0
    iterator.close()


def test_producer_errors_reach_the_consumer(config, source):
    def broken(batch):
        raise RuntimeError("transform exploded")

    iterator = ld.make_batch_iterator(config, source, transform=broken)
    with pytest.raises(RuntimeError, match="exploded"):
        next(iterator)


# --- norm stats ---------------------------------------------------------------------


def _reference_stats():
    """The exact values written by the fixture: states per frame, actions per valid chunk step."""
    rng = np.random.default_rng(0)
    states, actions = [], []
    for episode, length in enumerate(EPISODE_LENGTHS):
        frames = [_frame(episode, t, rng) for t in range(length)]
        episode_actions = np.stack([f["action"] for f in frames])
        states += [f["observation.state"] for f in frames]
        for t in range(length):
            actions.append(episode_actions[t:t + HORIZON])  # steps past the end are padding
    return np.stack(states).astype(np.float64), np.concatenate(actions).astype(np.float64)


def test_compute_norm_stats_matches_the_data(config, source):
    stats = ld.compute_norm_stats(config, source=source, batch_size=7)
    states, actions = _reference_stats()
    for key, data in (("state", states), ("actions", actions)):
        np.testing.assert_allclose(stats[key].mean, data.mean(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key].std, data.std(0), rtol=1e-6)
        np.testing.assert_allclose(stats[key].q01, np.quantile(data, 0.01, axis=0),
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats[key].q99, np.quantile(data, 0.99, axis=0),
                                   rtol=1e-4, atol=1e-6)


def test_max_frames_takes_a_seeded_subset(config, source):
    a = ld.compute_norm_stats(config, source=source, max_frames=15)
    b = ld.compute_norm_stats(config, source=source, max_frames=15)
    full = ld.compute_norm_stats(config, source=source)
    np.testing.assert_array_equal(a["state"].mean, b["state"].mean)
    assert not np.allclose(a["state"].mean, full["state"].mean)


def test_normalized_batches_and_missing_stats(config, source, tmp_path):
    with pytest.raises(FileNotFoundError, match="compute_norm_stats.py my_preset"):
        ld.load_norm_stats(ld.DataConfig(root=config.root, assets_dir=str(tmp_path)), "my_preset")
    stats = ld.compute_norm_stats(config, source=source)
    path = normalize.save(ld.norm_stats_path(ld.DataConfig(assets_dir=str(tmp_path)), "my_preset"),
                          stats)
    assert path == tmp_path / "my_preset" / "norm_stats.json"
    loaded = ld.load_norm_stats(ld.DataConfig(assets_dir=str(tmp_path)), "my_preset")
    group = ld.repack_transforms(config).push(
        inputs=ld.norm_transforms(config, loaded).inputs,
        outputs=ld.norm_transforms(config, loaded).outputs)
    batch = group.input_fn()(source.get_batch(np.arange(len(source))))
    np.testing.assert_allclose(batch["state"].mean(0), 0, atol=1e-5)
    back = group.output_fn()({"actions": batch["actions"]})
    np.testing.assert_allclose(back["actions"], source.get_batch(np.arange(len(source)))["action"],
                               atol=1e-3)


def test_compute_norm_stats_script(config, dataset_root, tmp_path):
    from tests.conftest import run_script

    output = tmp_path / "stats" / "norm_stats.json"
    result = run_script(["scripts/compute_norm_stats.py", "--data.root", str(dataset_root),
                         "--output", str(output), "--batch-size", "16",
                         "--data.action-horizon", str(HORIZON)],
                        env={"HF_HOME": os.environ.get("HF_HOME", str(tmp_path))})
    assert result.returncode == 0, result.stderr[-3000:]
    stats = normalize.load(output)
    expected = ld.compute_norm_stats(config, source=ld.open_dataset(config))
    np.testing.assert_allclose(stats["actions"].q99, expected["actions"].q99)


def test_compute_norm_stats_preset_spellings(monkeypatch):
    import scripts.compute_norm_stats as script

    assert script.split_preset(["p1", "--max-frames", "3"]) == ("p1", ["--max-frames", "3"])
    assert script.split_preset(["--config-name", "p2", "--x"]) == ("p2", ["--x"])
    assert script.split_preset(["--config-name=p3"]) == ("p3", [])
    assert script.split_preset(["--data.root", "d"]) == (None, ["--data.root", "d"])
    with pytest.raises(SystemExit):
        script.main(["--config-name", "no_such_preset"])
    with pytest.raises(SystemExit):
        script.main(["cartpole_ppo"])  # an RL preset has no dataset
    with pytest.raises(ConfigError, match="no data config"):
        script.preset_data_config("cartpole_ppo")
