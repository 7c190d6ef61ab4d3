"""Named, runnable experiment presets and the command line that picks one.

Like openpi's `_CONFIGS`: one list, names checked unique, a mistyped name gets
"did you mean", and any field can be overridden on the command line
(`train.py cartpole_ppo --exp-name r1 --algo.lr 1e-3`). Every preset here is
exercised by a test for a few updates; a preset that crashes is worse than none.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from typing import Sequence

import tyro

from common.config import (ConfigError, DQNConfig, EnvConfig, FlowConfig, PPOConfig, SACConfig,
                           TrainConfig)
from common.lerobot_data import DataConfig

# Imitation presets (algo kind "flow") read a LeRobot dataset; the recipe for each:
#   python scripts/collect_demos.py --root <data.root> ...       (demonstrations)
#   python scripts/compute_norm_stats.py <preset>   (to data.norm_stats_path or assets/<preset>/)
#   python scripts/train.py <preset> --exp-name <name>
_TWO_GOAL_DATA = DataConfig(repo_id="local/two_goal", root="data/two_goal", action_horizon=8,
                            norm_stats_path="assets/two_goal/norm_stats.json",  # shared by both
                            batch_size=256)
# Measured (2 cores, JAX, 200 clean demos, 400 eval episodes, seeds 0 / 1): 4500 steps of 256
# samples (~11 s) give the flow policy 96% / 95% success and the regression baseline 0% / 0%,
# executing k=4 of 8 actions (3000 steps: flow ~93-96%). Lower lr or more replanning (k=2)
# lets regression sometimes commit to a side (8-62%); k=8 costs flow accuracy (84%). Noisy
# (DART) demos lift flow to 98% but regression to 93%: they teach it to commit.
_TWO_GOAL_FLOW = FlowConfig(num_steps=4500, lr=3e-3, warmup_steps=200, execute_horizon=4,
                            eval_episodes=100)
_PENDULUM_DATA = DataConfig(repo_id="local/pendulum", root="data/pendulum", action_horizon=4,
                            batch_size=256)

_PRESETS: list[tuple[str, TrainConfig]] = [
    (
        # PureJaxRL's CartPole settings: 4 envs x 128 steps, 4 epochs x 4 minibatches.
        "Discrete-action PPO on CartPole-v1 (PureJaxRL settings; reaches return 500).",
        # Measured on 2 CPU cores: ~10 s to return 500 including compile; peak RSS 1.5 GB.
        TrainConfig(
            name="cartpole_ppo",
            total_timesteps=500_000,
            log_interval=10,
            save_interval=100,
            env=EnvConfig(id="CartPole-v1", num_envs=4),
            algo=PPOConfig(),
        ),
    ),
    (
        "Continuous-action PPO (Gaussian policy) on Pendulum-v1.",
        TrainConfig(
            name="pendulum_ppo",
            # Measured: mean return about -160 after 200k steps, about -150 at the end.
            total_timesteps=500_000,
            log_interval=10,
            save_interval=100,
            env=EnvConfig(id="Pendulum-v1", num_envs=16, normalize_obs=True, reward_scale=0.1),
            algo=PPOConfig(
                lr=1e-3,
                num_steps=256,
                update_epochs=10,
                num_minibatches=16,
                gamma=0.95,
                gae_lambda=0.95,
                ent_coef=0.0,
                clip_value=False,
                lr_schedule="linear",
                hidden_sizes=(64, 64),
                init_log_std=-0.5,
            ),
        ),
    ),
    (
        "DQN (double, hard target updates) on CartPole-v1, PureJaxRL's DQN settings.",
        # Measured on 2 cores: return 500 after ~3e5 env steps, ~25 s in all.
        TrainConfig(
            name="cartpole_dqn",
            total_timesteps=500_000,
            log_interval=500,
            save_interval=5000,
            env=EnvConfig(id="CartPole-v1", num_envs=10),
            algo=DQNConfig(),
        ),
    ),
    (
        "SAC (twin critics, auto temperature) on Pendulum-v1, 8 envs, one gradient step per 8 env steps.",
        # Measured on 2 cores: ~7k env steps/s, mean return about -130 after 6e4 steps (~10 s).
        # 128-wide nets and 8 envs per gradient step: the 256x256, one-update-per-step recipe
        # spends 30x the FLOPs on CPU for the same return on Pendulum.
        TrainConfig(
            name="pendulum_sac",
            total_timesteps=60_000,
            log_interval=250,
            save_interval=2500,
            env=EnvConfig(id="Pendulum-v1", num_envs=8),
            algo=SACConfig(buffer_size=100_000, batch_size=128, learning_starts=1_000,
                           hidden_sizes=(128, 128)),
        ),
    ),
]

_PRESETS += [
    (
        "Flow-matching chunk policy on the two-goal task (bimodal scripted demos in data/two_goal).",
        # Demos: python scripts/collect_demos.py --root data/two_goal --num-episodes 200
        TrainConfig(
            name="two_goal_flow",
            log_interval=100,
            save_interval=1000,
            env=EnvConfig(id="vibe_rl/TwoGoal-v0", num_envs=1),
            algo=_TWO_GOAL_FLOW,
            data=_TWO_GOAL_DATA,
        ),
    ),
    (
        "Mean-regression baseline of two_goal_flow (same data and network; averages the two goals).",
        TrainConfig(
            name="two_goal_regression",
            log_interval=100,
            save_interval=1000,
            env=EnvConfig(id="vibe_rl/TwoGoal-v0", num_envs=1),
            algo=dataclasses.replace(_TWO_GOAL_FLOW, mode="regression"),
            data=_TWO_GOAL_DATA,
        ),
    ),
    (
        "Flow-matching chunk policy on Pendulum-v1 from an RL expert's demos in data/pendulum.",
        # Demos: train pendulum_ppo, then python scripts/collect_demos.py --env Pendulum-v1
        #   --policy checkpoints/pendulum_ppo/<name> --root data/pendulum --num-episodes 50
        TrainConfig(
            name="pendulum_flow",
            log_interval=100,
            save_interval=1000,
            env=EnvConfig(id="Pendulum-v1", num_envs=1),
            # Measured: 1000 steps (~3 s) give mean return about -153 over 50 episodes from a
            # PPO expert (200k steps) that gets about -147 on its demos.
            algo=FlowConfig(num_steps=1000, lr=1e-3, warmup_steps=100, execute_horizon=2,
                            eval_episodes=50),
            data=_PENDULUM_DATA,
        ),
    ),
]

PRESETS: dict[str, tuple[str, TrainConfig]] = {}
for _description, _config in _PRESETS:
    if _config.name in PRESETS:
        raise ValueError(f"Duplicate preset name: {_config.name}")
    PRESETS[_config.name] = (_description, _config)


def get_preset(name: str) -> TrainConfig:
    """The preset called `name`; an unknown name suggests the closest ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS.keys(), n=3, cutoff=0.0)
        raise ConfigError(
            f"Unknown preset {name!r}. Did you mean: {', '.join(close)}? "
            f"All presets: {', '.join(PRESETS)}.")
    return PRESETS[name][1]


def names_for(kind: str) -> list[str]:
    """Presets of one algorithm (for the per-algorithm entry points)."""
    return [name for name, (_, cfg) in PRESETS.items() if cfg.algo.kind == kind]


def algorithm_cli(kind: str, default: str, prog: str) -> TrainConfig:
    """`train_<algo>.py [preset] [--field value ...]`: that algorithm's presets only."""
    return cli(presets=names_for(kind), default=default, prog=prog)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def cli(args: Sequence[str] | None = None, *, presets: Sequence[str] | None = None,
        default: str | None = None, prog: str | None = None) -> TrainConfig:
    """Parse `<preset> [--field value ...]` into a validated TrainConfig.

    `presets` restricts the choice (e.g. the PPO entry point offers PPO presets
    only); with `default`, the preset name may be left out and `--help` shows
    every field of that preset directly.
    """
    args = list(sys.argv[1:] if args is None else args)
    names = list(presets or PRESETS)
    try:
        if args and not args[0].startswith("-") and args[0] not in names:
            close = difflib.get_close_matches(args[0], names, n=3, cutoff=0.0)
            raise ConfigError(f"Unknown preset {args[0]!r}. Did you mean: {', '.join(close)}? "
                              f"All presets: {', '.join(names)}.")
        if default is not None and (not args or args[0].startswith("-")):
            config = tyro.cli(TrainConfig, default=get_preset(default), args=args, prog=prog,
                              config=(tyro.conf.AvoidSubcommands,),
                              description=PRESETS[default][0] + f" (preset {default!r}; "
                              f"name another preset first: {', '.join(names)})")
        else:
            config = tyro.extras.overridable_config_cli(
                {n: PRESETS[n] for n in names}, args=args, prog=prog)
    except ConfigError as error:
        _fail(str(error))
    return config


def replace(config: TrainConfig, **changes) -> TrainConfig:
    """`dataclasses.replace` that also accepts dotted nested fields ("algo.lr")."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = replace(getattr(config, head), **sub)
    return dataclasses.replace(config, **flat)
