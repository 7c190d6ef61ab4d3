"""Supervised training of the flow (or regression) chunk policy on the Torch backend.

The mirror of vibe_rl_jax/imitation.py as a LightningModule (`ImitationModule`)
run by the same Lightning Trainer set-up as PPO/DQN/SAC (`vibe_rl_torch.runtime`):
one process, or DDP under torchrun on one node or many (gloo on CPU, NCCL on
GPU; world size and ranks from the torchrun environment only). One
`training_step` is one AdamW step (after a global-norm clip, learning rate
`common.schedules.lr_at`'s warmup + cosine through `LambdaLR`), then the EMA
update when EMA is on. The run-dir rules, the atomic step writer, the metric
tags and the console line are the RL trainer's.

Data parallelism: `--data.batch-size` is the *global* batch (as on one JAX
host). Each of the WORLD_SIZE ranks reads its own disjoint slice of every
global batch of the one seeded shuffle (`common.lerobot_data.ShuffleOrder`
with shard = rank), so every rank shares one loader position; each rank draws
the flow noise of the whole global batch from identically seeded generators
and keeps its slice; the loss each rank back-propagates is its share of the
masked mean over the *global* batch (the count of valid action entries is
summed over ranks), and DDP averages the gradients. A step on W ranks is thus
the step one process takes on the concatenated batch, up to float summation
order, and the logged loss is the global batch's. Only rank 0 evaluates and
writes logs and checkpoints.

Sharding (`--fsdp-devices N` > 1, under torchrun): the model's parameters,
gradients, optimizer state and EMA are sharded with FSDP2 (`fully_shard`,
`vibe_rl_torch.runtime.fully_shard_model`) over groups of N ranks, replicated
over the WORLD_SIZE / N groups (HSDP on a ("batch", "fsdp") mesh; plain FSDP
when N = WORLD_SIZE). The data split and the loss shares are the ones above:
FSDP2 averages gradients over all ranks as DDP does, so the step is the same.
For evaluation and checkpoints the full weights, EMA and optimizer state are
gathered to rank 0 (`torch.distributed.checkpoint.state_dict`, every rank
taking part, offloaded to CPU): fine at this model size; a DCP sharded save
would be the next step for models that do not fit one host.

`trainer.pt` holds the raw weights, EMA weights, optimizer and scheduler
state (full, unsharded: one format whatever the topology, so a run saved under
FSDP resumes on one process or under DDP and back), step, the noise
generator's state and the loader position (all equal on every rank), so
`--resume` continues at the same sample and, on one process or at the same
world size and topology, gives the same weights as a straight run (on another
one it continues at the same sample, equal up to float summation order). No other randomness is drawn: initial weights come from
`config.seed`, the shuffle is a pure function of (data seed, epoch, position),
evaluation episodes have their own seeds. `params/model.safetensors` holds the
canonical inference weights (the EMA ones when EMA is on) and `assets/`
config.json and norm_stats.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
import time
import warnings
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import distribute_tensor

from common import chunk_eval
from common import config as config_lib
from common import imitation as imitation_lib
from common import lerobot_data
from common import metrics as metrics_lib
from common import run_dir as run_dir_lib
from common import schedules
from common.config import ConfigError, TrainConfig
from common.run_dir import RunDirError
from vibe_rl_torch import checkpoints, distributed, flow, networks, runtime
from vibe_rl_torch.distributed import DistInfo, LaunchError

logger = logging.getLogger("vibe_rl")


@dataclasses.dataclass
class ImitationResult:
    run_dir: Any
    final_step: int
    params: dict[str, np.ndarray]  # canonical inference params
    module: flow.FlowPolicyNet  # the trained (raw, not EMA) model; FSDP-sharded under FSDP
    history: list[dict[str, float]]  # rank 0's logged scalars (empty on other ranks)
    train_seconds: float
    ema: dict[str, torch.Tensor] | None = None  # full EMA weights (under FSDP: rank 0's only)
    eval: dict[str, float] = dataclasses.field(default_factory=dict)


def validate(config: TrainConfig, info: DistInfo | None = None) -> None:
    """The shared imitation checks; the global batch must split evenly over the ranks and
    `--fsdp-devices` must divide WORLD_SIZE."""
    imitation_lib.validate(config)
    info = distributed.from_environment() if info is None else info
    per_rank_batch(config, info)
    runtime.check_fsdp(info, config.fsdp_devices)


def per_rank_batch(config: TrainConfig, info: DistInfo) -> int:
    """`--data.batch-size` is the global batch: each of WORLD_SIZE ranks reads batch / WORLD_SIZE."""
    batch = config.data.batch_size
    if batch % info.world_size:
        raise LaunchError(
            f"--data.batch-size ({batch}) must be divisible by the number of processes "
            f"(WORLD_SIZE={info.world_size} from torchrun): it is the global batch and each rank "
            f"reads batch-size / WORLD_SIZE samples of it. Change --data.batch-size or "
            f"--nproc-per-node/--nnodes.")
    return batch // info.world_size


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


@dataclasses.dataclass
class FullWeights:
    """Full (unsharded) CPU state dicts of the raw model and its EMA (None without EMA).

    Under FSDP they are gathered to rank 0 only: `held` is False on the other ranks."""
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None

    @property
    def held(self) -> bool:
        return bool(self.model)


def _inference_model(model: flow.FlowPolicyNet, config: TrainConfig,
                     weights: FullWeights) -> flow.FlowPolicyNet:
    """A plain (unsharded) copy of `model` holding the inference weights: EMA when EMA is on."""
    copy = flow.make_model(config.algo, state_dim=model.state_dim, action_dim=model.action_dim,
                           horizon=config.data.action_horizon)
    copy.load_state_dict({**weights.model, **(weights.ema or {})})
    return copy.eval()


def inference_params(model: flow.FlowPolicyNet, config: TrainConfig,
                     weights: FullWeights) -> dict[str, np.ndarray]:
    """Canonical weights for params/: the EMA weights when EMA is on ({} where not held)."""
    if not weights.held:
        return {}
    return networks.canonical_params(_inference_model(model, config, weights))


def _optimizer_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (`get_optimizer_state_dict`) in `Optimizer.state_dict()`'s
    layout: parameters numbered in param-group order, so every topology reads the same file."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                             for group in state["param_groups"]]}


def _optimizer_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `_optimizer_by_index` for a model whose parameters are `names` in order."""
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def shard_loss(model: flow.FlowPolicyNet, batch: dict[str, torch.Tensor],
               generator: torch.Generator, info: DistInfo,
               reduce_sum: Callable[[torch.Tensor], torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(what this rank back-propagates, its share of the global batch's loss).

    `batch` is this rank's slice of the global batch. The flow loss is the
    masked mean over the slice; rescaled by (valid entries here) / (valid
    entries in the global batch, `reduce_sum` over ranks) it becomes this
    rank's share of the global batch's masked mean, so the shares sum to the
    loss one process computes on the whole batch. Back-propagating share x
    WORLD_SIZE makes DDP's gradient average that loss's gradient. One process:
    the loss itself, no collective.
    """
    world = info.world_size
    loss = flow.loss_fn(model, batch, generator, shard_index=info.rank, num_shards=world)
    if world == 1:
        return loss, loss
    count = flow.valid_count(batch)
    share = loss * (count / reduce_sum(count.clone()))
    return share * world, share


class ImitationModule(L.LightningModule):
    """One `training_step` = one optimizer step on this rank's slice of a global batch.

    Optimisation is manual (as in PPO): the EMA update follows each optimizer
    step, and the batch comes from this rank's resumable loader rather than
    from Lightning's dataloader (which would prefetch past the position a
    checkpoint must record); `fit` iterates over the update indices.

    With `config.fsdp_devices` > 1, `configure_model` (Lightning calls it on every
    rank before the optimizer exists) shards the model with FSDP2 and the EMA
    like it (DTensors with the parameters' placements, so its update stays
    local). Weights and EMA are restored before that, in full, and then sharded.
    """

    def __init__(self, config: TrainConfig, model: flow.FlowPolicyNet, loader: Any,
                 info: DistInfo, accelerator: str = "cpu"):
        super().__init__()
        self.automatic_optimization = False
        self.config, self.algo, self.info = config, config.algo, info
        self.accelerator_kind = accelerator
        self.sharded = False  # True once configure_model has applied fully_shard
        self.model = model
        self.loader = loader
        self.ema = ({n: p.detach().clone() for n, p in model.named_parameters()}
                    if self.algo.ema_decay is not None else None)
        self.noise_gen = torch.Generator().manual_seed(config.seed + 1)
        self.update_step = 0  # optimizer steps completed
        self.last_lr = float("nan")  # the learning rate of the last step
        self._restore: dict[str, Any] | None = None

    # ---------------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """FSDP2 over the ("batch", "fsdp") mesh when --fsdp-devices > 1 (a collective)."""
        if self.config.fsdp_devices == 1 or self.sharded:
            return
        # FlowPolicyNet.forward returns a reshape (a view); FSDP2 warns that an in-place op on it
        # would skip its backward hook. flow.loss_fn only reads it out of place (and the tests
        # check the sharded gradients against one process's), so the warning is noise here.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor",
                                category=UserWarning)
        mesh = runtime.fsdp_mesh(self.info, self.accelerator_kind, self.config.fsdp_devices)
        runtime.fully_shard_model(self.model, mesh)
        self.sharded = True
        params = list(self.model.parameters())
        held = distributed.gather_to_primary(sum(p.to_local().numel() for p in params))
        if self.info.is_primary:
            logger.info("FSDP2 shards: rank entries %s of %d (mesh %s)", held,
                        sum(p.numel() for p in params), mesh)
        if self.ema is not None:
            self.ema = {name: distribute_tensor(self.ema[name].to(param.device),
                                                param.device_mesh, param.placements)
                        for name, param in self.model.named_parameters()}

    def full_weights(self) -> FullWeights:
        """The full raw and EMA weights on CPU. Under FSDP a collective that every rank must
        call; the result is held by rank 0 only (`FullWeights.held`)."""
        if not self.sharded:
            return FullWeights(
                {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                None if self.ema is None else {k: v.cpu() for k, v in self.ema.items()})
        model = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        ema = None
        if self.ema is not None:  # one tensor at a time, so at most one is whole on the device
            ema = {name: value.full_tensor().cpu() for name, value in self.ema.items()}
            ema = ema if self.info.is_primary else {}
        return FullWeights(model, ema)

    # ---------------------------------------------------------------- optimizer / schedule
    def configure_optimizers(self):
        algo = self.algo
        # fused AdamW also steps FSDP2's DTensor parameters (checked on CPU and in the tests).
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=algo.lr, betas=(0.9, 0.999),
                                      eps=1e-8, weight_decay=algo.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: schedules.lr_at("warmup_cosine", 1.0, s, algo.num_steps,
                                                 algo.warmup_steps))
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def on_fit_start(self) -> None:
        """Move the EMA and noise generator to the module's device; apply a pending restore."""
        saved = self._restore or {}
        if self.ema is not None and not self.sharded:
            self.ema = {name: value.to(self.device) for name, value in self.ema.items()}
        if self.noise_gen.device != self.device:
            self.noise_gen = torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
        if "noise_generator" in saved:
            if saved.get("noise_generator_device", "cpu") == self.noise_gen.device.type:
                self.noise_gen.set_state(saved["noise_generator"])
            else:  # a CPU generator's state does not fit a CUDA one (or back)
                self.noise_gen.manual_seed(int(np.random.SeedSequence(
                    [self.config.seed + 1, self.update_step]).generate_state(1)[0]))
                if self.info.is_primary:
                    logger.warning("Resumed on %s a run saved on %s: the flow-noise generator is "
                                   "re-seeded, so the run is not a bit-exact continuation.",
                                   self.noise_gen.device.type, saved["noise_generator_device"])
        if "optimizer" in saved and self.sharded:  # the full state, sharded like the params
            names = [name for name, _ in self.model.named_parameters()]
            set_optimizer_state_dict(self.model, self.trainer.optimizers[0],
                                     _optimizer_by_name(saved["optimizer"], names),
                                     options=StateDictOptions(full_state_dict=True))
            self.trainer.lr_scheduler_configs[0].scheduler.load_state_dict(saved["scheduler"])
        elif "optimizer" in saved:
            self.trainer.optimizers[0].load_state_dict(saved["optimizer"])
            self.trainer.lr_scheduler_configs[0].scheduler.load_state_dict(saved["scheduler"])
        self._restore = None

    # ---------------------------------------------------------------- update
    def training_step(self, update: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        batch = {key: value.to(self.device, non_blocking=True)
                 for key, value in next(self.loader).items()}
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        loss, share = shard_loss(self.model, batch, self.noise_gen, self.info,
                                 lambda x: self.trainer.strategy.reduce(x, reduce_op="sum"))
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=self.algo.max_grad_norm,
                            gradient_clip_algorithm="norm")
        self.last_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if self.ema is not None:
            self._ema_update(self.algo.ema_decay)
        self.update_step += 1
        return {"loss_share": share.detach()}

    def _ema_update(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * params (optax.incremental_update's formula)."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                self.ema[name].mul_(decay).add_(param.detach(), alpha=1.0 - decay)

    # ---------------------------------------------------------------- state
    def trainer_state(self, weights: FullWeights) -> dict[str, Any]:
        """Everything resume needs (train_state/trainer.pt): equal on every rank, full (unsharded)
        whatever the topology. Under FSDP a collective (the optimizer state is gathered to
        rank 0, whose result alone is complete)."""
        optimizer = self.trainer.optimizers[0]
        if self.sharded:
            full = get_optimizer_state_dict(
                self.model, optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            optimizer_state = _optimizer_by_index(full) if full else {}
        else:
            optimizer_state = optimizer.state_dict()
        return {"update_step": self.update_step, "world_size": self.info.world_size,
                "fsdp_devices": self.config.fsdp_devices if self.sharded else 1,
                "model": weights.model, "ema": weights.ema,
                "optimizer": optimizer_state,
                "scheduler": self.trainer.lr_scheduler_configs[0].scheduler.state_dict(),
                "noise_generator": self.noise_gen.get_state(),
                "noise_generator_device": self.noise_gen.device.type,
                "loader": self.loader.state_dict()}

    def load_trainer_state(self, state: dict[str, Any], step_dir: Any) -> None:
        """Weights, EMA, step and loader position now; optimizer and generator at fit start."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ConfigError(f"Cannot resume {step_dir}: its weights do not fit the model this "
                              f"config and dataset make ({error}). Start a new --exp-name or pass "
                              f"--overwrite.") from None
        if self.ema is not None:
            if state.get("ema") is None:
                raise ConfigError(f"{step_dir} was trained without EMA; resume without "
                                  f"--algo.ema-decay or start a new run.")
            for name in self.ema:
                self.ema[name].copy_(state["ema"][name])
        try:
            self.loader.load_state_dict(state["loader"])
        except ValueError as error:
            raise ConfigError(f"Cannot resume {step_dir}: {error}") from None
        self.update_step = int(state["update_step"])
        self._restore = {key: state[key] for key in ("optimizer", "scheduler", "noise_generator")}
        self._restore["noise_generator_device"] = state.get("noise_generator_device", "cpu")


class _Bookkeeper(L.Callback):
    """After each step: sum the loss; every log_interval log; eval_interval evaluate; save."""

    def __init__(self, config: TrainConfig, info: DistInfo, end: int,
                 writer: metrics_lib.MetricWriter, saver: checkpoints.CheckpointWriter | None,
                 save_files: dict[str, bytes], evaluate):
        self.config, self.info, self.end = config, info, end
        self.writer, self.saver, self.save_files = writer, saver, save_files
        self.evaluate = evaluate
        self.loss_tag = metrics_lib.loss_tag(config.algo.mode)
        self.loss_sum: torch.Tensor | float = 0.0
        self.updates = 0
        self.history: list[dict[str, float]] = []
        self.start_time = self.last_time = time.perf_counter()

    def on_train_start(self, trainer, module: ImitationModule) -> None:
        self.start_time = self.last_time = time.perf_counter()
        module.loader.pop_data_wait()

    def on_train_batch_end(self, trainer, module: ImitationModule, outputs, batch,
                           batch_idx) -> None:
        self.loss_sum = self.loss_sum + outputs["loss_share"].double()
        self.updates += 1
        step, config, algo = module.update_step, self.config, self.config.algo
        if step % config.log_interval == 0 or step == self.end:
            self._log(module, step)
        eval_due = bool(algo.eval_episodes and algo.eval_interval
                        and step % algo.eval_interval == 0 and step < config.num_updates)
        save_due = step % config.save_interval == 0 or step == self.end
        # Gathering the full weights is a collective under FSDP: every rank, then rank 0 uses them.
        weights = module.full_weights() if eval_due or save_due else None
        if eval_due and self.info.is_primary:
            self.evaluate(step, weights)
        if save_due:
            self.save(module, step, weights)
        if step % config.log_interval == 0:
            self.last_time = time.perf_counter()
            module.loader.pop_data_wait()

    def _log(self, module: ImitationModule, step: int) -> None:
        now = time.perf_counter()
        seconds = max(now - self.last_time, 1e-9)
        (loss_sum,) = distributed.all_reduce_sum([float(self.loss_sum)]).tolist()
        # The slowest rank's wait: DDP's gradient all-reduce makes every rank wait for it.
        (wait,) = distributed.all_reduce_max([module.loader.pop_data_wait()]).tolist()
        scalars = {self.loss_tag: loss_sum / self.updates,
                   metrics_lib.LEARNING_RATE: module.last_lr,
                   metrics_lib.SPS: self.updates * self.config.data.batch_size / seconds,
                   metrics_lib.DATA_WAIT_FRAC: wait / seconds}
        self.loss_sum, self.updates = 0.0, 0
        self.writer.write(step, scalars)
        self.history.append({"step": step, "time": now - self.start_time, **scalars})
        self.writer.progress(step, self.config.num_updates, scalars[metrics_lib.SPS],
                             scalars[self.loss_tag], step_name="step", rate_unit="samples/s",
                             value_name="loss")

    def save(self, module: ImitationModule, step: int, weights: FullWeights) -> None:
        """Every rank calls this (the optimizer-state gather is a collective under FSDP); rank 0
        writes. Sharded parameters differ across ranks by design, so the DDP in-sync check
        (equal fingerprints) applies to unsharded runs only."""
        if not module.sharded:
            runtime.check_in_sync(module.model, self.info, step)
        trainer_state = module.trainer_state(weights)
        if self.saver is None:
            return
        params = inference_params(module.model, self.config, weights)
        files = checkpoints.step_files(params=params, trainer_state=trainer_state, rank_states=[],
                                       config=config_lib.to_dict(self.config))
        self.saver.save(step, {**files, **self.save_files})


def _read_checkpoint(run_dir, info: DistInfo) -> tuple[Any, dict[str, Any]]:
    """Rank 0 reads the latest step's train state and sends it to every rank (no shared
    filesystem needed across nodes)."""
    payload: tuple[str, Any] | None = None
    if info.is_primary:
        step_dir = run_dir_lib.step_dir(run_dir, run_dir_lib.latest_step(run_dir))
        try:
            payload = ("ok", (step_dir, checkpoints.load_trainer_state(step_dir)))
        except FileNotFoundError as error:
            payload = ("error", str(error))
    payload = distributed.broadcast_from_primary(payload)
    if payload[0] == "error":
        raise RunDirError(payload[1])
    return payload[1]


def train(config: TrainConfig, *, stop_at: int | None = None) -> ImitationResult:
    """Train `config` (algo kind flow) on the Torch backend; `stop_at` interrupts after that step."""
    imitation_lib.validate(config)
    runtime.check_fsdp(distributed.from_environment(), config.fsdp_devices)
    with runtime.session() as (info, accelerator):
        return _train(config, info, accelerator, stop_at)


def _train(config: TrainConfig, info: DistInfo, accelerator: str,
           stop_at: int | None) -> ImitationResult:
    algo, data = config.algo, config.data
    batch = per_rank_batch(config, info)
    stats = imitation_lib.load_stats(config)
    source = imitation_lib.open_source(config)
    state_dim, action_dim = imitation_lib.check_dims(data, source.features, stats, config.name)
    group, batch_fn = imitation_lib.input_pipeline(data, stats)
    try:
        loader = lerobot_data.make_torch_loader(
            dataclasses.replace(data, batch_size=batch), source, transform=batch_fn,
            shard_index=info.rank, num_shards=info.world_size, pin_memory=accelerator == "gpu")
    except lerobot_data.DatasetError as error:
        raise ConfigError(str(error)) from None

    run_dir = config.run_dir
    resuming = runtime.prepare_run_dir(config, info)
    if info.is_primary:
        logger.info("Run directory %s | %d process(es) on %d node(s), %s, global batch %d "
                    "(%d per process)%s", run_dir.absolute(), info.world_size, info.num_nodes,
                    accelerator, data.batch_size, batch,
                    f", FSDP2: parameters sharded over {config.fsdp_devices} ranks x "
                    f"{info.world_size // config.fsdp_devices} replica group(s)"
                    if config.fsdp_devices > 1 else "")
    model = flow.make_model(algo, state_dim=state_dim, action_dim=action_dim,
                            horizon=data.action_horizon,
                            generator=torch.Generator().manual_seed(config.seed))
    module = ImitationModule(config, model, loader, info, accelerator)
    if resuming:
        step_dir, state = _read_checkpoint(run_dir, info)
        module.load_trainer_state(state, step_dir)
        if info.is_primary:
            logger.info("Resumed from %s at step %d (saved by %d process(es))", step_dir,
                        module.update_step, int(state.get("world_size", 1)))

    writer = metrics_lib.MetricWriter(run_dir, config=config_lib.to_dict(config),
                                      resuming=resuming, wandb_enabled=config.wandb_enabled,
                                      progress=config.progress_bar, active=info.is_primary)
    saver = (checkpoints.CheckpointWriter(run_dir, max_to_keep=config.max_to_keep,
                                          keep_period=config.keep_period,
                                          async_save=config.async_checkpointing)
             if info.is_primary else None)
    save_files = {}
    if stats is not None:
        save_files[f"{run_dir_lib.ASSETS_DIR}/{run_dir_lib.NORM_STATS_FILE}"] = json.dumps(
            imitation_lib.stats_payload(stats), indent=2).encode()

    def evaluate(at: int, weights: FullWeights) -> dict[str, float]:
        """Rank 0's rollouts of the gathered weights (`ImitationModule.full_weights`)."""
        chunk_fn = flow.make_chunk_fn(_inference_model(model, config, weights),
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
        bookkeeper.history.append({"step": at, **scalars})
        logger.info("Eval at step %d: %s", at, " ".join(f"{k} {v:.3f}" for k, v in scalars.items()))
        return result

    total = config.num_updates
    end = total if stop_at is None else min(stop_at, total)
    bookkeeper = _Bookkeeper(config, info, end, writer, saver, save_files, evaluate)
    trainer = runtime.make_trainer(info, accelerator, [bookkeeper], config.fsdp_devices)
    if data.prefetch > 0 and data.num_workers == 0:
        module.loader = Prefetcher(loader, data.prefetch)
    train_seconds = 0.0
    final_eval: dict[str, float] = {}
    try:
        if module.update_step < end:
            model.train()
            trainer.fit(module, train_dataloaders=range(module.update_step, end))
            train_seconds = time.perf_counter() - bookkeeper.start_time
        weights = module.full_weights()  # every rank (a collective under FSDP)
        if algo.eval_episodes and module.update_step == total and info.is_primary:
            final_eval = evaluate(module.update_step, weights)
        if saver is not None:
            saver.wait()
    finally:
        if isinstance(module.loader, Prefetcher):
            module.loader.close()
        if saver is not None:
            saver.close()
        writer.close()
    if info.is_primary:
        logger.info("Done: %d steps. Checkpoints in %s", module.update_step, run_dir.absolute())
    return ImitationResult(run_dir, module.update_step, inference_params(model, config, weights),
                           model, bookkeeper.history, train_seconds, weights.ema, final_eval)
