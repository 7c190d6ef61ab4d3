"""What every Torch training run does around `trainer.fit`, on one process or under torchrun.

Shared by vibe_rl_torch/train.py (PPO, DQN, SAC) and vibe_rl_torch/imitation.py
(flow / regression chunk policies), so both launch, split and write the same way:

- `session()`: world size and ranks from the torchrun environment only
  (`vibe_rl_torch.distributed`), checked against the visible GPUs; one intra-op
  thread for these tiny networks (unless OMP_NUM_THREADS says otherwise);
  Lightning's start-up chatter silenced; the process group joined (gloo on
  CPU, NCCL on GPU) and left again however the run ends.
- `prepare_run_dir()`: rank 0 applies the --resume / --overwrite rules and
  every rank gets its verdict, so a refused run stops on all ranks at once.
- `make_trainer()`: the Lightning Trainer, with a `DDPStrategy` over that
  process group when there is more than one rank, or Lightning's
  `ModelParallelStrategy` when the module shards itself (FSDP2, `--fsdp-devices`
  > 1); nothing of Lightning's own logging, checkpointing or samplers (we write
  the shared run-dir layout and shard data ourselves).
- `fsdp_mesh()` / `fully_shard_model()`: the ("batch", "fsdp") device mesh and
  FSDP2's `fully_shard` over it, for a module's `configure_model` hook.
- `param_fingerprint()`: two numbers per rank that must agree across ranks
  before rank 0 writes a checkpoint for all of them (replicated, unsharded
  parameters only: FSDP shards differ by design).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from common import run_dir as run_dir_lib
from common.config import TrainConfig
from common.run_dir import RunDirError
from vibe_rl_torch import distributed
from vibe_rl_torch.distributed import DistInfo, LaunchError


def configure_threads() -> None:
    # Tiny MLPs run fastest on one intra-op thread; respect an explicit OMP_NUM_THREADS.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def quiet_lightning() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")


@contextlib.contextmanager
def cheap_cuda_probe(accelerator: str):
    """On CPU, let `torch.cuda.is_available()` skip NVML while we train.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (fork safety for DataLoader
    workers, which we do not use). With a CUDA build of torch on a machine without a GPU,
    every `optimizer.step()` then dlopens NVML to ask whether CUDA is there (torch's graph-
    capture health check), about 0.1 ms per step: a sizeable share of a tiny-MLP update.
    """
    key = "PYTORCH_NVML_BASED_CUDA_CHECK"
    saved = os.environ.get(key)
    if accelerator == "cpu" and saved is not None:
        del os.environ[key]
    try:
        yield
    finally:
        if saved is not None:
            os.environ[key] = saved


@contextlib.contextmanager
def session() -> Iterator[tuple[DistInfo, str]]:
    """`(DistInfo, accelerator)` for the body of a run, inside the joined process group."""
    info = distributed.from_environment()
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    distributed.check_devices(info, accelerator)
    configure_threads()
    quiet_lightning()
    distributed.init_process_group(info, accelerator)
    try:
        with cheap_cuda_probe(accelerator):
            yield info, accelerator
    finally:
        distributed.destroy_process_group()


def prepare_run_dir(config: TrainConfig, info: DistInfo) -> bool:
    """Rank 0 applies the --resume/--overwrite rules; every rank gets its verdict (resuming?)."""
    verdict: tuple[str, Any] | None = None
    if info.is_primary:
        try:
            verdict = ("ok", run_dir_lib.initialize_run_dir(
                config.run_dir, resume=config.resume, overwrite=config.overwrite))
        except RunDirError as error:
            verdict = ("error", str(error))
    verdict = distributed.broadcast_from_primary(verdict)
    if verdict[0] == "error":
        raise RunDirError(verdict[1])
    return bool(verdict[1])


def make_trainer(info: DistInfo, accelerator: str, callbacks: Sequence[L.Callback],
                 fsdp_devices: int = 1) -> L.Trainer:
    """One epoch over the dataloader `fit` gets (the update indices); DDP when world size > 1.

    `fsdp_devices` > 1: the module shards its own parameters with FSDP2's
    `fully_shard` in `configure_model` (`fsdp_mesh`, `fully_shard_model`), which
    DDP's wrapper would break, so the strategy is Lightning's
    `ModelParallelStrategy`: it wraps nothing, runs on CPU/gloo as on GPU/NCCL,
    and joins the process group `session()` already opened. Its own mesh is
    ("data_parallel" = WORLD_SIZE, "tensor_parallel" = 1): no tensor
    parallelism; every rank reads its own data, and the module's ("batch",
    "fsdp") mesh splits those ranks into replica groups x shard groups.
    """
    backend = "nccl" if accelerator == "gpu" else "gloo"
    if fsdp_devices > 1:
        strategy: Any = ModelParallelStrategy(data_parallel_size=info.world_size,
                                              tensor_parallel_size=1,
                                              save_distributed_checkpoint=False,
                                              process_group_backend=backend)
    elif info.distributed:
        strategy = DDPStrategy(process_group_backend=backend, find_unused_parameters=False)
    else:
        strategy = "auto"
    trainer = L.Trainer(accelerator=accelerator, devices=info.local_world_size,
                        num_nodes=info.num_nodes, strategy=strategy, max_epochs=1, logger=False,
                        callbacks=list(callbacks), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0)
    if trainer.world_size != info.world_size:
        raise LaunchError(f"Lightning sees {trainer.world_size} process(es) but torchrun started "
                          f"WORLD_SIZE={info.world_size}.")
    return trainer


def check_fsdp(info: DistInfo, fsdp_devices: int) -> None:
    """`--fsdp-devices` N shards over N of the WORLD_SIZE processes, so N must divide it."""
    if fsdp_devices == 1:
        return
    if info.world_size == 1:
        raise LaunchError(
            f"--fsdp-devices {fsdp_devices} shards the parameters over processes, but this is one "
            f"process (WORLD_SIZE=1). Launch with torchrun, e.g. `torchrun --standalone "
            f"--nproc-per-node={fsdp_devices} scripts/train.py ...`, or use --fsdp-devices 1.")
    if info.world_size % fsdp_devices:
        raise LaunchError(
            f"--fsdp-devices ({fsdp_devices}) must divide the number of processes "
            f"(WORLD_SIZE={info.world_size} from torchrun): the ranks form WORLD_SIZE / "
            f"fsdp-devices replica groups of fsdp-devices shards each. Change --fsdp-devices or "
            f"--nproc-per-node/--nnodes.")


def fsdp_mesh(info: DistInfo, accelerator: str, fsdp_devices: int) -> Any:
    """The ("batch", "fsdp") DeviceMesh of WORLD_SIZE / fsdp_devices x fsdp_devices ranks
    (row-major: consecutive ranks, e.g. one node's, share a shard group), as the JAX backend's
    mesh; 1-D ("fsdp",) when there is one replica group (plain FSDP). A collective."""
    from torch.distributed.device_mesh import init_device_mesh

    check_fsdp(info, fsdp_devices)
    device = "cuda" if accelerator == "gpu" else "cpu"
    replicas = info.world_size // fsdp_devices
    if replicas == 1:
        return init_device_mesh(device, (fsdp_devices,), mesh_dim_names=("fsdp",))
    return init_device_mesh(device, (replicas, fsdp_devices), mesh_dim_names=("batch", "fsdp"))


def fully_shard_model(model: torch.nn.Module, mesh: Any) -> None:
    """FSDP2 in place, the whole model as one unit: one all-gather before the forward, one
    reduce-scatter of the gradients after the backward. On a 2-D mesh FSDP2 shards over "fsdp"
    and replicates over "batch" (HSDP). Gradients are averaged over every rank of the mesh, as
    DDP's are, and parameter names stay those of the plain module.

    One unit because the policies here are a few small MLPs: a unit per child (`fully_shard`
    on each first) lowered the peak of whole parameters little and halved the steps/s of
    two_goal_flow on 2 CPU ranks. A model with large blocks would shard each block first.
    """
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh)


def param_fingerprint(module: torch.nn.Module) -> tuple[float, float]:
    """Sum and sum of squares of every parameter: equal on all ranks while DDP keeps them in sync."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in module.parameters()])
    return float(flat.sum()), float((flat * flat).sum())


def check_in_sync(module: torch.nn.Module, info: DistInfo, step: int) -> None:
    """Gather every rank's fingerprint to rank 0 and fail there if they differ (a collective)."""
    gathered = distributed.gather_to_primary(param_fingerprint(module))
    if info.is_primary and len(set(gathered)) > 1:
        raise RuntimeError(f"DDP ranks hold different parameters at update {step} "
                           f"({sorted(set(gathered))}): gradients were not synchronised.")
