"""Which JAX algorithm trains a config (by the tag of its algo member).

Every algorithm offers the same surface to the training loop: `init(key)`,
`shardings(abstract_runner)`, `train_chunk(runner, num_updates)`,
`inference_params(runner)`, `chunk_metrics(sums, num_updates, step)`, and a
runner state whose `train.update_step` counts updates.

`compiler_options` holds the XLA options the training chunk is compiled with.
"""

from __future__ import annotations

import jax

from common.config import TrainConfig

# XLA CPU compile options per algorithm, applied to its training chunk only (per compile, not
# through the process-wide XLA_FLAGS, so a DQN run leaves other jitted code alone). Measured on
# the 2-core CPU box, `python bench/dqn_vs_sb3.py --backends jax` and the same for SAC/PPO with
# the option on and off: the memory-optimised instruction scheduler makes the DQN chunk about
# 1.2x faster (its small dots run in sequence anyway), while SAC (twin critics that the default,
# concurrency-optimised scheduler runs side by side) loses 15-20% and PPO 5%. Scheduling only
# orders instructions: parameters are bit-identical either way.
CPU_COMPILER_OPTIONS: dict[str, dict[str, str]] = {
    "dqn": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}


def compiler_options(config: TrainConfig, mesh: jax.sharding.Mesh) -> dict[str, str]:
    """The compile options for `config`'s training chunk on `mesh`'s platform (may be empty)."""
    if mesh.devices.flat[0].platform != "cpu":
        return {}
    return dict(CPU_COMPILER_OPTIONS.get(config.algo.kind, {}))


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
