"""Checkpoints for the converter tests, written without training (no training-loop compile).

JAX steps hold what `<algo>.inference_params` exports right after `init`, with
every leaf perturbed (biases start at zero, so a dropped or swapped bias would
otherwise go unnoticed) and, for normalised observations, non-trivial
statistics. Torch steps are written with vibe_rl_torch.checkpoints from the
torch networks' canonical params, perturbed the same way.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np

from common import config as config_lib
from common import presets

SMALL = {  # keep the replay buffers of the off-policy presets tiny: init allocates them
    "cartpole_dqn": {"algo.buffer_size": 256, "algo.batch_size": 32},
    "pendulum_sac": {"algo.buffer_size": 256, "algo.batch_size": 32},
}


def make_config(base: pathlib.Path, preset: str, backend: str = "jax", exp_name: str = "src",
                **changes) -> config_lib.TrainConfig:
    return presets.replace(presets.get_preset(preset), exp_name=exp_name, backend=backend,
                           checkpoint_base_dir=str(base), **{**SMALL.get(preset, {}), **changes})


def perturb(tree, seed: int = 0, scale: float = 0.1):
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        x = np.asarray(x)
        names = [str(getattr(p, "key", "")).split("/")[-1] for p in path]
        if "var" in names:  # a variance stays positive
            return (np.abs(x) + rng.uniform(0.5, 2.0, x.shape)).astype(x.dtype)
        return (x + scale * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def norm_stats_json() -> dict:
    return {"norm_stats": {"state": {"mean": [0.5], "std": [2.0], "q01": [-1.0], "q99": [1.0]}}}


def jax_checkpoint(base: pathlib.Path, preset: str, *, step: int = 7, seed: int = 0,
                   with_norm_stats: bool = False, **changes):
    """(config, step dir) of a JAX checkpoint of `preset` with perturbed initial params."""
    from vibe_rl_jax import algorithms, checkpoints, sharding

    config = make_config(base, preset, **changes)
    algo = algorithms.make(config, sharding.make_mesh(1))
    params = perturb(jax.device_get(algo.inference_params(algo.init(jax.random.PRNGKey(seed)))),
                     seed)
    assets = {"config.json": config_lib.to_dict(config)}
    if with_norm_stats:
        assets["norm_stats.json"] = norm_stats_json()
    manager = checkpoints.make_manager(config.run_dir, max_to_keep=2, keep_period=None,
                                       async_save=False)
    checkpoints.save(manager, step, params=params, train_state={"step": np.int32(step)},
                     assets=assets)
    manager.wait_until_finished()
    manager.close()
    return config, config.run_dir / str(step)


def torch_network(config: config_lib.TrainConfig, seed: int = 0):
    """The torch inference network of `config` (random init from `seed`)."""
    import torch

    from vibe_rl_torch import networks, policy

    spaces = policy.spaces(config)
    algo = config.algo
    gen = torch.Generator().manual_seed(seed)
    if algo.kind == "ppo":
        return networks.ActorCritic(spaces.obs_dim, spaces.action_dim, spaces.continuous,
                                    algo.hidden_sizes, algo.activation, algo.init_log_std, gen)
    if algo.kind == "dqn":
        return networks.QNetwork(spaces.obs_dim, spaces.action_dim, algo.hidden_sizes,
                                 algo.activation, gen)
    return networks.SACActor(spaces.obs_dim, spaces.action_dim, algo.hidden_sizes, algo.activation,
                             algo.log_std_min, algo.log_std_max, gen)


def torch_checkpoint(base: pathlib.Path, preset: str, *, step: int = 7, seed: int = 0,
                     with_norm_stats: bool = False, **changes):
    """(config, step dir) of a Torch checkpoint of `preset` with perturbed initial params."""
    from vibe_rl_torch import checkpoints, networks, policy

    config = make_config(base, preset, backend="torch", **changes)
    params = networks.canonical_params(torch_network(config, seed))
    if config.env.normalize_obs:
        shape = policy.spaces(config).obs_shape
        params["obs_normalizer/mean"] = np.zeros(shape, np.float32)
        params["obs_normalizer/var"] = np.ones(shape, np.float32)
    params = {k: np.asarray(v) for k, v in perturb(params, seed).items()}
    files = checkpoints.step_files(params=params, trainer_state={"update_step": step},
                                   rank_states=[], config=config_lib.to_dict(config))
    if with_norm_stats:
        files["assets/norm_stats.json"] = json.dumps(norm_stats_json()).encode()
    return config, checkpoints.write_step(config.run_dir, step, files)


def torch_policy_spaces(config: config_lib.TrainConfig):
    from vibe_rl_torch import policy

    return policy.spaces(config)


def random_obs(spaces, n: int = 64, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *spaces.obs_shape)) * 2).astype(np.float32)
