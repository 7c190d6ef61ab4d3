"""Supervised training of the flow (or regression) chunk policy on the Torch backend.

The mirror of vibe_rl_jax/imitation.py with the Torch backend's pieces: the
run-directory rules (`common.run_dir.initialize_run_dir`), the atomic step
writer and retention (`vibe_rl_torch.checkpoints`), the shared metric tags
(`common.metrics.MetricWriter`), the data loader over the same seeded order
(`common.lerobot_data.make_torch_loader`). The optimizer is `torch.optim.AdamW`
after a global-norm clip, its learning rate `common.schedules.lr_at` (the
reference the optax schedule of the JAX side matches), EMA optional.

A plain training loop on one process (a step is one small batch; Lightning's
per-step machinery would cost more than the step). `trainer.pt` holds the raw
weights, EMA weights, optimizer and scheduler state, step, the noise
generator's state and the loader position, so `--resume` continues at the same
sample and gives the same weights as a straight run; `params/model.safetensors`
holds the canonical inference weights (the EMA ones when EMA is on) and
`assets/` config.json and norm_stats.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from common import chunk_eval
from common import config as config_lib
from common import imitation as imitation_lib
from common import lerobot_data
from common import metrics as metrics_lib
from common import run_dir as run_dir_lib
from common import schedules
from common.config import ConfigError, TrainConfig
from vibe_rl_torch import checkpoints, flow, networks

logger = logging.getLogger("vibe_rl")

validate = imitation_lib.validate


@dataclasses.dataclass
class ImitationResult:
    run_dir: Any
    final_step: int
    params: dict[str, np.ndarray]  # canonical inference params
    module: flow.FlowPolicyNet  # the trained (raw, not EMA) model
    history: list[dict[str, float]]
    train_seconds: float
    ema: dict[str, torch.Tensor] | None = None
    eval: dict[str, float] = dataclasses.field(default_factory=dict)


class Prefetcher:
    """Prepares the loader's next batches in a background thread (torch ops release the GIL).

    Each batch travels with the loader position after it, so `state_dict()` is
    the position after the last batch *consumed*, never after the prefetched
    ones: a checkpoint resumes at the next unseen sample.
    """

    def __init__(self, loader: Any, depth: int = 2):
        self.loader = loader
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._state = loader.state_dict()
        self.data_wait_s = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True, name="vibe-rl-prefetch")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = (next(self.loader), self.loader.state_dict(), None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the consumer
            self._queue.put((None, None, error))

    def __next__(self) -> dict:
        start = time.perf_counter()
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self._state = state
        self.data_wait_s += time.perf_counter() - start
        return batch

    def pop_data_wait(self) -> float:
        wait, self.data_wait_s = self.data_wait_s, 0.0
        return wait

    def state_dict(self) -> dict:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _check_single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("Imitation training on the Torch backend runs on one process; launch "
                          "it without torchrun (or use --backend jax for data parallelism).")


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params (optax.incremental_update's formula)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            ema[name].mul_(decay).add_(param.detach(), alpha=1.0 - decay)


def inference_params(model: flow.FlowPolicyNet,
                     ema: dict[str, torch.Tensor] | None) -> dict[str, np.ndarray]:
    """Canonical weights for params/: the EMA weights when EMA is on."""
    if ema is None:
        return networks.canonical_params(model)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(ema[name])
        params = networks.canonical_params(model)
        for name, param in model.named_parameters():
            param.copy_(saved[name])
    return params


def _inference_model(model: flow.FlowPolicyNet, config: TrainConfig,
                     ema: dict[str, torch.Tensor] | None, dims: tuple[int, int]):
    copy = flow.make_model(config.algo, state_dim=dims[0], action_dim=dims[1],
                           horizon=config.data.action_horizon)
    networks.load_canonical(copy, inference_params(model, ema))
    return copy.eval()


def train(config: TrainConfig, *, stop_at: int | None = None) -> ImitationResult:
    """Train `config` (algo kind flow) on the Torch backend; `stop_at` interrupts after that step."""
    validate(config)
    _check_single_process()
    algo, data = config.algo, config.data
    stats = imitation_lib.load_stats(config)
    source = imitation_lib.open_source(config)
    state_dim, action_dim = imitation_lib.check_dims(data, source.features, stats, config.name)
    group, batch_fn = imitation_lib.input_pipeline(data, stats)
    try:
        loader = lerobot_data.make_torch_loader(data, source, transform=batch_fn)
    except lerobot_data.DatasetError as error:
        raise ConfigError(str(error)) from None

    run_dir = config.run_dir
    resuming = run_dir_lib.initialize_run_dir(run_dir, resume=config.resume,
                                              overwrite=config.overwrite)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # tiny MLPs: one intra-op thread is fastest (as in train.py)
    init_gen = torch.Generator().manual_seed(config.seed)
    model = flow.make_model(algo, state_dim=state_dim, action_dim=action_dim,
                            horizon=data.action_horizon, generator=init_gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=algo.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=algo.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: schedules.lr_at("warmup_cosine", 1.0, s, algo.num_steps,
                                             algo.warmup_steps))
    noise_gen = torch.Generator().manual_seed(config.seed + 1)
    ema = ({n: p.detach().clone() for n, p in model.named_parameters()}
           if algo.ema_decay is not None else None)
    step = 0
    config_dict = config_lib.to_dict(config)
    if resuming:
        step = _restore(run_dir, model, optimizer, scheduler, noise_gen, ema, loader)

    writer = metrics_lib.MetricWriter(run_dir, config=config_dict, resuming=resuming,
                                      wandb_enabled=config.wandb_enabled,
                                      progress=config.progress_bar)
    saver = checkpoints.CheckpointWriter(run_dir, max_to_keep=config.max_to_keep,
                                         keep_period=config.keep_period,
                                         async_save=config.async_checkpointing)
    extra_assets = {}
    if stats is not None:
        extra_assets[f"{run_dir_lib.ASSETS_DIR}/{run_dir_lib.NORM_STATS_FILE}"] = json.dumps(
            imitation_lib.stats_payload(stats), indent=2).encode()

    def save(at: int) -> None:
        trainer_state = {"update_step": at, "world_size": 1, "model": model.state_dict(),
                         "ema": ema, "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(),
                         "noise_generator": noise_gen.get_state(),
                         "loader": loader.state_dict()}
        files = checkpoints.step_files(params=inference_params(model, ema),
                                       trainer_state=trainer_state, rank_states=[],
                                       config=config_dict)
        saver.save(at, {**files, **extra_assets})

    def evaluate(at: int) -> dict[str, float]:
        chunk_fn = flow.make_chunk_fn(_inference_model(model, config, ema, (state_dim, action_dim)),
                                      num_steps=algo.num_integration_steps, seed=config.seed,
                                      input_transform=group.input_fn(),
                                      output_transform=group.output_fn())
        result = chunk_eval.evaluate(chunk_fn, imitation_lib.eval_env_id(config),
                                     episodes=algo.eval_episodes,
                                     execute_horizon=algo.execute_horizon,
                                     seed=imitation_lib.EVAL_SEED + config.seed)
        scalars = {metrics_lib.EVAL_RETURN: result["episode_return"]}
        if "success_rate" in result:
            scalars[metrics_lib.EVAL_SUCCESS_RATE] = result["success_rate"]
        writer.write(at, scalars)
        history.append({"step": at, **scalars})
        logger.info("Eval at step %d: %s", at, " ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
        return result

    total = config.num_updates
    end = total if stop_at is None else min(stop_at, total)
    loss_tag = metrics_lib.loss_tag(algo.mode)
    history: list[dict[str, float]] = []
    losses: list[float] = []
    final_eval: dict[str, float] = {}
    model.train()
    if data.prefetch > 0 and data.num_workers == 0:
        loader = Prefetcher(loader, data.prefetch)
    start_time = last_time = time.perf_counter()
    loader.pop_data_wait()
    try:
        while step < end:
            batch = next(loader)
            loss = flow.loss_fn(model, batch, noise_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), algo.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            if ema is not None:
                _ema_update(ema, model, algo.ema_decay)
            losses.append(float(loss.detach()))
            step += 1
            if step % config.log_interval == 0 or step == end:
                now = time.perf_counter()
                seconds = max(now - last_time, 1e-9)
                scalars = {loss_tag: float(np.mean(losses)), metrics_lib.LEARNING_RATE: lr,
                           metrics_lib.SPS: len(losses) * data.batch_size / seconds,
                           metrics_lib.DATA_WAIT_FRAC: loader.pop_data_wait() / seconds}
                writer.write(step, scalars)
                history.append({"step": step, "time": now - start_time, **scalars})
                writer.progress(step, total, scalars[metrics_lib.SPS], scalars[loss_tag],
                                step_name="step", rate_unit="samples/s", value_name="loss")
                losses = []
            if algo.eval_episodes and algo.eval_interval and step % algo.eval_interval == 0 \
                    and step < total:
                evaluate(step)
            if step % config.save_interval == 0 or step == end:
                save(step)
            if step % config.log_interval == 0:
                last_time = time.perf_counter()
                loader.pop_data_wait()
        train_seconds = time.perf_counter() - start_time
        if algo.eval_episodes and step == total:
            final_eval = evaluate(step)
        saver.wait()
    finally:
        if isinstance(loader, Prefetcher):
            loader.close()
        saver.close()
        writer.close()
    logger.info("Done: %d steps. Checkpoints in %s", step, run_dir.absolute())
    return ImitationResult(run_dir, step, inference_params(model, ema), model, history,
                           train_seconds, ema, final_eval)


def _restore(run_dir, model, optimizer, scheduler, noise_gen, ema, loader) -> int:
    step_dir = run_dir_lib.step_dir(run_dir, run_dir_lib.latest_step(run_dir))
    state = checkpoints.load_trainer_state(step_dir)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ConfigError(f"Cannot resume {step_dir}: its weights do not fit the model this "
                          f"config and dataset make ({error}). Start a new --exp-name or pass "
                          f"--overwrite.") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    noise_gen.set_state(state["noise_generator"])
    if ema is not None:
        if state.get("ema") is None:
            raise ConfigError(f"{step_dir} was trained without EMA; resume without "
                              f"--algo.ema-decay or start a new run.")
        for name in ema:
            ema[name].copy_(state["ema"][name])
    try:
        loader.load_state_dict(state["loader"])
    except ValueError as error:
        raise ConfigError(f"Cannot resume {step_dir}: {error}") from None
    logger.info("Resumed from %s at step %d", step_dir, int(state["update_step"]))
    return int(state["update_step"])
