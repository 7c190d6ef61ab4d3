"""The JAX training loop: compiled chunks, with Python between them for logs and checkpoints.

The chunk program is jitted once with explicit in/out shardings on the
(batch, fsdp) mesh and a donated runner state. The loop dispatches the next
chunk before it reads the previous chunk's metrics (JAX dispatch is
asynchronous), so logging overlaps compute; only checkpoint steps wait for
the device, and orbax then writes in the background.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import config as config_lib
from common import metrics as metrics_lib
from common import run_dir as run_dir_lib
from common.config import TrainConfig
from vibe_rl_jax import algorithms, checkpoints, distributed, envs, sharding

logger = logging.getLogger("vibe_rl")


@dataclasses.dataclass
class TrainResult:
    run_dir: Any
    final_step: int
    params: Any  # host numpy inference params
    runner: Any  # final runner state (device arrays)
    history: list[dict[str, float]]
    compile_seconds: float
    train_seconds: float  # wall time of the update loop, compile excluded


def validate(config: TrainConfig) -> None:
    """Backend-specific checks that the config tree cannot do without importing gymnax."""
    distributed.check_launcher()
    if config.algo.kind == "flow":  # imitation: a gymnasium eval env, no gymnax env
        from vibe_rl_jax import imitation
        return imitation.validate(config)
    envs.check_env_id(config.env.id)


def _chunk_metrics(algo, sums: dict[str, np.ndarray], num_updates: int, step: int,
                   seconds: float) -> dict[str, float]:
    count = float(sums["episode_count"])
    out = {
        metrics_lib.EPISODE_RETURN: float(sums["episode_return_sum"]) / count if count else math.nan,
        metrics_lib.EPISODE_LENGTH: float(sums["episode_length_sum"]) / count if count else math.nan,
        metrics_lib.SPS: num_updates * algo.config.steps_per_update / max(seconds, 1e-9),
    }
    out.update(algo.chunk_metrics(sums, num_updates, step))
    return out


def _compile(lowered: Any, options: dict[str, str]) -> Any:
    """Compile with `options`; an XLA that no longer knows one is warned about, not fatal."""
    if options:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as error:
            if "option" not in str(error):
                raise
            logger.warning("XLA refused the compile options %s (%s); compiling without them "
                           "(same results, possibly slower).", options, error)
    return lowered.compile()


def _warn_config_drift(saved: dict[str, Any], current: dict[str, Any]) -> None:
    ignore = {"resume", "overwrite", "progress_bar", "wandb_enabled"}
    diffs = [k for k in set(saved) | set(current)
             if k not in ignore and saved.get(k) != current.get(k)]
    if diffs:
        logger.warning("Resuming with a config that differs from the checkpoint's in: %s",
                       ", ".join(sorted(diffs)))


def train(config: TrainConfig, *, stop_at: int | None = None) -> TrainResult:
    """Train `config` on the JAX backend; returns the final params and logged metrics.

    `stop_at` ends the run early after that many updates (saving a checkpoint there),
    as an interruption would, without changing the config or its schedules.
    """
    if config.algo.kind == "flow":  # imitation learning from a dataset: its own loop
        from vibe_rl_jax import imitation
        return imitation.train(config, stop_at=stop_at)
    validate(config)
    is_primary = jax.process_index() == 0
    run_dir = config.run_dir
    resuming = distributed.prepare_run_dir(config)
    mesh = sharding.make_mesh(config.fsdp_devices)
    logger.info("Run directory %s | %d device(s), mesh %s", run_dir.absolute(), mesh.size,
                dict(mesh.shape))
    algo = algorithms.make(config, mesh)

    abstract = jax.eval_shape(algo.init, jax.random.PRNGKey(0))
    runner_sharding = algo.shardings(abstract)
    replicated = sharding.replicated(mesh)
    init_fn = jax.jit(algo.init, out_shardings=runner_sharding)
    chunk_fn = jax.jit(algo.train_chunk, in_shardings=(runner_sharding, replicated),
                       out_shardings=(runner_sharding, replicated), donate_argnums=0)

    writer_ckpt = checkpoints.CheckpointWriter(run_dir, max_to_keep=config.max_to_keep,
                                               keep_period=config.keep_period,
                                               async_save=config.async_checkpointing)
    manager = writer_ckpt.manager
    config_dict = config_lib.to_dict(config)
    if resuming:
        step = manager.latest_step()
        # runner_sharding is a prefix tree (one sharding for a whole env-state subtree).
        target = jax.tree.map(
            lambda sh, sub: jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), sub),
            runner_sharding, abstract)
        runner = checkpoints.restore_train_state(manager, step, target)
        saved = checkpoints.restore_assets(manager, step).get(run_dir_lib.CONFIG_FILE, {})
        _warn_config_drift(saved, config_dict)
        logger.info("Resumed from %s at update %d", run_dir / str(step), step)
    else:
        runner = init_fn(jax.random.PRNGKey(config.seed))
    step = int(runner.train.update_step)

    writer = metrics_lib.MetricWriter(run_dir, config=config_dict, resuming=resuming,
                                      wandb_enabled=config.wandb_enabled,
                                      progress=config.progress_bar, active=is_primary)
    # Compile ahead of time: the compile cost is reported apart from training speed.
    compile_start = time.perf_counter()
    chunk_fn = _compile(chunk_fn.lower(runner, jnp.asarray(1, jnp.int32)),
                        algorithms.compiler_options(config, mesh))
    compile_seconds = time.perf_counter() - compile_start
    logger.info("Compiled the training chunk in %.1f s", compile_seconds)

    total = config.num_updates
    end = total if stop_at is None else min(stop_at, total)
    history: list[dict[str, float]] = []
    pending = None  # (step, sums, num_updates) of a dispatched chunk not yet logged
    start_time = last_time = time.perf_counter()

    def flush() -> None:
        nonlocal pending, last_time
        if pending is None:
            return
        at, sums, n = pending
        sums = jax.device_get(sums)
        now = time.perf_counter()
        scalars = _chunk_metrics(algo, sums, n, at, now - last_time)
        last_time = now
        writer.write(at, scalars)
        history.append({"step": at, "time": now - start_time, **scalars})
        writer.progress(at, total, scalars[metrics_lib.SPS], scalars[metrics_lib.EPISODE_RETURN])
        pending = None

    try:
        while step < end:
            n = min((step // config.log_interval + 1) * config.log_interval, end) - step
            runner, sums = chunk_fn(runner, jnp.asarray(n, jnp.int32))
            step += n
            flush()  # the previous chunk's metrics, read while this one runs
            pending = (step, sums, n)
            if step % config.save_interval == 0 or step == end:
                flush()
                writer_ckpt.save(step, params=algo.inference_params(runner), train_state=runner,
                                 assets={run_dir_lib.CONFIG_FILE: config_dict})
        flush()
        train_seconds = time.perf_counter() - start_time
        writer_ckpt.wait()
    finally:
        writer_ckpt.close()
        writer.close()

    params = jax.device_get(algo.inference_params(runner))
    logger.info("Done: %d updates. Checkpoints in %s ; TensorBoard: tensorboard --logdir %s",
                step, run_dir.absolute(), config.checkpoint_base_dir)
    return TrainResult(run_dir, step, params, runner, history, compile_seconds, train_seconds)
