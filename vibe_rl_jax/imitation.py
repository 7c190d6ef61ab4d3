"""Supervised training of the flow-matching (or regression) chunk policy on a LeRobot dataset.

Same run-directory contract and machinery as the RL loop (vibe_rl_jax/train.py):
`initialize_run_dir`, the (batch, fsdp) mesh, `CheckpointWriter`,
`MetricWriter`. Batches come from `common.lerobot_data.BatchIterator`: the
repack and Normalize transforms of the data config run on numpy batches in the
iterator's prefetch thread, which also places them on the devices, split along
the mesh's data axes. The jitted train step donates the train state.

The train state holds params, EMA params (when on), optimizer state, step, PRNG
key and the loader's position (`loader/{seed, epoch, index, num_samples,
global_batch}`), so `--resume` continues at the same sample and gives the same
parameters as an uninterrupted run. Every checkpoint's `assets/` gets
`config.json` and the `norm_stats.json` training used, so the served policy
needs nothing else. The inference `params` are the EMA weights when EMA is on.

Logged: train/loss/flow (or train/loss/regression), train/learning_rate,
perf/sps (samples/s), perf/data_wait_frac, and at the end (and every
`eval_interval` steps) eval/episode_return and, for tasks that report it,
eval/success_rate, from receding-horizon rollouts in the gymnasium env.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import chunk_eval
from common import config as config_lib
from common import imitation as imitation_lib
from common import lerobot_data
from common import metrics as metrics_lib
from common import run_dir as run_dir_lib
from common.config import ConfigError, FlowConfig, TrainConfig
from convert import canonical
from vibe_rl_jax import checkpoints, distributed, flow, schedules, sharding
from vibe_rl_jax.train import TrainResult

logger = logging.getLogger("vibe_rl")

LOADER = "loader"
LOADER_KEYS = ("seed", "epoch", "index", "num_samples", "global_batch")
EVAL_SEED = imitation_lib.EVAL_SEED
validate = imitation_lib.validate


@dataclasses.dataclass
class ImitationResult(TrainResult):
    eval: dict[str, float] = dataclasses.field(default_factory=dict)
    """The final evaluation (empty when it did not run)."""


# ---------------------------------------------------------------- optimisation


def make_optimizer(algo: FlowConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Global-norm clip, then AdamW with linear warmup and cosine decay to 0 at num_steps."""
    schedule = schedules.make("warmup_cosine", algo.lr, total_steps=algo.num_steps,
                              warmup_steps=algo.warmup_steps)
    tx = optax.chain(optax.clip_by_global_norm(algo.max_grad_norm),
                     optax.adamw(schedule, weight_decay=algo.weight_decay))
    return tx, schedule


def init_state(key: jax.Array, *, model: flow.FlowPolicyNet, tx: optax.GradientTransformation,
               state_dim: int, ema: bool) -> dict[str, Any]:
    params_key, key = jax.random.split(key)
    params = flow.init_params(model, params_key, state_dim)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": key}
    if ema:
        state["ema_params"] = params
    return state


def train_step(state: dict[str, Any], batch: dict[str, jax.Array], *, model: flow.FlowPolicyNet,
               tx: optax.GradientTransformation, ema_decay: float | None):
    rng, key = jax.random.split(state["rng"])
    loss, grads = jax.value_and_grad(flow.loss_fn)(state["params"], model, batch, key)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
    if ema_decay is not None:
        new["ema_params"] = optax.incremental_update(params, state["ema_params"], 1.0 - ema_decay)
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def inference_params(state: dict[str, Any]) -> dict[str, Any]:
    """What params/ holds: {"model": EMA weights if kept, else the trained weights}."""
    return {"model": state.get("ema_params", state["params"])}


def _loader_abstract(replicated) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct((), np.int32, sharding=replicated) for k in LOADER_KEYS}


# ---------------------------------------------------------------- the loop


def train(config: TrainConfig, *, stop_at: int | None = None) -> ImitationResult:
    """Train `config` (algo kind flow) on the JAX backend; `stop_at` interrupts after that step."""
    validate(config)
    algo, data = config.algo, config.data
    is_primary = jax.process_index() == 0

    # Everything that can fail on user input fails before the run directory is touched.
    stats = imitation_lib.load_stats(config)
    source = imitation_lib.open_source(config)
    state_dim, action_dim = imitation_lib.check_dims(data, source.features, stats, config.name)
    group, input_fn = imitation_lib.input_pipeline(data, stats)

    mesh = sharding.make_mesh(config.fsdp_devices)
    data_sharding = sharding.data_sharding(mesh)
    replicated = sharding.replicated(mesh)
    # --data.batch-size is the global batch (as --env.num-envs is global on both backends):
    # each process loads its slice of every global batch.
    if data.batch_size % jax.process_count():
        raise ConfigError(f"--data.batch-size ({data.batch_size}) must be divisible by the "
                          f"number of JAX processes ({jax.process_count()}).")
    sharding.check_divisible("--data.batch-size", data.batch_size, mesh)
    process_data = dataclasses.replace(data, batch_size=data.batch_size // jax.process_count())

    def to_device(batch: dict) -> dict:
        batch = {k: np.asarray(v) for k, v in batch.items()}
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sharding, x), batch)

    try:
        iterator = lerobot_data.make_batch_iterator(
            process_data, source, transform=input_fn, device_put=to_device,
            shard_index=jax.process_index(), num_shards=jax.process_count())
    except lerobot_data.DatasetError as error:
        raise ConfigError(str(error)) from None

    run_dir = config.run_dir
    resuming = distributed.prepare_run_dir(config)
    logger.info("Run directory %s | %d device(s), mesh %s | %d frames, %d episodes, state %d, "
                "actions %d x %d", run_dir.absolute(), mesh.size, dict(mesh.shape), len(source),
                source.num_episodes, state_dim, data.action_horizon, action_dim)

    model = flow.make_model(algo, action_dim=action_dim, horizon=data.action_horizon)
    tx, schedule = make_optimizer(algo)
    init = functools.partial(init_state, model=model, tx=tx, state_dim=state_dim,
                             ema=algo.ema_decay is not None)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    state_sharding = sharding.fsdp_sharding(abstract, mesh)
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, ema_decay=algo.ema_decay),
                      in_shardings=(state_sharding, data_sharding),
                      out_shardings=(state_sharding, replicated), donate_argnums=0)

    writer_ckpt = checkpoints.CheckpointWriter(run_dir, max_to_keep=config.max_to_keep,
                                               keep_period=config.keep_period,
                                               async_save=config.async_checkpointing)
    manager = writer_ckpt.manager
    config_dict = config_lib.to_dict(config)
    assets = {run_dir_lib.CONFIG_FILE: config_dict}
    if stats is not None:
        assets[run_dir_lib.NORM_STATS_FILE] = imitation_lib.stats_payload(stats)
    try:
        if resuming:
            state = _restore(manager, run_dir, abstract, state_sharding, replicated, model,
                             state_dim, iterator)
        else:
            state = jax.jit(init, out_shardings=state_sharding)(jax.random.PRNGKey(config.seed))
    except BaseException:
        writer_ckpt.close()
        raise
    step = int(state["step"])

    writer = metrics_lib.MetricWriter(run_dir, config=config_dict, resuming=resuming,
                                      wandb_enabled=config.wandb_enabled,
                                      progress=config.progress_bar, active=is_primary)
    sample = input_fn(source.get_batch(np.arange(data.batch_size)))
    abstract_batch = {k: jax.ShapeDtypeStruct((data.batch_size, *np.shape(sample[k])[1:]),
                                              np.asarray(sample[k]).dtype, sharding=data_sharding)
                      for k in imitation_lib.BATCH_KEYS}
    compile_start = time.perf_counter()
    step_fn = step_fn.lower(state, abstract_batch).compile()
    compile_seconds = time.perf_counter() - compile_start
    logger.info("Compiled the %s train step in %.1f s", algo.mode, compile_seconds)

    total = config.num_updates
    end = total if stop_at is None else min(stop_at, total)
    loss_tag = metrics_lib.loss_tag(algo.mode)
    history: list[dict[str, float]] = []
    final_eval: dict[str, float] = {}
    losses: list[jax.Array] = []

    def evaluate(at: int) -> dict[str, float]:
        params = jax.device_get(inference_params(state))["model"]
        chunk_fn = flow.make_chunk_fn(model, params, num_steps=algo.num_integration_steps,
                                      seed=config.seed, input_transform=group.input_fn(),
                                      output_transform=group.output_fn())
        start = time.perf_counter()
        result = chunk_eval.evaluate(chunk_fn, imitation_lib.eval_env_id(config),
                                     episodes=algo.eval_episodes,
                                     execute_horizon=algo.execute_horizon,
                                     seed=EVAL_SEED + config.seed)
        scalars = {metrics_lib.EVAL_RETURN: result["episode_return"]}
        if "success_rate" in result:
            scalars[metrics_lib.EVAL_SUCCESS_RATE] = result["success_rate"]
        writer.write(at, scalars)
        history.append({"step": at, **scalars})
        logger.info("Eval at step %d (%d episodes, %s, k=%d, %.1f s): %s", at, algo.eval_episodes,
                    imitation_lib.eval_env_id(config), algo.execute_horizon,
                    time.perf_counter() - start,
                    " ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
        return result

    start_time = last_time = time.perf_counter()
    iterator.pop_data_wait()
    try:
        while step < end:
            if losses:
                # The device has finished the previous step: the time next() blocks from here
                # on is time the device waits for data (perf/data_wait_frac). Without this,
                # async dispatch would let the loop run ahead and count compute as data wait.
                losses[-1].block_until_ready()
            batch = next(iterator)
            state, out = step_fn(state, batch)
            losses.append(out["loss"])
            step += 1
            if step % config.log_interval == 0 or step == end:
                now = time.perf_counter()
                seconds = max(now - last_time, 1e-9)
                scalars = {loss_tag: float(np.mean(jax.device_get(losses))),
                           metrics_lib.LEARNING_RATE: float(schedule(step - 1)),
                           metrics_lib.SPS: len(losses) * data.batch_size / seconds,
                           metrics_lib.DATA_WAIT_FRAC: iterator.pop_data_wait() / seconds}
                writer.write(step, scalars)
                history.append({"step": step, "time": now - start_time, **scalars})
                writer.progress(step, total, scalars[metrics_lib.SPS], scalars[loss_tag],
                                step_name="step", rate_unit="samples/s", value_name="loss")
                losses = []
                last_time = now
            if (is_primary and algo.eval_episodes and algo.eval_interval
                    and step % algo.eval_interval == 0 and step < total):
                evaluate(step)
            if step % config.save_interval == 0 or step == end:
                writer_ckpt.save(step, params=inference_params(state),
                                 train_state={**state, LOADER: {
                                     k: np.int32(v) for k, v in iterator.state_dict().items()}},
                                 assets=assets)
            if step % config.log_interval == 0:
                last_time = time.perf_counter()  # evaluation and saving are not training time
                iterator.pop_data_wait()
        train_seconds = time.perf_counter() - start_time
        if is_primary and algo.eval_episodes and step == total:
            final_eval = evaluate(step)
        writer_ckpt.wait()
    finally:
        iterator.close()
        writer_ckpt.close()
        writer.close()

    params = jax.device_get(inference_params(state))
    logger.info("Done: %d steps. Checkpoints in %s ; TensorBoard: tensorboard --logdir %s",
                step, run_dir.absolute(), config.checkpoint_base_dir)
    return ImitationResult(run_dir, step, params, state, history, compile_seconds, train_seconds,
                           eval=final_eval)


def _restore(manager, run_dir, abstract, state_sharding, replicated, model, state_dim,
             iterator) -> dict[str, Any]:
    """The latest checkpoint's train state on this mesh; the loader continues at its position."""
    step = manager.latest_step()
    found = canonical.shapes(checkpoints.load_params(run_dir / str(step))["model"])
    problems = canonical.problems(found, flow.param_shapes(model, state_dim))
    if problems:
        raise ConfigError(f"Cannot resume {run_dir / str(step)}: its params do not fit the model "
                          f"this config and dataset make ({' | '.join(problems)}). Did the dataset "
                          f"or the network change? Start a new --exp-name or pass --overwrite.")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sharding)
    target[LOADER] = _loader_abstract(replicated)
    restored = checkpoints.restore_train_state(manager, step, target)
    loader = {k: int(v) for k, v in restored.pop(LOADER).items()}
    try:
        iterator.load_state_dict(loader)
    except ValueError as error:
        raise ConfigError(f"Cannot resume {run_dir / str(step)}: {error}") from None
    logger.info("Resumed from %s at step %d (loader epoch %d, index %d)", run_dir / str(step), step,
                loader["epoch"], loader["index"])
    return restored
