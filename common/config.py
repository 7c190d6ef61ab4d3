"""The one configuration tree both backends read.

Every experiment is a frozen `TrainConfig`. The algorithm is a tagged union
(`AlgoConfig`): each member carries a literal `kind` tag, so a resolved
`config.json` says which algorithm it describes and later algorithms (DQN, SAC,
flow matching) join by adding a member. Validation runs in `__post_init__`, so a
bad value fails when the command line is parsed, with a message naming the
flag, not deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Literal, Union

import tyro

Backend = Literal["jax", "torch"]


class ConfigError(ValueError):
    """A config value is invalid; the message names the flag and what to do."""


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _require_positive(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if not value > 0:
            raise ConfigError(f"{_flag(prefix + name)} must be positive, got {value!r}.")


def _require_fraction(obj: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{_flag(prefix + name)} must be in [0, 1], got {value!r}.")


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Which environment to train on and how many copies run side by side."""

    id: str = "CartPole-v1"
    """Environment id (gymnax id on the JAX backend, gymnasium id on the Torch backend)."""
    num_envs: int = 4
    """Environments stepped in parallel (split over data-parallel devices / ranks)."""
    normalize_obs: bool = False
    """Normalize observations with running mean/variance (statistics are saved with the params)."""
    reward_scale: float = 1.0
    """Multiply rewards by this before learning (episode returns are logged unscaled)."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError("--env.id must be a non-empty environment id, e.g. CartPole-v1.")
        _require_positive(self, "env.", "num_envs", "reward_scale")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Proximal Policy Optimization (clipped surrogate, GAE), PureJaxRL/CleanRL defaults."""

    kind: tyro.conf.Suppress[Literal["ppo"]] = "ppo"
    """Tag of this member of the algorithm union."""
    lr: float = 2.5e-4
    """Peak learning rate of Adam."""
    lr_schedule: Literal["constant", "linear", "warmup_cosine"] = "linear"
    """constant; linear anneal to 0 over training; or linear warmup then cosine decay."""
    warmup_updates: int = 0
    """Updates of linear warmup (warmup_cosine only)."""
    num_steps: int = 128
    """Rollout length per environment per update."""
    update_epochs: int = 4
    """Passes over each rollout batch."""
    num_minibatches: int = 4
    """Minibatches per epoch; num_envs * num_steps must divide evenly."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_eps: float = 0.2
    """PPO ratio clip range."""
    clip_value: bool = True
    """Clip the value update to clip_eps around the old value (PureJaxRL/CleanRL)."""
    ent_coef: float = 0.01
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    normalize_advantages: bool = True
    """Standardize advantages per minibatch."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Hidden layer widths of the actor and of the critic MLP."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden activation."""
    init_log_std: float = 0.0
    """Initial log standard deviation of the Gaussian policy (continuous actions only)."""

    def __post_init__(self) -> None:
        _require_positive(self, "algo.", "lr", "num_steps", "update_epochs", "num_minibatches",
                          "max_grad_norm")
        _require_fraction(self, "algo.", "gamma", "gae_lambda")
        if self.clip_eps <= 0:
            raise ConfigError(f"--algo.clip-eps must be positive, got {self.clip_eps!r}.")
        if self.warmup_updates < 0:
            raise ConfigError(f"--algo.warmup-updates must be >= 0, got {self.warmup_updates!r}.")
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(
                f"--algo.hidden-sizes must be one or more positive widths, got {self.hidden_sizes!r}.")


@dataclasses.dataclass(frozen=True)
class DQNConfig:
    """Deep Q-learning (discrete actions): double-DQN target, hard or Polyak target updates."""

    kind: tyro.conf.Suppress[Literal["dqn"]] = "dqn"
    """Tag of this member of the algorithm union."""
    lr: float = 2.5e-4
    """Learning rate of Adam."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """constant, or linear anneal to 0 over training."""
    buffer_size: int = 10_000
    """Replay buffer capacity (transitions)."""
    batch_size: int = 128
    """Transitions per gradient step."""
    learning_starts: int = 10_000
    """Environment steps collected before the first gradient step."""
    train_frequency: int = 1
    """Vector-env steps (each steps every env) per update; an update then takes gradient_steps."""
    gradient_steps: int = 1
    """Gradient steps per update."""
    gamma: float = 0.99
    """Discount factor."""
    target_update_interval: int = 50
    """Gradient steps between target-network updates."""
    tau: float = 1.0
    """Target update rate: 1 copies the online network (hard), < 1 is Polyak averaging."""
    eps_start: float = 1.0
    """Initial epsilon of epsilon-greedy exploration."""
    eps_end: float = 0.05
    """Final epsilon."""
    exploration_fraction: float = 0.5
    """Fraction of total_timesteps over which epsilon decays linearly."""
    double_dqn: bool = True
    """Select the next action with the online network, evaluate it with the target network."""
    n_step: int = 1
    """Rewards summed into each TD target (n-step returns; 1 = the one-step target)."""
    loss: Literal["huber", "mse"] = "mse"
    """TD loss: Huber (delta 1) or squared error."""
    max_grad_norm: float = 10.0
    """Global gradient-norm clip."""
    hidden_sizes: tuple[int, ...] = (120, 84)
    """Hidden layer widths of the Q network."""
    activation: Literal["tanh", "relu"] = "relu"
    """Hidden activation."""

    def __post_init__(self) -> None:
        _require_positive(self, "algo.", "lr", "buffer_size", "batch_size", "train_frequency",
                          "gradient_steps", "target_update_interval", "max_grad_norm", "n_step")
        _require_fraction(self, "algo.", "gamma", "tau", "eps_start", "eps_end",
                          "exploration_fraction")
        if self.tau == 0:
            raise ConfigError("--algo.tau must be in (0, 1]: 0 would never update the target.")
        if self.batch_size > self.buffer_size:
            raise ConfigError(f"--algo.batch-size ({self.batch_size}) must not exceed "
                              f"--algo.buffer-size ({self.buffer_size}).")
        if self.learning_starts < 0:
            raise ConfigError("--algo.learning-starts must be >= 0.")
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(
                f"--algo.hidden-sizes must be one or more positive widths, got {self.hidden_sizes!r}.")


@dataclasses.dataclass(frozen=True)
class SACConfig:
    """Soft actor-critic (continuous actions): tanh-Gaussian actor, twin critics, auto temperature."""

    kind: tyro.conf.Suppress[Literal["sac"]] = "sac"
    """Tag of this member of the algorithm union."""
    actor_lr: float = 3e-4
    """Learning rate of the actor."""
    critic_lr: float = 3e-4
    """Learning rate of the twin critics."""
    alpha_lr: float = 3e-4
    """Learning rate of the temperature."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity (transitions)."""
    batch_size: int = 256
    """Transitions per gradient step."""
    learning_starts: int = 1_000
    """Environment steps with uniform random actions before learning starts."""
    train_frequency: int = 1
    """Vector-env steps (each steps every env) per update; an update then takes gradient_steps."""
    gradient_steps: int = 1
    """Gradient steps per update."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    init_alpha: float = 1.0
    """Initial temperature."""
    autotune_alpha: bool = True
    """Tune the temperature toward target_entropy (else keep init_alpha)."""
    target_entropy: float | None = None
    """Entropy target of the temperature loss; None means -action_dim."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the actor and of each critic."""
    activation: Literal["tanh", "relu"] = "relu"
    """Hidden activation."""
    log_std_min: float = -5.0
    """Lower bound of the actor's log standard deviation."""
    log_std_max: float = 2.0
    """Upper bound of the actor's log standard deviation."""

    def __post_init__(self) -> None:
        _require_positive(self, "algo.", "actor_lr", "critic_lr", "alpha_lr", "buffer_size",
                          "batch_size", "train_frequency", "gradient_steps", "init_alpha")
        _require_fraction(self, "algo.", "gamma", "tau")
        if self.batch_size > self.buffer_size:
            raise ConfigError(f"--algo.batch-size ({self.batch_size}) must not exceed "
                              f"--algo.buffer-size ({self.buffer_size}).")
        if self.learning_starts < 0:
            raise ConfigError("--algo.learning-starts must be >= 0.")
        if self.log_std_min >= self.log_std_max:
            raise ConfigError("--algo.log-std-min must be below --algo.log-std-max.")
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(
                f"--algo.hidden-sizes must be one or more positive widths, got {self.hidden_sizes!r}.")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Imitation: a flow-matching action-chunk policy (pi0's recipe) or its mean-regression baseline."""

    kind: tyro.conf.Suppress[Literal["flow"]] = "flow"
    """Tag of this member of the algorithm union."""
    mode: Literal["flow", "regression"] = "flow"
    """flow: learn the velocity field and sample chunks; regression: predict the chunk by MSE."""
    encoder_sizes: tuple[int, ...] = (128,)
    """Hidden widths of the observation encoder (an MLP on the state)."""
    hidden_sizes: tuple[int, ...] = (256, 256)
    """Hidden widths of the action expert MLP."""
    time_embed_dim: int = 32
    """Width of the sinusoidal time embedding (flow mode; even)."""
    activation: Literal["relu", "silu", "gelu"] = "silu"
    """Hidden activation (gelu is the exact, erf form on both backends)."""
    num_steps: int = 10_000
    """Training steps (one batch of --data.batch-size samples each); replaces --total-timesteps."""
    lr: float = 3e-4
    """Peak learning rate of AdamW (linear warmup, then cosine decay to 0 at num_steps)."""
    warmup_steps: int = 500
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    num_integration_steps: int = 10
    """Euler steps from t=1 (noise) to t=0 (actions) when sampling a chunk."""
    execute_horizon: int = 4
    """Receding horizon k: execute the first k actions of each predicted chunk, then replan."""
    ema_decay: float | None = None
    """EMA of the weights (e.g. 0.999); the EMA weights are saved as the inference params. None: off."""
    eval_episodes: int = 100
    """Evaluation episodes at the end of training (0: no evaluation)."""
    eval_interval: int | None = None
    """Also evaluate every this many steps (a multiple of --log-interval); None: only at the end."""
    eval_env_id: str | None = None
    """gymnasium env id to evaluate in; None: --env.id."""

    def __post_init__(self) -> None:
        _require_positive(self, "algo.", "lr", "num_steps", "max_grad_norm", "time_embed_dim",
                          "num_integration_steps", "execute_horizon", "eval_interval")
        if self.time_embed_dim % 2:
            raise ConfigError(f"--algo.time-embed-dim must be even, got {self.time_embed_dim}.")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.eval_episodes < 0:
            raise ConfigError("--algo.warmup-steps, --algo.weight-decay and --algo.eval-episodes "
                              "must be >= 0.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"--algo.ema-decay must be in (0, 1) (or None for no EMA), "
                              f"got {self.ema_decay!r}.")
        for name in ("encoder_sizes", "hidden_sizes"):
            sizes = getattr(self, name)
            if not sizes or any(h <= 0 for h in sizes):
                raise ConfigError(f"--algo.{name.replace('_', '-')} must be one or more positive "
                                  f"widths, got {sizes!r}.")


# The tagged union of algorithm configs (the preset picks the member; `kind` is the tag).
AlgoConfig = Union[PPOConfig, DQNConfig, SACConfig, FlowConfig]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: preset name, experiment, environment, algorithm, checkpointing."""

    name: tyro.conf.Suppress[str]
    """Preset name; the run directory is checkpoints/<name>/<exp_name>."""
    exp_name: str = tyro.MISSING
    """Experiment name (required): the run directory is <checkpoint_base_dir>/<preset>/<exp_name>."""
    backend: Backend = "jax"
    """Which framework trains: jax (gymnax envs) or torch (gymnasium envs, Lightning)."""
    seed: int = 0
    """Seed of every random stream (params, envs, minibatch shuffling)."""
    total_timesteps: int = 500_000
    """Environment steps to train for (rounded down to whole updates)."""
    log_interval: int = 10
    """Updates between log lines / TensorBoard points (the JAX loop is jitted in chunks of this)."""
    save_interval: int = 50
    """Updates between checkpoints (a multiple of log_interval); the last update is always saved."""
    keep_period: int | None = None
    """Checkpoints whose update is a multiple of this are never deleted."""
    max_to_keep: int = 2
    """Most recent checkpoints kept (besides keep_period ones)."""
    async_checkpointing: bool = True
    """Write checkpoints in the background while training continues."""
    checkpoint_base_dir: str = "checkpoints"
    """Root of all run directories."""
    resume: bool = False
    """Continue the latest checkpoint of an existing run directory."""
    overwrite: bool = False
    """Delete an existing run directory and start fresh."""
    fsdp_devices: int = 1
    """Size of the mesh's fsdp axis (ranks each parameter is sharded over); 1 = plain data
    parallelism. Torch backend: FSDP2 for imitation (flow) training under torchrun, dividing
    WORLD_SIZE; RL algorithms there are DDP only (1)."""
    wandb_enabled: bool = False
    """Also log to Weights & Biases (needs the wandb extra); the run id is kept for --resume."""
    progress_bar: bool = True
    """Show a progress line on the console."""
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    """Environment."""
    algo: AlgoConfig = dataclasses.field(default_factory=PPOConfig)
    """Algorithm and its hyperparameters (the preset chooses which)."""
    data: lerobot_data.DataConfig | None = None
    """Demonstration dataset of imitation presets (algo kind flow); None for RL."""

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite are exclusive: pass one of them, not both.")
        if self.exp_name is not tyro.MISSING and (not self.exp_name or "/" in self.exp_name):
            raise ConfigError(f"--exp-name must be a non-empty name without '/', got {self.exp_name!r}.")
        _require_positive(self, "", "total_timesteps", "log_interval", "save_interval",
                          "keep_period", "max_to_keep", "fsdp_devices")
        if self.save_interval % self.log_interval:
            raise ConfigError(
                f"--save-interval ({self.save_interval}) must be a multiple of --log-interval "
                f"({self.log_interval}): training is compiled in chunks of log_interval updates.")
        if isinstance(self.algo, PPOConfig):
            batch = self.env.num_envs * self.algo.num_steps
            if batch % self.algo.num_minibatches:
                raise ConfigError(
                    f"--algo.num-minibatches ({self.algo.num_minibatches}) must divide the batch "
                    f"--env.num-envs x --algo.num-steps = {self.env.num_envs} x "
                    f"{self.algo.num_steps} = {batch}.")
            if self.total_timesteps < batch:
                raise ConfigError(
                    f"--total-timesteps ({self.total_timesteps}) is smaller than one update "
                    f"(--env.num-envs x --algo.num-steps = {batch}).")
        elif isinstance(self.algo, FlowConfig):
            if self.data is None:
                raise ConfigError("Imitation (algo kind flow) needs a dataset: the preset's data "
                                  "config, e.g. --data.root data/two_goal.")
            if self.algo.execute_horizon > self.data.action_horizon:
                raise ConfigError(
                    f"--algo.execute-horizon ({self.algo.execute_horizon}) must not exceed the "
                    f"chunk length --data.action-horizon ({self.data.action_horizon}).")
            if self.algo.eval_interval is not None and self.algo.eval_interval % self.log_interval:
                raise ConfigError(
                    f"--algo.eval-interval ({self.algo.eval_interval}) must be a multiple of "
                    f"--log-interval ({self.log_interval}).")
        elif self.total_timesteps < self.steps_per_update:
            raise ConfigError(
                f"--total-timesteps ({self.total_timesteps}) is smaller than one update "
                f"(--env.num-envs x --algo.train-frequency = {self.steps_per_update}).")

    @property
    def run_dir(self) -> pathlib.Path:
        return pathlib.Path(self.checkpoint_base_dir) / self.name / self.exp_name

    @property
    def steps_per_update(self) -> int:
        """Environment steps collected per update (all envs together)."""
        if isinstance(self.algo, PPOConfig):
            return self.env.num_envs * self.algo.num_steps
        if isinstance(self.algo, FlowConfig):  # samples per training step (per process)
            return self.data.batch_size if self.data is not None else 1
        return self.env.num_envs * self.algo.train_frequency

    @property
    def batch_size(self) -> int:
        """Environment steps collected per update (PPO's rollout batch); see steps_per_update."""
        return self.steps_per_update

    @property
    def num_updates(self) -> int:
        """Updates of the run; for imitation the training steps (--algo.num-steps)."""
        if isinstance(self.algo, FlowConfig):
            return self.algo.num_steps
        return self.total_timesteps // self.steps_per_update


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (written to assets/config.json)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


_ALGO_BY_KIND = {"ppo": PPOConfig, "dqn": DQNConfig, "sac": SACConfig, "flow": FlowConfig}


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict` output (e.g. a checkpoint's config.json)."""
    data = dict(data)
    algo = dict(data.pop("algo"))
    kind = algo.get("kind", "ppo")
    if kind not in _ALGO_BY_KIND:
        raise ConfigError(f"config.json: unknown algo.kind {kind!r}; known: {sorted(_ALGO_BY_KIND)}.")
    algo_cls = _ALGO_BY_KIND[kind]
    for key, value in list(algo.items()):
        if isinstance(value, list):
            algo[key] = tuple(value)
    dataset = data.pop("data", None)
    if dataset is not None:
        dataset = lerobot_data.DataConfig(**{key: tuple(value) if isinstance(value, list) else value
                                             for key, value in dataset.items()})
    return TrainConfig(env=EnvConfig(**data.pop("env")), algo=algo_cls(**algo), data=dataset,
                       **data)


# At the end, as a module (not `from ... import DataConfig`): lerobot_data imports ConfigError
# from here, so whichever of the two is imported first, the other is complete by the time
# TrainConfig's annotations are resolved (tyro) or from_dict runs. lerobot_data imports lerobot
# (and torch) lazily, so common stays framework-free.
from common import lerobot_data  # noqa: E402
