"""Torch imitation under FSDP2 (`--fsdp-devices`): the launch checks, the topology-free
checkpoint format, and (torchrun, 2 ranks) a sharded run equal to one process, resumable on
any topology."""

import re
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot")

from common import presets  # noqa: E402
from common import run_dir as rd  # noqa: E402
from common.config import ConfigError  # noqa: E402
from tests.vibe_rl_torch.test_torch_imitation_ddp import (  # noqa: E402,F401 (demos: fixture)
    _scalars, _torchrun, cli_flags, demos)
from vibe_rl_torch import checkpoints, imitation, runtime  # noqa: E402
from vibe_rl_torch import train as torch_train  # noqa: E402
from vibe_rl_torch.distributed import DistInfo, LaunchError  # noqa: E402

pytestmark = pytest.mark.usefixtures("deterministic")


# ---------------------------------------------------------------- launch checks, no processes


def _flow(**changes):
    return presets.replace(presets.get_preset("two_goal_flow"), backend="torch",
                           **{"data.batch_size": 6, "algo.eval_episodes": 0, **changes})


def test_rl_algorithms_refuse_fsdp():
    config = presets.replace(presets.get_preset("cartpole_ppo"), backend="torch", fsdp_devices=2)
    with pytest.raises(ConfigError, match=r"--fsdp-devices 2: .*imitation .*--backend jax"):
        torch_train.validate(config)


def test_fsdp_on_one_process_says_to_launch_with_torchrun(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(LaunchError,
                       match=r"--fsdp-devices 2 .*WORLD_SIZE=1\)\. Launch with torchrun"):
        torch_train.validate(_flow(fsdp_devices=2))  # the entry point's check
    with pytest.raises(LaunchError, match=r"WORLD_SIZE=1"):
        imitation.train(_flow(fsdp_devices=2))  # and the trainer's own, before any work


def test_fsdp_devices_must_divide_the_world_size():
    three = DistInfo(world_size=3, rank=1, local_rank=1, local_world_size=3)
    with pytest.raises(LaunchError, match=r"--fsdp-devices \(2\) must divide .*WORLD_SIZE=3"):
        imitation.validate(_flow(fsdp_devices=2), three)
    imitation.validate(_flow(fsdp_devices=3), three)  # plain FSDP over all 3
    imitation.validate(_flow(fsdp_devices=1), three)  # DDP
    imitation.validate(_flow(fsdp_devices=2, **{"data.batch_size": 8}),
                       DistInfo(world_size=4, rank=0, local_world_size=4))  # HSDP 2 x 2
    runtime.check_fsdp(DistInfo(), 1)


def test_optimizer_state_keys_round_trip_to_the_unsharded_layout():
    """The name-keyed full state of `get_optimizer_state_dict` is saved in the numbered layout of
    `Optimizer.state_dict()`, so a sharded run's trainer.pt loads into a plain optimizer and
    back."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(5, 3)).sum().backward()
    optimizer.step()
    plain = optimizer.state_dict()
    names = [name for name, _ in model.named_parameters()]
    by_name = imitation._optimizer_by_name(plain, names)
    assert sorted(by_name["state"]) == sorted(names)
    assert by_name["param_groups"][0]["params"] == names
    back = imitation._optimizer_by_index(by_name)
    assert back["param_groups"] == plain["param_groups"]
    assert back["state"].keys() == plain["state"].keys()
    for index, state in plain["state"].items():
        for key, value in state.items():
            assert torch.equal(back["state"][index][key], value)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fresh.load_state_dict(back)  # the numbered layout loads into a plain optimizer


# ---------------------------------------------------------------- torchrun end to end

STEPS, SAVE = 24, 12
SMALL = {"algo.hidden_sizes": (32, 32), "algo.encoder_sizes": (16,), "algo.warmup_steps": 2,
         "algo.eval_episodes": 2, "algo.eval_interval": SAVE, "algo.ema_decay": 0.9,
         "data.batch_size": 16}


def _flags(demos, base, *extra):
    root, stats = demos
    flags = ["two_goal_flow", "--backend", "torch", "--exp-name", "fsdp", "--checkpoint-base-dir",
             str(base), "--data.root", str(root), "--data.norm-stats-path", str(stats),
             "--algo.num-steps", str(STEPS), "--log-interval", "1", "--save-interval", str(SAVE),
             "--max-to-keep", "5", "--no-progress-bar", "--fsdp-devices", "2", *extra]
    return flags + cli_flags(SMALL)


def _config(demos, base, **changes):
    root, stats = demos
    return presets.replace(presets.get_preset("two_goal_flow"), backend="torch", exp_name="fsdp",
                           checkpoint_base_dir=str(base), log_interval=1, save_interval=SAVE,
                           max_to_keep=5, progress_bar=False,
                           **{"data.root": str(root), "data.norm_stats_path": str(stats),
                              "algo.num_steps": STEPS, **SMALL, **changes})


def _assert_params_close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=atol, err_msg=key)


def _without_last_step(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "two_goal_flow" / "fsdp" / str(STEPS))


@pytest.mark.slow
def test_torchrun_fsdp_equals_one_process_and_resumes_on_any_topology(demos, ckpt_base):
    """2 ranks with --fsdp-devices 2 (EMA on): parameters really sharded, the same losses and
    weights as one process on the global batch, a topology-free checkpoint that resumes on one
    process and under FSDP, and a one-process checkpoint that resumes under FSDP."""
    out = _torchrun(_flags(demos, ckpt_base / "a"))
    # Each rank holds a strict part of the parameters (fails if fully_shard were skipped).
    held = re.search(r"FSDP2 shards: rank entries \[(\d+), (\d+)\] of (\d+)", out.stderr)
    assert held, out.stderr[-2000:]
    per_rank, total = [int(held[1]), int(held[2])], int(held[3])
    assert max(per_rank) < total and sum(per_rank) == total

    run = ckpt_base / "a" / "two_goal_flow" / "fsdp"
    assert rd.complete_steps(run) == [SAVE, STEPS]
    step = run / str(STEPS)
    state = checkpoints.load_trainer_state(step)
    assert state["world_size"] == 2 and state["fsdp_devices"] == 2
    # The full (unsharded) state, in the one-process layout.
    single = imitation.train(_config(demos, ckpt_base / "one"))
    plain = checkpoints.load_trainer_state(
        ckpt_base / "one" / "two_goal_flow" / "fsdp" / str(STEPS))
    for key in ("model", "ema"):
        assert {k: v.shape for k, v in state[key].items()} == \
            {k: v.shape for k, v in plain[key].items()}
    assert state["optimizer"]["param_groups"] == plain["optimizer"]["param_groups"]
    assert state["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()
    assert state["loader"] == plain["loader"]

    # Same math as one process on the global batch, up to float summation order.
    logged = _scalars(run)
    assert {"eval/episode_return", "eval/success_rate"} <= set(logged)
    assert [s for s, _ in logged["train/loss/flow"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in logged["train/loss/flow"]],
                               [h["train/loss/flow"] for h in single.history
                                if "train/loss/flow" in h], rtol=1e-5)
    sharded = checkpoints.load_params(step)  # EMA weights
    _assert_params_close(sharded, single.params)
    for name, value in plain["model"].items():  # raw weights and optimizer moments
        torch.testing.assert_close(state["model"][name], value, rtol=0, atol=1e-5)
    # Adam's step hardly depends on the gradient's scale, but its moments do: they pin FSDP2's
    # gradient divide factor (an average over all ranks, as DDP's) to the one-process gradient.
    for index, moments in plain["optimizer"]["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(state["optimizer"]["state"][index][key], value,
                                       rtol=1e-4, atol=1e-6)

    # The FSDP checkpoint at step SAVE resumes on one process at the same sample ...
    _without_last_step(ckpt_base / "a", ckpt_base / "b")
    one = imitation.train(_config(demos, ckpt_base / "b", resume=True))
    assert one.final_step == STEPS
    assert checkpoints.load_trainer_state(
        ckpt_base / "b" / "two_goal_flow" / "fsdp" / str(STEPS))["loader"] == state["loader"]
    _assert_params_close(one.params, sharded)
    # ... and under FSDP on 2 ranks, bit for bit (same topology, same reduction order).
    _without_last_step(ckpt_base / "a", ckpt_base / "c")
    _torchrun(_flags(demos, ckpt_base / "c", "--resume"))
    resumed = checkpoints.load_params(ckpt_base / "c" / "two_goal_flow" / "fsdp" / str(STEPS))
    for key in sharded:
        np.testing.assert_array_equal(resumed[key], sharded[key], err_msg=key)

    # A one-process checkpoint resumes under FSDP.
    _without_last_step(ckpt_base / "one", ckpt_base / "d")
    _torchrun(_flags(demos, ckpt_base / "d", "--resume"))
    _assert_params_close(
        checkpoints.load_params(ckpt_base / "d" / "two_goal_flow" / "fsdp" / str(STEPS)),
        single.params)
