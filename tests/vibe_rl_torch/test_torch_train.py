"""End-to-end Torch training: presets, run directory, checkpoints, resume, kill-mid-save, DDP."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import presets
from common import run_dir as rd
from common.config import ConfigError
from tests.conftest import ROOT, run_script
from vibe_rl_torch import checkpoints, distributed, networks
from vibe_rl_torch import train as torch_train

HERE = pathlib.Path(__file__).resolve().parent
TB_TAGS = {"train/episode_return", "train/episode_length", "train/learning_rate", "perf/sps",
           "train/approx_kl", "train/clip_fraction", "train/loss/total", "train/loss/policy",
           "train/loss/value", "train/loss/entropy"}


# Every test here runs with deterministic kernels on one thread (tests/vibe_rl_torch/conftest.py).
pytestmark = pytest.mark.usefixtures("deterministic")


def small(name="cartpole_ppo", updates=4, base=None, **changes):
    changes = {"exp_name": "t", "backend": "torch", "log_interval": 1, "save_interval": 1,
               "progress_bar": False, "checkpoint_base_dir": str(base), **changes}
    cfg = presets.replace(presets.get_preset(name), **changes)
    return presets.replace(cfg, total_timesteps=updates * cfg.batch_size)


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(pathlib.Path(run_dir) / "tb"))
    acc.Reload()
    return acc, [(e.step, e.value) for e in acc.Scalars(tag)] if tag else None


def assert_same_state(a, b):
    """Params, optimizer and LR scheduler of two finished runs are identical."""
    for key in a.params:
        np.testing.assert_array_equal(a.params[key], b.params[key], err_msg=key)
    opt_a, opt_b = (r.module.trainer.optimizers[0].state_dict() for r in (a, b))
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    sched_a, sched_b = (r.module.trainer.lr_scheduler_configs[0].scheduler.state_dict()
                        for r in (a, b))
    assert sched_a["last_epoch"] == sched_b["last_epoch"]


PPO_PRESETS = sorted(n for n, (_, cfg) in presets.PRESETS.items() if cfg.algo.kind == "ppo")


@pytest.mark.parametrize("name", PPO_PRESETS)
def test_every_ppo_preset_runs(name, ckpt_base):
    preset = presets.PRESETS[name][1]
    result = torch_train.train(small(name, updates=3, base=ckpt_base,
                                     **{"algo.num_steps": 32} if preset.env.num_envs > 4 else {}))
    assert result.final_step == 3 and [h["step"] for h in result.history] == [1, 2, 3]
    run = result.run_dir
    assert rd.complete_steps(run) == [2, 3]  # max_to_keep=2
    step = run / "3"
    for sub in ("params/model.safetensors", "train_state/trainer.pt", "train_state/rank_0.pkl",
                "assets/config.json"):
        assert (step / sub).is_file(), sub
    saved = json.loads((step / "assets" / "config.json").read_text())
    assert saved["name"] == name and saved["backend"] == "torch"
    params = checkpoints.load_params(step)
    assert params.keys() == result.params.keys()
    for key in params:
        np.testing.assert_array_equal(params[key], result.params[key], err_msg=key)
    assert ("obs_normalizer/mean" in params) == preset.env.normalize_obs
    assert ("log_std" in params) == (name == "pendulum_ppo")
    # The saved params load strictly into a fresh network and give the trained network's outputs.
    model = {k: v for k, v in params.items() if not k.startswith("obs_normalizer/")}
    fresh = networks.ActorCritic(result.module.venv.obs_dim, result.module.venv.action_spec.dim,
                                 result.module.venv.action_spec.continuous)
    networks.load_canonical(fresh, model)
    obs = torch.randn(8, result.module.venv.obs_dim)
    with torch.no_grad():
        for x, y in zip(fresh(obs), result.module.network(obs)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert checkpoints.load_trainer_state(step)["update_step"] == 3


@pytest.mark.slow  # mostly the JAX compile
def test_tensorboard_tags_and_steps_match_the_jax_backend(ckpt_base):
    """One TensorBoard over the checkpoint base dir compares a JAX and a Torch run of one preset."""
    from vibe_rl_jax import train as jax_train

    torch_run = torch_train.train(small(updates=3, base=ckpt_base, exp_name="torch"))
    jax_run = jax_train.train(presets.replace(small(updates=3, base=ckpt_base, exp_name="jax"),
                                              backend="jax"))
    assert torch_run.run_dir.parent == jax_run.run_dir.parent  # checkpoints/cartpole_ppo/{jax,torch}
    tags = {}
    for run in (torch_run, jax_run):
        acc, _ = scalars(run.run_dir, None)
        tags[run.run_dir.name] = set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("train/learning_rate")] == [1, 2, 3]
    assert tags["torch"] == tags["jax"] == TB_TAGS
    # Same preset, same schedule: the logged learning rates agree.
    np.testing.assert_allclose([h["train/learning_rate"] for h in torch_run.history],
                               [h["train/learning_rate"] for h in jax_run.history], rtol=1e-6)


def test_resume_is_bit_exact(ckpt_base):
    """N updates straight == N/2, then --resume, then N/2: params, optimizer, envs, RNG.

    Tolerance: none (assert_array_equal), on CPU with deterministic algorithms, one thread.
    """
    straight = torch_train.train(small(updates=6, base=ckpt_base / "a", save_interval=3))
    first = torch_train.train(small(updates=6, base=ckpt_base / "b", save_interval=3), stop_at=3)
    assert first.final_step == 3 and rd.latest_step(first.run_dir) == 3
    resumed = torch_train.train(small(updates=6, base=ckpt_base / "b", save_interval=3, resume=True))
    assert resumed.final_step == 6
    assert_same_state(straight, resumed)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for h_straight, h_resumed in zip(straight.history[3:], resumed.history):
        for tag in h_straight:
            if tag not in ("perf/sps", "time"):
                assert h_straight[tag] == h_resumed[tag], tag


def test_continuous_resume_with_obs_normalizer_is_bit_exact(ckpt_base):
    kw = dict(name="pendulum_ppo", updates=4, save_interval=2,
              **{"env.num_envs": 4, "algo.num_steps": 32, "algo.num_minibatches": 4})
    straight = torch_train.train(small(base=ckpt_base / "a", **kw))
    torch_train.train(small(base=ckpt_base / "b", **kw), stop_at=2)
    resumed = torch_train.train(small(base=ckpt_base / "b", resume=True, **kw))
    assert_same_state(straight, resumed)
    np.testing.assert_array_equal(straight.module.venv.rms.mean, resumed.module.venv.rms.mean)


def test_run_dir_flags(ckpt_base):
    cfg = small(updates=2, base=ckpt_base)
    with pytest.raises(rd.RunDirError, match="--resume"):
        torch_train.train(presets.replace(cfg, resume=True))
    torch_train.train(cfg)
    with pytest.raises(rd.RunDirError, match="--overwrite"):
        torch_train.train(cfg)
    result = torch_train.train(presets.replace(cfg, overwrite=True))
    assert result.final_step == 2


def test_retention_follows_the_shared_rule(ckpt_base):
    result = torch_train.train(small(updates=7, base=ckpt_base, max_to_keep=2, keep_period=3))
    assert rd.complete_steps(result.run_dir) == sorted(
        rd.steps_to_keep(list(range(1, 8)), max_to_keep=2, keep_period=3)) == [3, 6, 7]


def test_background_save_error_stops_training(ckpt_base, monkeypatch):
    calls = {"n": 0}
    original = checkpoints.write_step

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "write_step", failing_write)
    with pytest.raises(OSError, match="disk full"):
        torch_train.train(small(updates=6, base=ckpt_base))
    assert calls["n"] == 2  # stopped at the next save, not at the end of training


def test_launch_environment_is_checked():
    assert distributed.from_environment({}) == distributed.DistInfo()
    info = distributed.from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                                         "LOCAL_WORLD_SIZE": "2"})
    assert (info.world_size, info.rank, info.local_rank, info.num_nodes) == (4, 3, 1, 2)
    with pytest.raises(distributed.LaunchError, match="LOCAL_RANK, LOCAL_WORLD_SIZE missing"):
        distributed.from_environment({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(distributed.LaunchError, match="not a multiple of LOCAL_WORLD_SIZE"):
        distributed.from_environment({"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0",
                                      "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(distributed.LaunchError, match="RANK=2 is not in"):
        distributed.from_environment({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0",
                                      "LOCAL_WORLD_SIZE": "2"})
    cfg = small(updates=1, base="unused")
    with pytest.raises(distributed.LaunchError, match=r"--env.num-envs \(4\).*WORLD_SIZE=3"):
        distributed.check_config(distributed.DistInfo(3, 0, 0, 3), cfg)
    # 16 envs x 128 steps / 256 minibatches = 8 samples per minibatch: not splittable over 16.
    cfg16 = presets.replace(cfg, total_timesteps=16 * 128,
                            **{"env.num_envs": 16, "algo.num_minibatches": 256})
    with pytest.raises(distributed.LaunchError, match=r"minibatch .* = 8\) must be divisible"):
        distributed.check_config(distributed.DistInfo(16, 0, 0, 8), cfg16)
    distributed.check_config(distributed.DistInfo(8, 0, 0, 8), cfg16)  # 8 ranks: fine



@pytest.mark.parametrize("name", ["cartpole_ppo", "cartpole_dqn"])
def test_fsdp_devices_is_refused_not_ignored(name):
    """RL algorithms on the Torch backend have no sharded mode: asking for one must not quietly
    train replicas. (Imitation shards with FSDP2: tests/vibe_rl_torch/test_torch_fsdp.py.)"""
    cfg = presets.replace(presets.get_preset(name), backend="torch", exp_name="x", fsdp_devices=2)
    with pytest.raises(ConfigError, match=r"--fsdp-devices 2: the Torch backend trains data "
                                          r"parallel only.*--backend jax"):
        torch_train.validate(cfg)

def test_cli_runs_and_errors_are_one_clear_line(ckpt_base):
    """scripts/train.py --backend torch: the progress line, and user errors as one line, exit 2.

    (The run-directory flag errors are the shared code path, tested in-process above.)
    """
    base = ["scripts/train.py", "cartpole_ppo", "--backend", "torch", "--checkpoint-base-dir",
            str(ckpt_base), "--exp-name", "e", "--total-timesteps", "1024", "--log-interval", "1"]
    out = run_script(base + ["--env.id", "CartPol-v1"])
    assert out.returncode == 2 and "--env.id 'CartPol-v1'" in out.stderr and "CartPole-v1" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_script(base, env={"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0",
                                "LOCAL_WORLD_SIZE": "3"})
    assert out.returncode == 2 and "WORLD_SIZE=3" in out.stderr and "Traceback" not in out.stderr
    out = run_script(base)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "update 2/2 |" in out.stderr and "steps/s | return" in out.stderr  # the shared line
    assert rd.complete_steps(ckpt_base / "cartpole_ppo" / "e") == [2]


def test_kill_mid_save_leaves_previous_step_restorable(ckpt_base, tmp_path):
    """kill -9 while step 3 is being written: step 2 restores and --resume proceeds."""
    marker = tmp_path / "frozen"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(HERE / "_torch_kill_worker.py"), str(ckpt_base),
                             "k", "6", "3", str(marker)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"worker never reached the save: {proc.poll()} {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    run = ckpt_base / "cartpole_ppo" / "k"
    temps = [p for p in run.iterdir() if "tmp" in p.name]
    assert [p.name.split(".")[0] for p in temps] == ["3"]
    assert (temps[0] / "params" / "model.safetensors").is_file()  # killed with the files written
    assert rd.complete_steps(run) == [1, 2]
    # The previous step restores: strict params load, train state, this rank's env state.
    params = checkpoints.load_params(run / "2")
    networks.load_canonical(networks.ActorCritic(4, 2, False), params)
    assert checkpoints.load_trainer_state(run / "2")["update_step"] == 2
    assert checkpoints.load_rank_state(run / "2", 0)["env"]["envs"] is not None
    # A new --resume run ignores and cleans the leftover, continues from 2 and saves 3 and 4.
    cfg = presets.replace(small(updates=4, base=ckpt_base, exp_name="k"), resume=True)
    result = torch_train.train(cfg)
    assert result.final_step == 4 and [h["step"] for h in result.history] == [3, 4]
    assert rd.complete_steps(run) == [3, 4]
    assert not [p for p in run.iterdir() if "tmp" in p.name]


def _torchrun(args, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "scripts/train.py", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_torchrun_two_process_ddp(ckpt_base):
    """2 ranks over gloo: reduced episode statistics, rank-0-only checkpoints, exact DDP resume.

    RankCounter-v0 episodes last 3 steps on rank 0 and 5 on rank 1. With 2 envs per rank and
    15 steps per update, each update ends 10 episodes of length 3 on rank 0 and 6 of length 5
    on rank 1: the global mean is 60 / 16 = 3.75 (rank 0 alone: 3, mean of rank means: 4).
    """
    args = ["cartpole_ppo", "--backend", "torch", "--exp-name", "ddp", "--checkpoint-base-dir",
            str(ckpt_base / "a"), "--env.id", "torch_toy_envs:RankCounter-v0",
            "--env.num-envs", "4", "--algo.num-steps", "15", "--algo.num-minibatches", "2",
            "--total-timesteps", str(4 * 60), "--log-interval", "1", "--save-interval", "2",
            "--max-to-keep", "5", "--no-progress-bar"]
    out = _torchrun(args)
    assert out.returncode == 0, out.stderr[-4000:]
    run = ckpt_base / "a" / "cartpole_ppo" / "ddp"
    assert rd.complete_steps(run) == [2, 4]
    files = sorted(p.name for p in (run / "4" / "train_state").iterdir())
    assert files == ["rank_0.pkl", "rank_1.pkl", "trainer.pt"]
    assert checkpoints.load_trainer_state(run / "4")["world_size"] == 2
    for rank in (0, 1):  # each rank's own envs: 2 of them, with its own seeds
        assert checkpoints.load_rank_state(run / "4", rank)["env"]["obs"].shape == (2, 2)
    _, lengths = scalars(run, "train/episode_length")
    _, returns = scalars(run, "train/episode_return")
    assert [s for s, _ in lengths] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in lengths], 3.75)
    np.testing.assert_allclose([v for _, v in returns], 3.75)
    assert len(list((run / "tb").iterdir())) == 1  # one writer: rank 0
    # Resume the 2-rank run from update 2: the same update-4 parameters as the straight run.
    shutil.copytree(ckpt_base / "a", ckpt_base / "b")
    shutil.rmtree(ckpt_base / "b" / "cartpole_ppo" / "ddp" / "4")
    args_b = [a if a != str(ckpt_base / "a") else str(ckpt_base / "b") for a in args]
    out = _torchrun(args_b + ["--resume"])
    assert out.returncode == 0, out.stderr[-4000:]
    straight = checkpoints.load_params(run / "4")
    resumed = checkpoints.load_params(ckpt_base / "b" / "cartpole_ppo" / "ddp" / "4")
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    # The 2-rank checkpoint also resumes on 1 process: params and optimizer carry over, the
    # envs are re-seeded (a warning says it is not a bit-exact continuation).
    shutil.copytree(ckpt_base / "a", ckpt_base / "c")
    shutil.rmtree(ckpt_base / "c" / "cartpole_ppo" / "ddp" / "4")
    cfg = presets.replace(presets.get_preset("cartpole_ppo"), backend="torch", exp_name="ddp",
                          checkpoint_base_dir=str(ckpt_base / "c"), resume=True, log_interval=1,
                          save_interval=2, max_to_keep=5, progress_bar=False,
                          total_timesteps=4 * 60, **{"env.id": "torch_toy_envs:RankCounter-v0",
                                                     "env.num_envs": 4, "algo.num_steps": 15,
                                                     "algo.num_minibatches": 2})
    single = torch_train.train(cfg)
    assert single.final_step == 4 and [h["step"] for h in single.history] == [3, 4]
    np.testing.assert_allclose([h["train/episode_length"] for h in single.history], 3.0)  # RANK 0


@pytest.mark.slow
def test_cartpole_ppo_reaches_475(ckpt_base):
    cfg = presets.replace(presets.get_preset("cartpole_ppo"), backend="torch", exp_name="full",
                          checkpoint_base_dir=str(ckpt_base), progress_bar=False)
    result = torch_train.train(cfg)
    final = np.mean([h["train/episode_return"] for h in result.history[-5:]])
    assert final >= 475, final


@pytest.mark.parametrize("continuous", [False, True])
def test_frozen_forward_is_forward(continuous):
    """The rollout's fused actor-critic (stacked / block-diagonal layers) computes `forward`."""
    net = networks.ActorCritic(5, 3, continuous, (16, 8), generator=torch.Generator().manual_seed(0))
    obs = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    out, value = net(obs)
    fused_out, fused_value = net.frozen_forward()(obs)
    assert fused_out.shape == out.shape and fused_value.shape == value.shape
    torch.testing.assert_close(fused_out, out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_value, value, rtol=1e-6, atol=1e-6)
    assert not fused_out.requires_grad  # built from a snapshot: no graph into the parameters
