"""World size and ranks from the torchrun environment, checked once, and the few collectives we need.

The launcher is the only source of truth: `torchrun` (one node or many) sets
WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE, and nothing in the config
repeats them, so they cannot disagree. A launch that is inconsistent with
itself or with the config fails at start with a message saying what to change,
instead of hanging in a collective later (Lightning #14078, #7003).

Every helper here is a no-op (or the identity) when the world size is 1.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from common.config import ConfigError, PPOConfig, TrainConfig

_TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class LaunchError(ConfigError):
    """The launcher environment is inconsistent (with itself, the machine or the config)."""


@dataclasses.dataclass(frozen=True)
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_environment(environ: Mapping[str, str] | None = None) -> DistInfo:
    """Read torchrun's variables; none set means one process."""
    environ = os.environ if environ is None else environ
    present = [k for k in _TORCHRUN_VARS if k in environ]
    if not present:
        return DistInfo()
    missing = [k for k in _TORCHRUN_VARS if k not in environ]
    if missing:
        raise LaunchError(
            f"Incomplete launcher environment: {', '.join(present)} set but {', '.join(missing)} "
            f"missing. Launch multi-process runs with torchrun (it sets all of "
            f"{', '.join(_TORCHRUN_VARS)}), or unset them for a single process.")
    try:
        world, rank, local_rank, local_world = (int(environ[k]) for k in _TORCHRUN_VARS)
    except ValueError:
        raise LaunchError("Launcher variables must be integers: "
                          + ", ".join(f"{k}={environ[k]!r}" for k in _TORCHRUN_VARS)) from None
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is not in [0, WORLD_SIZE={world}).")
    if local_world < 1 or not 0 <= local_rank < local_world:
        raise LaunchError(f"LOCAL_RANK={local_rank} is not in [0, LOCAL_WORLD_SIZE={local_world}).")
    if world % local_world:
        raise LaunchError(
            f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}: every node "
            f"must run the same number of processes (torchrun --nproc-per-node).")
    return DistInfo(world, rank, local_rank, local_world)


def check_config(info: DistInfo, config: TrainConfig) -> None:
    """The config must split evenly over the ranks torchrun started."""
    if config.env.num_envs % info.world_size:
        raise LaunchError(
            f"--env.num-envs ({config.env.num_envs}) must be divisible by the number of processes "
            f"(WORLD_SIZE={info.world_size} from torchrun): each rank steps num_envs / WORLD_SIZE "
            f"envs. Change --env.num-envs or --nproc-per-node/--nnodes.")
    if isinstance(config.algo, PPOConfig):
        minibatch = config.batch_size // config.algo.num_minibatches
        if minibatch % info.world_size:
            raise LaunchError(
                f"The minibatch ({config.batch_size} / --algo.num-minibatches "
                f"{config.algo.num_minibatches} = {minibatch}) must be divisible by WORLD_SIZE="
                f"{info.world_size}: each rank takes an equal share of every minibatch.")


def check_devices(info: DistInfo, accelerator: str) -> None:
    if accelerator == "gpu" and info.local_world_size > torch.cuda.device_count():
        raise LaunchError(
            f"LOCAL_WORLD_SIZE={info.local_world_size} processes on this node but only "
            f"{torch.cuda.device_count()} visible GPU(s): lower --nproc-per-node.")


def init_process_group(info: DistInfo, accelerator: str, timeout_s: float = 1800.0) -> None:
    """Join the process group torchrun described (Lightning reuses an initialised group)."""
    if not info.distributed or dist.is_initialized():
        return
    backend = "nccl" if accelerator == "gpu" else "gloo"
    if accelerator == "gpu":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend, init_method="env://", world_size=info.world_size,
                            rank=info.rank, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != info.world_size:
        raise LaunchError(f"The process group has {dist.get_world_size()} members but "
                          f"WORLD_SIZE={info.world_size}.")


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tensor_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a float64 vector over all ranks."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: np.ndarray) -> np.ndarray:
    """Elementwise maximum of a float64 vector over all ranks."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _all_reduce(values: np.ndarray, op: Any) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if not _active():
        return values
    tensor = torch.from_numpy(values.copy()).to(_tensor_device())
    dist.all_reduce(tensor, op=op)
    return tensor.cpu().numpy()


def global_moments(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, (population) variance and count of a batch split over all ranks."""
    batch = np.asarray(batch, np.float64)
    sums = all_reduce_sum(np.concatenate([[batch.shape[0]], batch.sum(0), (batch**2).sum(0)]))
    count = sums[0]
    dim = batch.shape[1]
    mean = sums[1:1 + dim] / count
    var = np.maximum(sums[1 + dim:] / count - mean**2, 0.0)
    return mean.astype(np.float32), var.astype(np.float32), float(count)


def gather_to_primary(obj: Any) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0; None elsewhere."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_primary(obj: Any) -> Any:
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def scatter_from_primary(objs: list[Any] | None) -> Any:
    """Rank r gets `objs[r]` of rank 0's list."""
    if not _active():
        return objs[0]
    out = [None]
    dist.scatter_object_list(out, objs if dist.get_rank() == 0 else None, src=0)
    return out[0]
