"""The framework-free parts of imitation training, shared by both backends' loops.

Loading and checking the norm stats against the dataset (a mismatch is an
error naming both sizes, the stats file and the command that rewrites it), the
transform group the served policy reuses, the norm_stats.json payload saved in
every checkpoint's assets/, and the evaluation environment.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from common import chunk_eval
from common import lerobot_data
from common import normalize as normalize_lib
from common import transforms as transforms_lib
from common.config import ConfigError, FlowConfig, TrainConfig

STATE_KEY = "state"
ACTIONS_KEY = "actions"
IS_PAD_KEY = "actions_is_pad"
BATCH_KEYS = (STATE_KEY, ACTIONS_KEY, IS_PAD_KEY)
"""What a training batch holds after the repack and Normalize transforms."""
EVAL_SEED = 1_000_000
"""Evaluation episodes reset with seeds EVAL_SEED + seed + i: never the demo seeds (0, 1, ...)."""


def eval_env_id(config: TrainConfig) -> str:
    return config.algo.eval_env_id or config.env.id


def validate(config: TrainConfig) -> None:
    """An imitation config: algo kind flow, and an eval environment gymnasium can make."""
    algo = config.algo
    if not isinstance(algo, FlowConfig):
        raise ConfigError(f"Imitation training needs algo kind 'flow', not {algo.kind!r}.")
    if algo.eval_episodes:
        import gymnasium as gym

        env_id = eval_env_id(config)
        try:
            chunk_eval.make_env(env_id).close()
        except gym.error.Error as error:
            raise ConfigError(f"--algo.eval-env-id / --env.id {env_id!r} is not a gymnasium "
                              f"environment ({error}); pass --algo.eval-episodes 0 to train "
                              f"without evaluation.") from None


def load_stats(config: TrainConfig) -> dict[str, normalize_lib.NormStats] | None:
    """The preset's norm stats (None when the data config does not normalise)."""
    if not config.data.use_norm_stats:
        return None
    try:
        return lerobot_data.load_norm_stats(config.data, config.name)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None


def open_source(config: TrainConfig) -> lerobot_data.LeRobotSource:
    try:
        return lerobot_data.open_dataset(config.data)
    except lerobot_data.DatasetError as error:
        raise ConfigError(str(error)) from None


def _feature_dim(features: dict, key: str, flag: str) -> int:
    shape = tuple(features[key]["shape"])
    if len(shape) != 1:
        raise ConfigError(f"{flag} {key!r} has shape {list(shape)}; the state-MLP policy needs a "
                          f"flat vector feature.")
    return int(shape[0])


def check_dims(data: lerobot_data.DataConfig, features: dict,
               stats: dict[str, normalize_lib.NormStats] | None, preset: str) -> tuple[int, int]:
    """(state_dim, action_dim) of the dataset; stats of other sizes are an error naming both."""
    dtype = features[data.action_key]["dtype"]
    if dtype not in ("float32", "float64", "float16"):
        raise ConfigError(f"--data.action-key {data.action_key!r} is {dtype}; flow/regression "
                          f"chunk policies need continuous (float) actions.")
    dims = {STATE_KEY: _feature_dim(features, data.state_key, "--data.state-key"),
            ACTIONS_KEY: _feature_dim(features, data.action_key, "--data.action-key")}
    if stats is not None:
        path = lerobot_data.norm_stats_path(data, preset)
        command = normalize_lib.COMPUTE_COMMAND.format(preset=preset)
        for key, dim in dims.items():
            if key not in stats:
                raise ConfigError(f"Norm stats {path} have no {key!r} entry (keys "
                                  f"{sorted(stats)}). Recompute them: `{command}`.")
            have = int(np.shape(stats[key].mean)[0])
            if have != dim:
                source = data.state_key if key == STATE_KEY else data.action_key
                raise ConfigError(
                    f"Dimension mismatch: the dataset's {source!r} ({key}) has {dim} dims but the "
                    f"norm stats {path} have {have}: they were computed for other data. Recompute "
                    f"them: `{command}`.")
    return dims[STATE_KEY], dims[ACTIONS_KEY]


def input_pipeline(data: lerobot_data.DataConfig,
                   stats: dict[str, normalize_lib.NormStats] | None
                   ) -> tuple[transforms_lib.Group, Any]:
    """(the Normalize/Unnormalize group the served policy reuses, the loader's batch transform)."""
    group = lerobot_data.norm_transforms(data, stats)
    select = _Select(BATCH_KEYS)
    batch_fn = transforms_lib.compose([*lerobot_data.repack_transforms(data).inputs,
                                       *group.inputs, select])
    return group, batch_fn


class _Select:
    """Keeps the model's batch keys (a picklable callable, for DataLoader workers)."""

    def __init__(self, keys):
        self.keys = tuple(keys)

    def __call__(self, data: dict) -> dict:
        return {key: data[key] for key in self.keys}


def stats_payload(stats: dict[str, normalize_lib.NormStats]) -> dict[str, Any]:
    """The norm_stats.json content (openpi schema) for the checkpoint's assets/."""
    return {"norm_stats": {key: value.to_json() for key, value in stats.items()}}
