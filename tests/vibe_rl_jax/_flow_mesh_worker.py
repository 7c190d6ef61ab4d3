"""Subprocess worker for the multi-device flow test: train on however many devices XLA_FLAGS gives.

usage: _flow_mesh_worker.py <data_root> <stats_path> <base_dir> <fsdp_devices> <out.npz>
"""

import sys

import jax
import numpy as np

from common import presets
from vibe_rl_jax import train as jax_train


def main() -> None:
    root, stats, base, fsdp, out = sys.argv[1:6]
    cfg = presets.replace(
        presets.get_preset("two_goal_flow"), exp_name="mesh", checkpoint_base_dir=base,
        progress_bar=False, log_interval=2, save_interval=4, fsdp_devices=int(fsdp),
        **{"data.root": root, "data.norm_stats_path": stats, "data.batch_size": 16,
           "algo.num_steps": 6, "algo.warmup_steps": 1, "algo.eval_episodes": 0,
           "algo.hidden_sizes": (32, 32), "algo.encoder_sizes": (16,), "algo.ema_decay": 0.9})
    result = jax_train.train(cfg)
    # The state lives on the whole mesh, not on one device.
    assert all(len(leaf.sharding.device_set) == jax.device_count()
               for leaf in jax.tree.leaves(result.runner["params"]))
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(result.runner["params"]))[0]
    np.savez(out, n_devices=jax.device_count(),
             loss=np.array([h["train/loss/flow"] for h in result.history if "train/loss/flow" in h]),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


if __name__ == "__main__":
    main()
