"""Checkpoint conversion: bit-identical round trips, assets and provenance, the Torch loader,
same actions from both backends for every preset, strict errors, and the script."""

import json

import numpy as np
import pytest
import safetensors

from common import policy as policy_lib
from common import run_dir as run_dir_lib
from convert import canonical
from convert.canonical import CanonicalParamsError
from convert.checkpoint import ConversionError, convert_checkpoint
from tests.conftest import run_script
from tests.convert import helpers
from vibe_rl_jax import checkpoints as jax_checkpoints
from vibe_rl_torch import checkpoints as torch_checkpoints


def _jax_leaves(step_dir):
    return canonical.flatten(jax_checkpoints.load_params(step_dir))


def test_jax_to_torch_to_jax_is_bit_identical_and_carries_assets(tmp_path):
    _, src = helpers.jax_checkpoint(tmp_path / "ck", "pendulum_ppo", with_norm_stats=True)
    to_torch = convert_checkpoint(src, "torch", tmp_path / "torch_run")
    back = convert_checkpoint(to_torch.step_dir, "jax", tmp_path / "jax_run")
    assert to_torch.step_dir == tmp_path / "torch_run" / "7"
    assert "agree" in to_torch.verified and "agree" in back.verified

    original, again = _jax_leaves(src), _jax_leaves(back.step_dir)
    assert sorted(original) == sorted(again)
    for name, value in original.items():
        assert again[name].dtype == value.dtype and again[name].shape == value.shape, name
        assert again[name].tobytes() == value.tobytes(), name  # bit for bit
    assert to_torch.params_sha256 == back.params_sha256 == canonical.digest(
        torch_checkpoints.load_params(to_torch.step_dir))

    torch_step = to_torch.step_dir
    assert policy_lib.detect_backend(torch_step) == "torch"
    assert sorted(p.name for p in torch_step.iterdir()) == ["assets", "params"]  # no train_state
    with safetensors.safe_open(torch_step / "params" / "model.safetensors", "np") as f:
        assert f.metadata()["source_backend"] == "jax"
        assert "actor/dense_0/kernel" in f.keys() and "obs_normalizer/var" in f.keys()
    assets = torch_step / run_dir_lib.ASSETS_DIR
    assert sorted(p.name for p in assets.iterdir()) == ["config.json", "norm_stats.json",
                                                         "provenance.json"]
    assert json.loads((assets / "config.json").read_text())["backend"] == "torch"
    assert json.loads((back.step_dir / "assets" / "config.json").read_text())["backend"] == "jax"
    assert (json.loads((assets / "norm_stats.json").read_text())
            == json.loads((src / "assets" / "norm_stats.json").read_text()))
    record = json.loads((back.step_dir / "assets" / "provenance.json").read_text())
    assert record["source"]["backend"] == "torch" and record["target_backend"] == "jax"
    assert record["source"]["path"] == str(torch_step.absolute())
    assert record["previous"]["source"] == {"path": str(src.absolute()), "backend": "jax",
                                            "step": 7, "preset": "pendulum_ppo", "exp_name": "src"}
    assert record["params_sha256"] == record["previous"]["params_sha256"] == back.params_sha256
    # The served metadata says where a converted policy came from.
    policy = policy_lib.create_trained_policy(torch_step, warmup_batch=1)
    assert policy.metadata["converted_from"] == {"backend": "jax", "path": str(src.absolute()),
                                                 "step": 7}


def test_torch_to_jax_to_torch_gives_back_the_same_tensors(tmp_path):
    _, src = helpers.torch_checkpoint(tmp_path / "ck", "cartpole_ppo")
    to_jax = convert_checkpoint(src, "jax", tmp_path / "jax_run")
    back = convert_checkpoint(to_jax.step_dir, "torch", tmp_path / "torch_run", check=False)
    assert back.verified is None
    original = torch_checkpoints.load_params(src)
    again = torch_checkpoints.load_params(back.step_dir)
    assert sorted(original) == sorted(again)
    for name, value in original.items():
        assert again[name].tobytes() == value.tobytes() and again[name].dtype == value.dtype, name


@pytest.mark.parametrize("preset", ["cartpole_ppo", "pendulum_ppo", "cartpole_dqn",
                                    "pendulum_sac"])
def test_both_backends_serve_the_same_actions_for_every_preset(preset, tmp_path):
    """JAX checkpoint -> Torch, and Torch checkpoint -> JAX: same greedy / mean actions."""
    for make, target in ((helpers.jax_checkpoint, "torch"), (helpers.torch_checkpoint, "jax")):
        config, src = make(tmp_path / target / "ck", preset)
        out = convert_checkpoint(src, target, tmp_path / target / "out", check=False)
        source = policy_lib.create_trained_policy(src, warmup_batch=1)
        converted = policy_lib.create_trained_policy(out.step_dir, target, warmup_batch=4)
        assert converted.metadata["backend"] == target
        for key in ("action_spec", "observation_spec", "env_id", "preset", "step"):
            assert converted.metadata[key] == source.metadata[key], key
        obs = helpers.random_obs(helpers.torch_policy_spaces(config), n=128)
        a = source.infer_batch({"observation": obs})["actions"]
        b = converted.infer_batch({"observation": obs})["actions"]
        assert a.dtype == b.dtype and a.shape == b.shape
        if source.metadata["action_spec"]["type"] == "discrete":
            np.testing.assert_array_equal(a, b)
            assert len(np.unique(a)) > 1
        else:
            assert np.max(np.abs(a - b)) <= 1e-5
            assert np.std(a) > 1e-3
        one = converted.infer({"observation": obs[0]})["actions"]  # unbatched path too
        np.testing.assert_allclose(one, b[0], rtol=0, atol=1e-6)  # (batch 1 vs 128 kernels)
        # Serving the source with the other backend converts it on the fly: the same policy.
        served = policy_lib.create_trained_policy(src, target, warmup_batch=1)
        assert served.metadata["backend"] == target
        assert served.metadata["converted_from"]["path"] == str(src)
        np.testing.assert_array_equal(served.infer_batch({"observation": obs})["actions"], b)


def test_torch_policy_samples_reproducibly_and_refuses_sampling_a_dqn(tmp_path):
    _, step = helpers.torch_checkpoint(tmp_path / "ppo", "pendulum_ppo")
    obs = {"observation": helpers.random_obs(helpers.torch_policy_spaces(
        helpers.make_config(tmp_path, "pendulum_ppo")), n=32)}
    draws = [policy_lib.create_trained_policy(step, deterministic=False, seed=s,
                                              warmup_batch=1).infer_batch(obs)["actions"]
             for s in (5, 5, 6)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    mean = policy_lib.create_trained_policy(step, warmup_batch=1).infer_batch(obs)["actions"]
    assert np.std(draws[0] - mean) > 0.1
    assert np.all(np.abs(draws[0]) <= 2.0)  # clipped to Pendulum's bounds

    _, dqn = helpers.torch_checkpoint(tmp_path / "dqn", "cartpole_dqn")
    with pytest.raises(policy_lib.CheckpointError, match="DQN policy is greedy"):
        policy_lib.create_trained_policy(dqn, deterministic=False)


def test_params_that_do_not_fit_the_config_are_one_error_listing_all(tmp_path):
    def tamper(step):
        path = step / "params" / "model.safetensors"
        flat = canonical.load_safetensors(path)
        del flat["obs_normalizer/mean"], flat["critic/head/bias"]
        flat["actor/dense_9/kernel"] = np.zeros((2, 2), np.float32)
        flat["actor/head/kernel"] = np.ascontiguousarray(flat["actor/head/kernel"].T)
        canonical.save_safetensors(path, flat)

    _, step = helpers.torch_checkpoint(tmp_path / "ck", "pendulum_ppo")
    tamper(step)
    parts = ("missing keys: critic/head/bias, obs_normalizer/mean",
             "unexpected keys: actor/dense_9/kernel",
             "actor/head/kernel: expected (64, 1), got (1, 64)")
    with pytest.raises(policy_lib.CheckpointError) as loading:
        policy_lib.create_trained_policy(step)
    with pytest.raises(CanonicalParamsError) as converting:
        convert_checkpoint(step, "jax", tmp_path / "out")
    for message in (str(loading.value), str(converting.value)):
        assert str(step) in message
        for part in parts:
            assert part in message, message
    assert not any((tmp_path / "out").glob("*")), "a failed conversion leaves nothing behind"


def test_refusals(tmp_path):
    _, src = helpers.jax_checkpoint(tmp_path / "ck", "cartpole_ppo")
    with pytest.raises(ConversionError, match="already a jax checkpoint"):
        convert_checkpoint(src, "jax", tmp_path / "out")
    with pytest.raises(ConversionError, match="--to must be one of"):
        convert_checkpoint(src, "tf", tmp_path / "out")
    first = convert_checkpoint(src, "torch", tmp_path / "out", check=False)
    with pytest.raises(ConversionError, match="exists; pass --overwrite"):
        convert_checkpoint(src, "torch", tmp_path / "out")
    (first.step_dir / "assets" / "stale.json").write_text("{}")
    again = convert_checkpoint(src, "torch", tmp_path / "out", overwrite=True, check=False)
    assert not (again.step_dir / "assets" / "stale.json").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["7"]  # no temp dirs left
    with pytest.raises(policy_lib.CheckpointError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope", "torch", tmp_path / "out")


def test_script_converts_a_run_dir_and_reports_errors(tmp_path):
    """~15 s: two script runs (imports both frameworks)."""
    config, src = helpers.jax_checkpoint(tmp_path / "ck", "cartpole_ppo")
    done = run_script(["scripts/convert_checkpoint.py", "--checkpoint-dir", str(config.run_dir),
                       "--to", "torch", "--output", str(tmp_path / "out")], timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"Wrote {tmp_path / 'out' / '7'}" in done.stdout
    assert "Verified: greedy actions of 256 random observations are identical" in done.stdout
    assert "serve_policy.py --policy.dir" in done.stdout
    again = run_script(["scripts/convert_checkpoint.py", "--checkpoint-dir", str(src), "--to",
                        "torch", "--output", str(tmp_path / "out")], timeout=300)
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
