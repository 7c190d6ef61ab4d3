"""Which JAX algorithm trains a config (by the tag of its algo member).

Every algorithm offers the same surface to the training loop: `init(key)`,
`shardings(abstract_runner)`, `train_chunk(runner, num_updates)`,
`inference_params(runner)`, `chunk_metrics(sums, num_updates, step)`, and a
runner state whose `train.update_step` counts updates.
"""

from __future__ import annotations

import jax

from common.config import TrainConfig


def make(config: TrainConfig, mesh: jax.sharding.Mesh):
    kind = config.algo.kind
    if kind == "ppo":
        from vibe_rl_jax.ppo import PPO
        return PPO(config, mesh)
    if kind == "dqn":
        from vibe_rl_jax.dqn import DQN
        return DQN(config, mesh)
    if kind == "sac":
        from vibe_rl_jax.sac import SAC
        return SAC(config, mesh)
    raise ValueError(f"No JAX implementation of algo.kind={kind!r}.")
