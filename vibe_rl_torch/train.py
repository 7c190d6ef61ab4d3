"""The Torch training loop: a Lightning Trainer over PPO, DQN or SAC updates, on one process or
under torchrun.

`train(config)` mirrors vibe_rl_jax/train.py: the same run-directory rules
(`common.run_dir.initialize_run_dir`), the same TensorBoard tags, console line
and logging cadence (every `log_interval` updates, step = updates
completed), checkpoints at multiples of `save_interval` and at the end, and
`stop_at` to end a run early as an interruption would.

Distributed runs take their world size and ranks from torchrun only
(`vibe_rl_torch.distributed`). Each rank steps its share of the envs with its
own seed stream; metrics are summed over ranks before logging; only rank 0
writes logs and checkpoints (the other ranks' env/RNG state is gathered to
it, so a resumed DDP run continues exactly) and only rank 0 reads them back,
sending each rank its part, so the nodes of a multi-node run need no shared
filesystem. DQN/SAC replay buffers travel the same way, streamed in chunks
(vibe_rl_torch.replay); a buffer over `replay.BACKGROUND_MAX_BYTES` is written
synchronously, straight from its tensors.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import pickle
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from common import config as config_lib
from common import metrics as metrics_lib
from common import run_dir as run_dir_lib
from common.config import ConfigError, PPOConfig, TrainConfig
from common.run_dir import RunDirError
from vibe_rl_torch import checkpoints, distributed, envs, networks, offpolicy, replay, runtime
from vibe_rl_torch.distributed import DistInfo
from vibe_rl_torch.offpolicy import OffPolicyModule
from vibe_rl_torch.ppo import LOSS_NAMES, PPO

logger = logging.getLogger("vibe_rl")

_EPISODE_KEYS = ("episode_return_sum", "episode_length_sum", "episode_count")
OBS_NORMALIZER = "obs_normalizer"


@dataclasses.dataclass
class TrainResult:
    run_dir: Any
    final_step: int
    params: dict[str, np.ndarray]  # canonical inference params (+ obs_normalizer/{mean,var})
    module: PPO | OffPolicyModule
    history: list[dict[str, float]]
    train_seconds: float  # wall time of the update loop (Lightning/env set-up excluded)


def validate(config: TrainConfig) -> None:
    """Backend checks the config tree cannot do: the gymnasium id, the action space, the split
    over ranks."""
    if config.algo.kind == "flow":  # imitation from a dataset: its own loop (FSDP2 allowed)
        from vibe_rl_torch import imitation
        return imitation.validate(config)
    if config.fsdp_devices != 1:
        # Not silently ignored: a user asking for sharding would otherwise get full replicas.
        raise ConfigError(
            f"--fsdp-devices {config.fsdp_devices}: the Torch backend trains data parallel only "
            f"for {config.algo.kind} (DDP: every rank holds all the parameters); parameter "
            f"sharding (FSDP2) is for imitation training (algo kind flow). Use --fsdp-devices 1 "
            f"with --backend torch, or --backend jax for the sharded (batch, fsdp) mesh.")
    envs.check_env_id(config.env.id)
    info = distributed.from_environment()
    distributed.check_config(info, config)
    if not isinstance(config.algo, PPOConfig):
        offpolicy.check_config(config, info)


def _make_module(config: TrainConfig, venv: envs.VecEnv, rank_seed: int, info: DistInfo,
                 accelerator: str) -> PPO | OffPolicyModule:
    """The algorithm's LightningModule, by the tag of the config's algo member."""
    if isinstance(config.algo, PPOConfig):
        return PPO(config, venv, rank_seed=rank_seed)
    device = torch.device("cuda", info.local_rank) if accelerator == "gpu" else torch.device("cpu")
    return _offpolicy_class(config)(config, venv, rank_seed=rank_seed,
                                    world_size=info.world_size, device=device)


def _offpolicy_class(config: TrainConfig) -> type[OffPolicyModule]:
    kind = config.algo.kind
    if kind == "dqn":
        from vibe_rl_torch.dqn import DQN
        return DQN
    if kind == "sac":
        from vibe_rl_torch.sac import SAC
        return SAC
    raise ConfigError(f"No Torch implementation of algo.kind={kind!r}.")


def _episode_metrics(sums: dict[str, float], num_updates: int, seconds: float,
                     batch_size: int) -> dict[str, float]:
    count = sums["episode_count"]
    return {
        metrics_lib.EPISODE_RETURN: sums["episode_return_sum"] / count if count else math.nan,
        metrics_lib.EPISODE_LENGTH: sums["episode_length_sum"] / count if count else math.nan,
        metrics_lib.SPS: num_updates * batch_size / max(seconds, 1e-9),
    }


def chunk_metrics(sums: dict[str, float], num_updates: int, step: int, seconds: float,
                  learning_rate: float, batch_size: int) -> dict[str, float]:
    """The JAX backend's `_chunk_metrics`, tag for tag (sums are over ranks and updates)."""
    out = {
        **_episode_metrics(sums, num_updates, seconds, batch_size),
        metrics_lib.LEARNING_RATE: learning_rate,
        "train/approx_kl": sums["approx_kl"] / num_updates,
        "train/clip_fraction": sums["clip_fraction"] / num_updates,
    }
    for name in ("total", "policy", "value", "entropy"):
        out[metrics_lib.loss_tag(name)] = sums[name] / num_updates
    return out


def _inference_network(module: PPO | OffPolicyModule) -> torch.nn.Module:
    return module.network if isinstance(module, PPO) else module.inference_network


def inference_params(module: PPO | OffPolicyModule) -> dict[str, np.ndarray]:
    """What `params/model.safetensors` holds: canonical weights plus observation statistics
    (PPO: the actor-critic; DQN: the online Q network; SAC: the actor)."""
    params = networks.canonical_params(_inference_network(module))
    stats = module.venv.obs_normalizer()
    if stats is not None:
        params.update({f"{OBS_NORMALIZER}/{k}": v for k, v in stats.items()})
    return params


def _rank_seeds(seed: int, rank: int, num_envs: int, *salt: int) -> tuple[list[int], int]:
    """This rank's own stream: env seeds and one seed for its torch generators."""
    entropy = seed % 2**64  # SeedSequence takes non-negative ints; --seed may be negative
    state = np.random.SeedSequence(entropy, spawn_key=(rank, *salt)).generate_state(num_envs + 1)
    return [int(s) for s in state[:num_envs]], int(state[num_envs])


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _global_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state()}


def _set_global_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _warn_config_drift(saved: dict[str, Any], current: dict[str, Any]) -> None:
    ignore = {"resume", "overwrite", "progress_bar", "wandb_enabled"}
    diffs = [k for k in set(saved) | set(current)
             if k not in ignore and saved.get(k) != current.get(k)]
    if diffs:
        logger.warning("Resuming with a config that differs from the checkpoint's in: %s",
                       ", ".join(sorted(diffs)))


class _Bookkeeper(L.Callback):
    """After each update: sum metrics; every log_interval log them; every save_interval save."""

    def __init__(self, config: TrainConfig, info: DistInfo, end: int,
                 writer: metrics_lib.MetricWriter, saver: checkpoints.CheckpointWriter | None,
                 config_dict: dict[str, Any]):
        self.config, self.info, self.end = config, info, end
        self.writer, self.saver, self.config_dict = writer, saver, config_dict
        self.keys = _EPISODE_KEYS + (LOSS_NAMES if isinstance(config.algo, PPOConfig)
                                     else _offpolicy_class(config).METRIC_KEYS)
        self.sums = np.zeros(len(self.keys))
        self.updates = 0
        self.history: list[dict[str, float]] = []
        self.start_time = self.last_time = time.perf_counter()

    def on_train_start(self, trainer, module: PPO) -> None:
        self.start_time = self.last_time = time.perf_counter()

    def on_train_batch_end(self, trainer, module: PPO, outputs, batch, batch_idx) -> None:
        self.sums += np.array([outputs[k] for k in self.keys])
        self.updates += int(outputs.get("num_updates", 1))  # DQN/SAC: runs of updates
        step = module.update_step
        if step % self.config.log_interval == 0 or step == self.end:
            self._log(module, step)
        if step % self.config.save_interval == 0 or step == self.end:
            self.save(module, step)

    def _log(self, module: PPO, step: int) -> None:
        totals = distributed.all_reduce_sum(self.sums)
        sums = dict(zip(self.keys, totals.tolist()))
        now = time.perf_counter()
        if isinstance(module, PPO):
            for name in LOSS_NAMES:  # losses are means: average them over ranks
                sums[name] /= self.info.world_size
            scalars = chunk_metrics(sums, self.updates, step, now - self.last_time,
                                    module.learning_rate(step), self.config.batch_size)
        else:  # learning metrics are averaged over the updates and ranks that learned
            scalars = {**_episode_metrics(sums, self.updates, now - self.last_time,
                                          self.config.steps_per_update),
                       **module.chunk_metrics(sums, self.updates, step)}
        self.last_time = now
        self.sums[:] = 0
        self.updates = 0
        self.writer.write(step, scalars)
        self.history.append({"step": step, "time": now - self.start_time, **scalars})
        self.writer.progress(step, self.config.num_updates, scalars[metrics_lib.SPS],
                             scalars[metrics_lib.EPISODE_RETURN])

    def save(self, module: PPO | OffPolicyModule, step: int) -> None:
        """Gather every rank's state to rank 0, which writes the step directory.

        A DQN/SAC replay buffer up to `replay.BACKGROUND_MAX_BYTES` per rank travels as bytes
        with its rank's state; a larger one is streamed from its tensors (rank 0's) or over the
        process group (the others') while rank 0 writes the step, before training continues.
        """
        offpol = isinstance(module, OffPolicyModule)
        state = {"env": module.venv.state_dict(), "rng": module.rng_state(),
                 "global_rng": _global_rng_state(), "fingerprint": runtime.param_fingerprint(module)}
        stream = offpol and module.buffer.nbytes > replay.BACKGROUND_MAX_BYTES
        replay_files = {}
        if offpol:
            state["replay"] = module.buffer.cursor()
            state["nstep"] = module.nstep_windows  # numpy arrays or None
            if not stream:
                replay_files = replay.buffer_files(module.buffer, self.info.rank, stream=False)
        gathered = distributed.gather_to_primary((pickle.dumps(state), replay_files))
        if not self.info.is_primary:
            if stream:
                replay.send_buffer(module.buffer)
            return
        blobs = [blob for blob, _ in gathered]
        fingerprints = {pickle.loads(blob)["fingerprint"] for blob in blobs}
        if len(fingerprints) > 1:
            raise RuntimeError(f"DDP ranks hold different parameters at update {step} "
                               f"({sorted(fingerprints)}): gradients were not synchronised.")
        rms = module.venv.rms  # identical on every rank (reduced moments); kept for any world size
        trainer_state = {"update_step": step, "world_size": self.info.world_size,
                         "obs_rms": None if rms is None else
                         {k: torch.as_tensor(v) for k, v in rms.state_dict().items()},
                         **module.optimizer_state()}
        if offpol:
            trainer_state["algo_state"] = module.algo_state()
        files = checkpoints.step_files(params=inference_params(module),
                                       trainer_state=trainer_state, rank_states=blobs,
                                       config=self.config_dict)
        if offpol:
            buffers = {}
            for rank, (_, rank_files) in enumerate(gathered):
                buffers.update(rank_files)
            if stream:
                buffers.update(replay.buffer_files(module.buffer, 0, stream=True))
                for rank in range(1, self.info.world_size):
                    buffers.update(replay.receiving_files(module.buffer, rank))
            files.update({f"{run_dir_lib.TRAIN_STATE_DIR}/{rel}": content
                          for rel, content in buffers.items()})
        self.saver.save(step, files)


def _read_checkpoint(run_dir, info: DistInfo) -> tuple[Any, dict, dict, dict, dict | None]:
    """Rank 0 reads the latest step and sends every rank what it needs (no shared filesystem
    needed across nodes): the step's common state to all, each rank its own env/RNG state."""
    payload: tuple[str, Any] | None = None
    rank_states: list[Any] | None = None
    if info.is_primary:
        step_dir = run_dir_lib.step_dir(run_dir, run_dir_lib.latest_step(run_dir))
        try:
            trainer_state = checkpoints.load_trainer_state(step_dir)
            payload = ("ok", (step_dir, trainer_state, checkpoints.load_params(step_dir),
                              checkpoints.load_config(step_dir)))
            same_world = int(trainer_state["world_size"]) == info.world_size
            rank_states = [checkpoints.load_rank_state(step_dir, r) if same_world else None
                           for r in range(info.world_size)]
        except FileNotFoundError as error:
            payload = ("error", str(error))
    payload = distributed.broadcast_from_primary(payload)
    if payload[0] == "error":
        raise RunDirError(payload[1])
    rank_state = distributed.scatter_from_primary(rank_states)
    return (*payload[1], rank_state)


def _restore_replay(module: OffPolicyModule, step_dir, rank_state: dict | None,
                    info: DistInfo) -> None:
    """Every rank's buffer from its files: rank 0 reads its own and streams the others theirs."""
    train_state = pathlib.Path(step_dir) / run_dir_lib.TRAIN_STATE_DIR
    verdict: tuple[str, Any] | None = None
    if info.is_primary:
        try:
            replay.check_files(train_state, module.buffer, info.world_size)
            verdict = ("ok", None)
        except FileNotFoundError as error:
            verdict = ("missing", str(error))
        except ConfigError as error:
            verdict = ("mismatch", str(error))
    verdict = distributed.broadcast_from_primary(verdict)
    if verdict[0] != "ok":
        raise (RunDirError if verdict[0] == "missing" else ConfigError)(verdict[1])
    if info.is_primary:
        replay.load_files(train_state, module.buffer, 0)
        for rank in range(1, info.world_size):
            replay.send_files(train_state, module.buffer, rank)
    else:
        replay.recv_buffer(module.buffer)
    if rank_state is not None:
        module.buffer.set_cursor(rank_state["replay"])


def _restore(module: PPO | OffPolicyModule, config: TrainConfig, info: DistInfo, run_dir) -> None:
    """Load the latest step into the module, its optimizer and this rank's envs and RNGs
    (DQN/SAC: also target networks, critics, temperature and this rank's replay buffer)."""
    step_dir, trainer_state, params, saved_config, rank_state = _read_checkpoint(run_dir, info)
    model = {k: v for k, v in params.items() if not k.startswith(OBS_NORMALIZER + "/")}
    networks.load_canonical(_inference_network(module), model)
    module.update_step = int(trainer_state["update_step"])
    module.restore_optimizer_state(trainer_state)
    offpol = isinstance(module, OffPolicyModule)
    if offpol:
        module.load_algo_state(trainer_state["algo_state"])
    if info.is_primary:
        _warn_config_drift(saved_config, config_lib.to_dict(config))
    venv = module.venv
    if venv.rms is not None:
        if trainer_state["obs_rms"] is None:
            raise ConfigError(f"{step_dir} holds no observation statistics but the config has "
                              f"--env.normalize-obs: resume with the config it was trained with.")
        venv.rms.load_state_dict(trainer_state["obs_rms"])
    same_world = int(trainer_state["world_size"]) == info.world_size
    if offpol and same_world:
        _restore_replay(module, step_dir, rank_state, info)
    why = None
    if rank_state is not None and venv.load_state_dict(rank_state["env"]):
        if offpol:  # the n-step windows in flight belong with the envs' state
            module.load_nstep_windows(rank_state.get("nstep"))
        if module.restore_rng_state(rank_state["rng"]) is False:  # DQN/SAC, saved on GPU/CPU
            why = "generators saved on another device type, re-seeded"
        _set_global_rng_state(rank_state["global_rng"])
    else:
        env_seeds, rank_seed = _rank_seeds(config.seed, info.rank, venv.num_envs,
                                           module.update_step)
        _seed_globals(rank_seed)
        venv.reset(env_seeds)
        module.seed_streams(rank_seed)
        why = (f"saved with WORLD_SIZE={trainer_state['world_size']}, now {info.world_size}"
               if not same_world else "the checkpoint holds no env state")
        why += ": envs and samplers re-seeded"
        if offpol and not same_world:
            why += ", replay buffers start empty"
    if not info.is_primary:
        return
    if why is None:
        logger.info("Resumed from %s at update %d", step_dir, module.update_step)
    else:
        logger.warning("Resumed from %s at update %d (%s): params, optimizer and observation "
                       "statistics restored, so the run is not a bit-exact continuation.",
                       step_dir, module.update_step, why)


def train(config: TrainConfig, *, stop_at: int | None = None) -> TrainResult:
    """Train `config` on the Torch backend; returns the final params and logged metrics.

    `stop_at` ends the run early after that many updates (saving a checkpoint there),
    as an interruption would, without changing the config or its schedules.
    """
    if config.algo.kind == "flow":  # imitation from a dataset: its own loop
        from vibe_rl_torch import imitation
        return imitation.train(config, stop_at=stop_at)
    validate(config)
    with runtime.session() as (info, accelerator):
        return _train(config, info, accelerator, stop_at)


def _train(config: TrainConfig, info: DistInfo, accelerator: str, stop_at: int | None) -> TrainResult:
    run_dir = config.run_dir
    resuming = runtime.prepare_run_dir(config, info)
    if info.is_primary:
        logger.info("Run directory %s | %d process(es) on %d node(s), %s", run_dir.absolute(),
                    info.world_size, info.num_nodes, accelerator)
    local_envs = config.env.num_envs // info.world_size
    env_seeds, rank_seed = _rank_seeds(config.seed, info.rank, local_envs)
    _seed_globals(rank_seed)
    venv = envs.VecEnv(config.env.id, local_envs, normalize_obs=config.env.normalize_obs,
                       moments=distributed.global_moments if info.distributed else envs.local_moments)
    module = _make_module(config, venv, rank_seed, info, accelerator)
    if resuming:
        _restore(module, config, info, run_dir)
    else:
        venv.reset(env_seeds)

    config_dict = config_lib.to_dict(config)
    writer = metrics_lib.MetricWriter(run_dir, config=config_dict, resuming=resuming,
                                      wandb_enabled=config.wandb_enabled,
                                      progress=config.progress_bar, active=info.is_primary)
    saver = (checkpoints.CheckpointWriter(run_dir, max_to_keep=config.max_to_keep,
                                          keep_period=config.keep_period,
                                          async_save=config.async_checkpointing)
             if info.is_primary else None)
    total = config.num_updates
    end = total if stop_at is None else min(stop_at, total)
    bookkeeper = _Bookkeeper(config, info, end, writer, saver, config_dict)
    trainer = runtime.make_trainer(info, accelerator, [bookkeeper])
    train_seconds = 0.0
    try:
        if module.update_step < end:
            batches = (module.update_batches(module.update_step, end)  # DQN/SAC: runs of updates
                       if isinstance(module, OffPolicyModule) else range(module.update_step, end))
            trainer.fit(module, train_dataloaders=batches)
            train_seconds = time.perf_counter() - bookkeeper.start_time
        if saver is not None:
            saver.wait()
    finally:
        if saver is not None:
            saver.close()
        writer.close()
        venv.close()
    if info.is_primary:
        logger.info("Done: %d updates. Checkpoints in %s ; TensorBoard: tensorboard --logdir %s",
                    module.update_step, run_dir.absolute(), config.checkpoint_base_dir)
    return TrainResult(run_dir, module.update_step, inference_params(module), module,
                       bookkeeper.history, train_seconds)
