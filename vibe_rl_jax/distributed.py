"""Multi-process (multi-host) JAX: join the job the launcher describes, once, before JAX starts.

The process count and this process's index come from the launcher only, never
from a vibe-rl flag that could disagree with it (USER-NEEDS: redundant node
counts that hang multi-node jobs):

- explicit: `JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`
  (the first is JAX's own variable; the other two are vibe-rl's names for
  `jax.distributed.initialize`'s arguments, which JAX reads from no variable);
- a cluster JAX detects by itself (SLURM `srun`, Open MPI `mpirun`, Kubernetes
  indexed jobs, TPU pods) when `VIBE_RL_JAX_DISTRIBUTED=1` is set.

Each process then owns its local devices and the `(batch, fsdp)` mesh spans all
of them; the training code is the same as on one process (global arrays,
`jax.process_index() == 0` writes logs and checkpoints; orbax writes each
process's shards). CPU processes talk over gloo, so this runs (and is tested)
on one machine too.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from common import run_dir as run_dir_lib
from common.config import ConfigError, TrainConfig

logger = logging.getLogger("vibe_rl")

ADDRESS, NUM_PROCESSES, PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
AUTO = "VIBE_RL_JAX_DISTRIBUTED"
_TORCHRUN = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")
_REFUSED = -1


def _int_var(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} must be an integer.") from None


def initialize_from_env() -> bool:
    """Join the multi-process job described by the environment; False when there is none.

    Must run before anything touches a JAX device, and importing gymnax already
    does, so `vibe_rl_jax/__init__.py` calls it: importing the backend joins the
    job the environment names. Calling it again is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = [name for name in (ADDRESS, NUM_PROCESSES, PROCESS_ID) if name in os.environ]
    if not explicit and os.environ.get(AUTO) != "1":
        return False
    if explicit and len(explicit) < 3:
        missing = sorted({ADDRESS, NUM_PROCESSES, PROCESS_ID} - set(explicit))
        raise ConfigError(f"Multi-process JAX needs {ADDRESS}, {NUM_PROCESSES} and {PROCESS_ID} "
                          f"together; {', '.join(missing)} not set.")
    if explicit:
        num, index = _int_var(NUM_PROCESSES), _int_var(PROCESS_ID)
        if not 0 <= index < num:
            raise ConfigError(f"{PROCESS_ID}={index} must be in [0, {NUM_PROCESSES}={num}).")
        jax.distributed.initialize(os.environ[ADDRESS], num_processes=num, process_id=index)
    else:
        jax.distributed.initialize()  # the cluster's own variables (SLURM, Open MPI, ...)
    logger.info("JAX process %d of %d, %d local device(s), %d in all", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def check_launcher() -> None:
    """Refuse a torchrun launch of the JAX backend: its processes would never form one job."""
    if (not jax.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and any(v in os.environ for v in _TORCHRUN)):
        raise ConfigError(
            "--backend jax was started by torchrun with WORLD_SIZE > 1, which would run "
            "independent copies. Launch one process per host with JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID set (README, 'Multi-host JAX'), or use "
            "--backend torch with torchrun.")


def prepare_run_dir(config: TrainConfig) -> bool:
    """`initialize_run_dir` on process 0 (resume/overwrite rules); every process learns whether
    the run resumes and waits until the directory is ready. A refusal on process 0 (e.g. the
    run exists without --resume) stops every process instead of leaving them waiting."""
    if jax.process_count() == 1:
        return run_dir_lib.initialize_run_dir(config.run_dir, resume=config.resume,
                                              overwrite=config.overwrite)
    from jax.experimental import multihost_utils

    decision, error = _REFUSED, None
    if jax.process_index() == 0:
        try:
            decision = int(run_dir_lib.initialize_run_dir(config.run_dir, resume=config.resume,
                                                          overwrite=config.overwrite))
        except run_dir_lib.RunDirError as refused:
            error = refused
    decision = int(multihost_utils.broadcast_one_to_all(np.int32(decision)))
    if error is not None:
        raise error
    if decision == _REFUSED:
        raise run_dir_lib.RunDirError(f"Process 0 refused the run directory {config.run_dir} "
                                      f"(its log says why).")
    return bool(decision)
