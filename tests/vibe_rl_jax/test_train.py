"""End-to-end JAX training: presets, resume, checkpoints, logging, devices."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from common import presets
from common import run_dir as rd
from tests.conftest import ROOT, run_script
from vibe_rl_jax import checkpoints
from vibe_rl_jax import train as jax_train


def small(name="cartpole_ppo", updates=4, base=None, **changes):
    changes = {"exp_name": "t", "log_interval": 1, "save_interval": 1, "progress_bar": False,
               "checkpoint_base_dir": str(base), **changes}
    cfg = presets.replace(presets.get_preset(name), **changes)
    return presets.replace(cfg, total_timesteps=updates * cfg.batch_size)


def leaves(tree):
    return jax.tree.leaves(jax.device_get(tree))


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_runs(name, ckpt_base):
    if presets.PRESETS[name][1].backend != "jax":
        pytest.skip("not a JAX preset")
    if presets.PRESETS[name][1].data is not None:
        pytest.skip("imitation preset (reads a dataset): runs in tests/vibe_rl_jax/test_flow.py")
    result = jax_train.train(small(name, updates=3, base=ckpt_base))
    assert result.final_step == 3 and len(result.history) == 3
    run = result.run_dir
    assert rd.complete_steps(run) == [2, 3]  # max_to_keep=2
    for sub in ("params", "train_state", "assets/config.json"):
        assert (run / "3" / sub).exists(), sub
    saved = json.loads((run / "3" / "assets" / "config.json").read_text())
    assert saved["name"] == name and saved["exp_name"] == "t"
    params = checkpoints.load_params(run / "3")
    expected = {"ppo": {"actor", "critic"}, "dqn": {"q"}, "sac": {"actor"}}
    assert set(params["model"]) - {"log_std"} == expected[presets.PRESETS[name][1].algo.kind]
    assert ("obs_normalizer" in params) == presets.PRESETS[name][1].env.normalize_obs
    for a, b in zip(leaves(result.params), leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_tensorboard_tags(ckpt_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = jax_train.train(small(updates=20, base=ckpt_base, save_interval=20))
    acc = EventAccumulator(str(result.run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/episode_return", "train/episode_length", "train/learning_rate", "perf/sps",
                "train/loss/total", "train/loss/policy", "train/loss/value", "train/loss/entropy"}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("train/learning_rate")] == list(range(1, 21))
    returns = [e.value for e in acc.Scalars("train/episode_return")]
    assert all(np.isfinite(returns)) and max(returns) > 9


def test_resume_is_bit_exact(ckpt_base):
    """N updates straight == N/2, then --resume, then N/2: params, optimizer, envs, RNG."""
    straight = jax_train.train(small(updates=6, base=ckpt_base / "a", save_interval=3))
    first = jax_train.train(small(updates=6, base=ckpt_base / "b", save_interval=3), stop_at=3)
    assert first.final_step == 3 and rd.latest_step(first.run_dir) == 3
    resumed = jax_train.train(small(updates=6, base=ckpt_base / "b", save_interval=3, resume=True))
    assert resumed.final_step == 6
    a, b = leaves(straight.runner), leaves(resumed.runner)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # History after resume continues at update 4.
    assert [h["step"] for h in resumed.history] == [4, 5, 6]


def test_continuous_resume_with_obs_normalizer_is_bit_exact(ckpt_base):
    kw = dict(name="pendulum_ppo", updates=4, save_interval=2, **{"env.num_envs": 4,
              "algo.num_steps": 32, "algo.num_minibatches": 4})
    straight = jax_train.train(small(base=ckpt_base / "a", **kw))
    jax_train.train(small(base=ckpt_base / "b", **kw), stop_at=2)
    resumed = jax_train.train(small(base=ckpt_base / "b", resume=True, **kw))
    for x, y in zip(leaves(straight.runner), leaves(resumed.runner)):
        np.testing.assert_array_equal(x, y)


def test_run_dir_flags(ckpt_base):
    cfg = small(updates=2, base=ckpt_base)
    with pytest.raises(rd.RunDirError, match="--resume"):
        jax_train.train(presets.replace(cfg, resume=True))
    jax_train.train(cfg)
    with pytest.raises(rd.RunDirError, match="--overwrite"):
        jax_train.train(cfg)
    result = jax_train.train(presets.replace(cfg, overwrite=True))
    assert result.final_step == 2


def test_cli_errors_are_one_clear_line(ckpt_base):
    base = ["scripts/train.py", "cartpole_ppo", "--checkpoint-base-dir", str(ckpt_base),
            "--exp-name", "e", "--total-timesteps", "1024", "--no-progress-bar"]
    out = run_script(base + ["--env.id", "CartPol-v1"])
    assert out.returncode == 2 and "--env.id 'CartPol-v1'" in out.stderr and "CartPole-v1" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_script(base + ["--resume"])
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr
    assert run_script(base).returncode == 0
    out = run_script(base)
    assert out.returncode == 2 and "Pass --resume" in out.stderr and "--overwrite" in out.stderr
    out = run_script(["scripts/train.py", "cartpole_ppo"])
    assert out.returncode != 0 and "exp-name" in out.stderr


def test_train_ppo_entry_point_help_lists_every_ppo_field():
    import dataclasses

    from common.config import PPOConfig

    out = run_script(["scripts/train_ppo.py", "--help"])
    assert out.returncode == 0
    for field in dataclasses.fields(PPOConfig):
        if field.name != "kind":
            assert "--algo." + field.name.replace("_", "-") in out.stdout, field.name
    out = run_script(["scripts/train.py", "--help"])
    assert all(name in out.stdout for name in presets.PRESETS)


def test_background_save_error_stops_training(ckpt_base, monkeypatch):
    calls = {"n": 0}
    original = checkpoints.AssetsHandler._write

    async def failing_write(self, files, directory):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        await original(self, files, directory)

    monkeypatch.setattr(checkpoints.AssetsHandler, "_write", failing_write)
    with pytest.raises(Exception, match="disk full"):
        jax_train.train(small(updates=6, base=ckpt_base))
    assert calls["n"] in (2, 3)  # stopped at the next save, not at the end of training


def test_wandb_run_id_kept_for_resume(ckpt_base, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small(updates=2, base=ckpt_base, wandb_enabled=True)
    jax_train.train(cfg, stop_at=1)
    run_id = (cfg.run_dir / "wandb_id.txt").read_text()
    assert run_id
    jax_train.train(presets.replace(cfg, resume=True))
    assert (cfg.run_dir / "wandb_id.txt").read_text() == run_id


def test_kill_mid_save_leaves_previous_step_restorable(ckpt_base):
    """kill -9 while orbax is writing: the last complete step restores and training resumes."""
    run = ckpt_base / "cartpole_ppo" / "k"
    args = ["scripts/train.py", "cartpole_ppo", "--exp-name", "k", "--checkpoint-base-dir",
            str(ckpt_base), "--log-interval", "1", "--save-interval", "1", "--no-progress-bar",
            "--total-timesteps", str(2000 * 512), "--algo.hidden-sizes", "256", "256"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_during_save = False
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if run.is_dir() and len(rd.complete_steps(run)) >= 2 and any(
                    "tmp" in p.name for p in run.iterdir()):
                os.kill(proc.pid, signal.SIGKILL)
                killed_during_save = True
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert killed_during_save, "never caught a save in progress"
    steps = rd.complete_steps(run)
    latest = steps[-1]
    params = checkpoints.load_params(run / str(latest))
    assert params["model"]["actor"]["head"]["kernel"].shape == (256, 2)
    # The interrupted step's temp dir does not block resuming, which restores the train state.
    cfg = presets.replace(presets.get_preset("cartpole_ppo"), exp_name="k", resume=True,
                          checkpoint_base_dir=str(ckpt_base), log_interval=1, save_interval=1,
                          progress_bar=False, total_timesteps=(latest + 2) * 512,
                          **{"algo.hidden_sizes": (256, 256)})
    result = jax_train.train(cfg)
    assert result.final_step == latest + 2
    assert not [p for p in run.iterdir() if "tmp" in p.name]


def _worker(tmp, devices, exp, updates, stop_at="-", resume=False, preset="cartpole_ppo",
            changes=None):
    out = tmp / f"{exp}-{devices}-{stop_at}.npz"
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    proc = run_script(["tests/vibe_rl_jax/_mesh_worker.py", str(tmp / "ck"), exp, str(updates),
                       str(stop_at), "1" if resume else "0", str(out), preset,
                       json.dumps(changes or {})], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = dict(np.load(out))
    assert int(data.pop("n_devices")) == devices
    data.pop("n_logged")
    return data


def test_four_devices_match_one_and_restore_across_device_counts(tmp_path):
    one = _worker(tmp_path, 1, "one", 4)
    four = _worker(tmp_path, 4, "four", 4)
    assert one.keys() == four.keys()
    for key in one:
        np.testing.assert_allclose(four[key], one[key], rtol=2e-4, atol=2e-5, err_msg=key)
    # A checkpoint written on 4 devices restores on 1 and continues.
    _worker(tmp_path, 4, "mixed", 4, stop_at=2)
    mixed = _worker(tmp_path, 1, "mixed", 4, resume=True)
    for key in one:
        np.testing.assert_allclose(mixed[key], one[key], rtol=2e-4, atol=2e-5, err_msg=key)


# DQN draws from philox on one device and threefry on several (vibe_rl_jax/offpolicy.py), so its
# 4-device run is compared with a 2-device one: the same stream, split differently.
@pytest.mark.slow  # four subprocess runs, ~65 s
@pytest.mark.parametrize("preset, baseline_devices, changes", [
    ("cartpole_dqn", 2, {"algo.learning_starts": 16, "algo.batch_size": 16,
                         "algo.buffer_size": 200, "algo.target_update_interval": 2,
                         "algo.n_step": 3}),
    ("pendulum_sac", 1, {"algo.learning_starts": 16, "algo.batch_size": 16,
                         "algo.buffer_size": 200, "algo.hidden_sizes": [32, 32]}),
])
def test_offpolicy_on_four_devices_matches_fewer(preset, baseline_devices, changes, tmp_path):
    """DQN (n-step windows and all) and SAC: envs split over 4 devices, buffer replicated."""
    base = _worker(tmp_path, baseline_devices, "base", 6, preset=preset, changes=changes)
    four = _worker(tmp_path, 4, "four", 6, preset=preset, changes=changes)
    assert base.keys() == four.keys()
    for key in base:
        np.testing.assert_allclose(four[key], base[key], rtol=2e-4, atol=2e-5, err_msg=key)


@pytest.mark.slow
def test_cartpole_ppo_reaches_475(ckpt_base):
    cfg = presets.replace(presets.get_preset("cartpole_ppo"), exp_name="full",
                          checkpoint_base_dir=str(ckpt_base), progress_bar=False)
    result = jax_train.train(cfg)
    final = np.mean([h["train/episode_return"] for h in result.history[-5:]])
    assert final >= 475, final


@pytest.mark.slow
def test_pendulum_ppo_beats_minus_400(ckpt_base):
    cfg = presets.replace(presets.get_preset("pendulum_ppo"), exp_name="full",
                          checkpoint_base_dir=str(ckpt_base), progress_bar=False)
    result = jax_train.train(cfg)
    final = np.mean([h["train/episode_return"] for h in result.history[-5:]])
    assert final > -400, final
