"""Subprocess worker for the multi-device tests: train on however many devices XLA_FLAGS gives.

usage: _mesh_worker.py <base_dir> <exp_name> <updates> <stop_at|-> <resume 0|1> <out.npz>
                      [<preset> [<changes as JSON>]]   (default: cartpole_ppo, no changes)
"""

import json
import sys

import jax
import numpy as np

from common import presets
from vibe_rl_jax import train as jax_train


def main() -> None:
    base, exp, updates, stop_at, resume, out = sys.argv[1:7]
    preset = sys.argv[7] if len(sys.argv) > 7 else "cartpole_ppo"
    changes = json.loads(sys.argv[8]) if len(sys.argv) > 8 else {}
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
    cfg = presets.replace(presets.get_preset(preset), exp_name=exp,
                          checkpoint_base_dir=base, log_interval=1, save_interval=1,
                          progress_bar=False, resume=resume == "1", **{"env.num_envs": 8},
                          **changes)
    cfg = presets.replace(cfg, total_timesteps=int(updates) * cfg.steps_per_update)
    result = jax_train.train(cfg, stop_at=None if stop_at == "-" else int(stop_at))
    # The env batch really is split over every device (not replicated on one).
    assert len(result.runner.obs.sharding.device_set) == jax.device_count()
    assert not result.runner.obs.sharding.is_fully_replicated or jax.device_count() == 1
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(result.runner.train))[0]
    np.savez(out, n_devices=jax.device_count(), n_logged=len(result.history),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


if __name__ == "__main__":
    main()
