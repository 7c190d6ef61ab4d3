"""Torch imitation under DDP: the global batch split over ranks, the 2-rank step equal to the
1-process step on the concatenated batch, rank-0-only checkpoints, exact resume."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot")

import scripts.collect_demos as collect_demos  # noqa: E402
from common import lerobot_data as ld  # noqa: E402
from common import normalize, presets  # noqa: E402
from common import run_dir as rd  # noqa: E402
from common.config import FlowConfig  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from vibe_rl_torch import checkpoints, imitation  # noqa: E402
from vibe_rl_torch import flow as torch_flow  # noqa: E402
from vibe_rl_torch.distributed import DistInfo, LaunchError  # noqa: E402

pytestmark = pytest.mark.usefixtures("deterministic")


# ---------------------------------------------------------------- the split, without processes


def test_batch_size_is_the_global_batch_and_must_divide_by_the_world_size():
    config = presets.replace(presets.get_preset("two_goal_flow"), backend="torch",
                             **{"data.batch_size": 6, "algo.eval_episodes": 0})
    assert imitation.per_rank_batch(config, DistInfo()) == 6
    assert imitation.per_rank_batch(config, DistInfo(world_size=3, rank=2, local_world_size=3)) == 2
    with pytest.raises(LaunchError, match=r"--data.batch-size \(6\) must be divisible .*"
                                          r"WORLD_SIZE=4"):
        imitation.validate(config, DistInfo(world_size=4, rank=0, local_world_size=4))


@pytest.mark.parametrize("mode", ["flow", "regression"])
def test_rank_shares_make_the_global_batch_loss_and_gradient(mode):
    """Two ranks' slices (with padding only in rank 1's) give the loss and the DDP-averaged
    gradient of one process on the whole batch, and the ranks' generators stay equal."""
    config = FlowConfig(encoder_sizes=(8,), hidden_sizes=(16,), time_embed_dim=4, mode=mode)
    model = torch_flow.make_model(config, state_dim=3, action_dim=2, horizon=4,
                                  generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(1)
    is_pad = np.zeros((6, 4), bool)
    is_pad[4:, 1:] = True  # rank 1's slice has far fewer valid steps than rank 0's
    batch = {"state": torch.tensor(rng.normal(size=(6, 3)), dtype=torch.float32),
             "actions": torch.tensor(rng.normal(size=(6, 4, 2)), dtype=torch.float32),
             "actions_is_pad": torch.tensor(is_pad)}

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    one_gen = torch.Generator().manual_seed(5)
    full, _ = imitation.shard_loss(model, batch, one_gen, DistInfo(), None)
    full_grads = grads(full)
    total = torch_flow.valid_count(batch)
    assert float(total) == (6 * 4 - 2 * 3) * 2
    shares, rank_grads, gens = [], [], []
    for rank in (0, 1):
        gen = torch.Generator().manual_seed(5)
        part = {k: v[rank * 3:(rank + 1) * 3] for k, v in batch.items()}
        loss, share = imitation.shard_loss(model, part, gen, DistInfo(2, rank, rank, 2),
                                           lambda count: total)
        shares.append(float(share.detach()))
        rank_grads.append(grads(loss))
        gens.append(gen.get_state())
    assert sum(shares) == pytest.approx(float(full.detach()), rel=1e-6)
    assert shares[0] != pytest.approx(shares[1], rel=1e-2)  # unequal shares: weighting matters
    for g_full, g0, g1 in zip(full_grads, *rank_grads):
        torch.testing.assert_close((g0 + g1) / 2, g_full, rtol=1e-5, atol=1e-7)
    assert torch.equal(gens[0], gens[1]) and torch.equal(gens[0], one_gen.get_state())


def test_rank_slices_of_the_shuffle_are_disjoint_and_make_the_global_batch():
    data = ld.DataConfig(batch_size=4, seed=3)
    single = ld.make_order(data, 30)
    # imitation.train gives each of 2 ranks batch 4 // 2 of the same seeded order.
    ranks = [ld.make_order(ld.DataConfig(batch_size=2, seed=3), 30, shard_index=r, num_shards=2)
             for r in (0, 1)]
    position = single.start()
    for _ in range(12):  # three epochs of 7 global batches
        parts = [order.indices(position) for order in ranks]
        assert not set(parts[0]) & set(parts[1])
        np.testing.assert_array_equal(np.concatenate(parts), single.indices(position))
        assert ranks[0].state_dict(position) == single.state_dict(position)
        position = single.advance(position)


# ---------------------------------------------------------------- torchrun end to end


@pytest.fixture(scope="module")
def demos(hf_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_demos") / "two_goal"
    collect_demos.collect(collect_demos.Args(root=str(root), num_episodes=12, seed=0))
    stats = normalize.save(root.parent / "stats.json",
                           ld.compute_norm_stats(ld.DataConfig(root=str(root), action_horizon=8)))
    return root, stats


STEPS = 4
SMALL = {"algo.hidden_sizes": (32, 32), "algo.encoder_sizes": (16,), "algo.warmup_steps": 1,
         "algo.eval_episodes": 2, "algo.ema_decay": 0.9, "data.batch_size": 16}


def cli_flags(changes: dict) -> list[str]:
    """`presets.replace`-style dotted changes as train.py flags (tuples: one value per item)."""
    flags: list[str] = []
    for key, value in changes.items():
        flags += [f"--{key.replace('_', '-')}",
                  *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return flags


def _flags(demos, base):
    root, stats = demos
    flags = ["two_goal_flow", "--backend", "torch", "--exp-name", "ddp", "--checkpoint-base-dir",
             str(base), "--data.root", str(root), "--data.norm-stats-path", str(stats),
             "--algo.num-steps", str(STEPS), "--log-interval", "1", "--save-interval", "2",
             "--max-to-keep", "5", "--no-progress-bar"]
    return flags + cli_flags(SMALL)


def _config(demos, base, **changes):
    root, stats = demos
    return presets.replace(presets.get_preset("two_goal_flow"), backend="torch", exp_name="ddp",
                           checkpoint_base_dir=str(base), log_interval=1, save_interval=2,
                           max_to_keep=5, progress_bar=False,
                           **{"data.root": str(root), "data.norm_stats_path": str(stats),
                              "algo.num_steps": STEPS, **SMALL, **changes})


def _torchrun(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "scripts/train.py", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(pathlib.Path(run_dir) / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_torchrun_two_rank_flow_training(demos, ckpt_base):
    """2 ranks over gloo train two_goal_flow: rank-0 checkpoints that load and serve, reduced
    metrics, the same steps as one process on the global batch, exact resume at 2 ranks and
    a same-sample continuation on 1."""
    from common.policy import create_trained_policy

    _torchrun(_flags(demos, ckpt_base / "a"))
    run = ckpt_base / "a" / "two_goal_flow" / "ddp"
    assert rd.complete_steps(run) == [2, 4]
    step = run / str(STEPS)
    assert sorted(p.name for p in (step / "train_state").iterdir()) == ["trainer.pt"]
    state = checkpoints.load_trainer_state(step)
    assert state["world_size"] == 2 and state["update_step"] == STEPS
    assert state["loader"]["global_batch"] == 16 and state["loader"]["index"] == STEPS * 16
    assert json.loads((step / "assets" / "norm_stats.json").read_text()) == \
        json.loads(demos[1].read_text())
    assert len(list((run / "tb").iterdir())) == 1  # one writer: rank 0
    logged = _scalars(run)
    assert {"train/loss/flow", "train/learning_rate", "perf/sps", "perf/data_wait_frac",
            "eval/success_rate", "eval/episode_return"} <= set(logged)
    assert [s for s, _ in logged["train/loss/flow"]] == [1, 2, 3, 4]
    policy = create_trained_policy(step, warmup_batch=1)
    assert policy.infer({"observation": np.array([0.1, 0.3], np.float32)})["actions"].shape == (8, 2)

    # One process on the same global batches: the same losses and weights (summation order
    # aside). Wrong sharding, noise or loss weighting would move them far more than this.
    single = imitation.train(_config(demos, ckpt_base / "one"))
    np.testing.assert_allclose([v for _, v in logged["train/loss/flow"]],
                               [h["train/loss/flow"] for h in single.history
                                if "train/loss/flow" in h], rtol=1e-5)
    two_rank = checkpoints.load_params(step)
    for key, value in single.params.items():
        np.testing.assert_allclose(two_rank[key], value, rtol=0, atol=1e-5, err_msg=key)

    # Resume the 2-rank run from step 2 on 2 ranks: bit-exact.
    shutil.copytree(ckpt_base / "a", ckpt_base / "b")
    shutil.rmtree(ckpt_base / "b" / "two_goal_flow" / "ddp" / str(STEPS))
    _torchrun(_flags(demos, ckpt_base / "b") + ["--resume"])
    resumed = checkpoints.load_params(ckpt_base / "b" / "two_goal_flow" / "ddp" / str(STEPS))
    for key in two_rank:
        np.testing.assert_array_equal(resumed[key], two_rank[key], err_msg=key)

    # ... and on 1 process: the same samples and noise, so the same weights up to float order.
    shutil.copytree(ckpt_base / "a", ckpt_base / "c")
    shutil.rmtree(ckpt_base / "c" / "two_goal_flow" / "ddp" / str(STEPS))
    one = imitation.train(_config(demos, ckpt_base / "c", resume=True))
    assert one.final_step == STEPS
    assert checkpoints.load_trainer_state(
        ckpt_base / "c" / "two_goal_flow" / "ddp" / str(STEPS))["loader"] == state["loader"]
    for key in two_rank:
        np.testing.assert_allclose(one.params[key], two_rank[key], rtol=0, atol=1e-5, err_msg=key)
