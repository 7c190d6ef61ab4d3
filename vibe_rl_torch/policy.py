"""Load a Torch checkpoint step as a batched inference function for `common.policy.Policy`.

The mirror of vibe_rl_jax/policy.py. The canonical params in
`<step>/params/model.safetensors` (written by Torch training, or by
scripts/convert_checkpoint.py from a JAX checkpoint) are checked against the
layout `convert.families` declares for the config's algorithm and env, then
copied strictly into the torch network: a missing, extra or mis-shaped
parameter is one error listing them all. The forward pass mirrors the JAX
one step for step, in float32 under `torch.inference_mode`:

    PPO  normalise obs (saved statistics) -> actor -> argmax logits / Gaussian mean,
         or a sample from a seeded stream; Box actions clipped to the bounds
    DQN  normalise -> Q network -> argmax Q (greedy; DQN has no sampling policy)
    SAC  normalise -> actor -> tanh-squash the mean into the action bounds, or squash a
         sample of the pre-tanh Gaussian

Environments are looked up in gymnasium for their spaces only. Lightning is
not imported: serving needs torch, gymnasium and this package.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from common.config import DQNConfig, PPOConfig, SACConfig, TrainConfig
from common.policy import (ACTIONS_KEY, OBSERVATION_KEY, ArraySpec, CheckpointError, LoadedModel,
                           action_spec_metadata)
from convert import canonical, families
from convert.families import Spaces
from vibe_rl_torch import checkpoints, envs, networks

OBS_CLIP = envs.OBS_CLIP
OBS_EPS = envs.OBS_EPS


def use_few_threads() -> None:
    """One intra-op thread, as the Torch backend trains (tiny MLPs run fastest on one).

    An explicit OMP_NUM_THREADS is respected.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def env_spaces(config: TrainConfig) -> tuple[Spaces, envs.ActionSpec]:
    """The observation shape and action space of the config's gymnasium env."""
    envs.check_env_id(config.env.id)
    env = gym.make(config.env.id)
    try:
        obs_dim = envs.observation_dim(env.observation_space, config.env.id)
        spec = envs.action_spec(env.action_space, config.env.id)
    finally:
        env.close()
    return Spaces((obs_dim,), spec.dim, spec.continuous), spec


def spaces(config: TrainConfig) -> Spaces:
    """What convert/ needs to know about the env to declare the network's layout."""
    if config.algo.kind == "flow":  # imitation configs name no env to build; dims are in the params
        raise CheckpointError("A flow checkpoint's state and action sizes come from its params "
                              "(convert.checkpoint.checkpoint_spaces), not from an env.")
    return env_spaces(config)[0]


Forward = Callable[[torch.Tensor], torch.Tensor]


def _ppo(config: TrainConfig, sp: Spaces, spec: envs.ActionSpec, deterministic: bool,
         generator: torch.Generator) -> tuple[torch.nn.Module, Forward]:
    algo: PPOConfig = config.algo
    net = networks.ActorCritic(sp.obs_dim, sp.action_dim, sp.continuous, tuple(algo.hidden_sizes),
                               algo.activation, algo.init_log_std)

    def forward(obs: torch.Tensor) -> torch.Tensor:
        out = net.actor(obs)
        if not sp.continuous:
            if not deterministic:  # Gumbel-max, as vibe_rl_torch.ppo.sample_action
                out = out - torch.empty_like(out).exponential_(generator=generator).log()
            return torch.argmax(out, dim=-1).to(torch.int32)
        if not deterministic:
            out = out + net.log_std.exp() * torch.randn(out.shape, generator=generator)
        return torch.clamp(out, torch.from_numpy(spec.low), torch.from_numpy(spec.high))

    return net, forward


def _dqn(config: TrainConfig, sp: Spaces, spec: envs.ActionSpec, deterministic: bool,
         generator: torch.Generator) -> tuple[torch.nn.Module, Forward]:
    algo: DQNConfig = config.algo
    if not deterministic:
        raise CheckpointError("A DQN policy is greedy (argmax Q); it has no action distribution "
                              "to sample. Serve it with deterministic actions (drop "
                              "--no-deterministic).")
    net = networks.QNetwork(sp.obs_dim, sp.action_dim, tuple(algo.hidden_sizes), algo.activation)
    return net, lambda obs: torch.argmax(net(obs), dim=-1).to(torch.int32)


def _sac(config: TrainConfig, sp: Spaces, spec: envs.ActionSpec, deterministic: bool,
         generator: torch.Generator) -> tuple[torch.nn.Module, Forward]:
    algo: SACConfig = config.algo
    net = networks.SACActor(sp.obs_dim, sp.action_dim, tuple(algo.hidden_sizes), algo.activation,
                            algo.log_std_min, algo.log_std_max)
    low, high = torch.from_numpy(spec.low), torch.from_numpy(spec.high)

    def forward(obs: torch.Tensor) -> torch.Tensor:
        mean, log_std = net(obs)
        if not deterministic:
            mean = mean + log_std.exp() * torch.randn(mean.shape, generator=generator)
        return low + 0.5 * (high - low) * (torch.tanh(mean) + 1.0)  # vibe_rl_jax.sac.squash

    return net, forward


_BUILDERS = {"ppo": _ppo, "dqn": _dqn, "sac": _sac}


def load_model(step_dir: pathlib.Path | str, config: TrainConfig, *, deterministic: bool = True,
               seed: int = 0) -> LoadedModel:
    """Params of `step_dir` + the network of `config` -> batched `{"observation"} -> {"actions"}`."""
    if config.algo.kind == "flow":  # imitation chunk policies (norm stats from assets/)
        from vibe_rl_torch import flow
        return flow.load_model(step_dir, config, deterministic=deterministic, seed=seed)
    build = _BUILDERS.get(config.algo.kind)
    if build is None:
        raise CheckpointError(f"No Torch policy loader for algo kind {config.algo.kind!r}; "
                              f"known: {', '.join(sorted(_BUILDERS))}.")
    use_few_threads()
    sp, spec = env_spaces(config)
    try:
        flat = checkpoints.load_params(step_dir)
        canonical.check(flat, families.checkpoint_layout(config, sp),
                        f"The params in {step_dir} do not match the network its "
                        f"assets/config.json describes")
    except (canonical.CanonicalParamsError, FileNotFoundError) as error:
        raise CheckpointError(str(error)) from None
    model_params, stats = families.split_normalizer(flat)
    generator = torch.Generator().manual_seed(seed)
    net, forward = build(config, sp, spec, deterministic, generator)
    networks.load_canonical(net, model_params)
    net.eval()
    mean = var_eps = None
    if stats is not None:
        mean = torch.from_numpy(np.asarray(stats["mean"], np.float32))
        var_eps = torch.from_numpy(np.asarray(stats["var"], np.float32)) + OBS_EPS

    def infer_fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = torch.from_numpy(np.ascontiguousarray(batch[OBSERVATION_KEY], np.float32))
        with torch.inference_mode():
            if mean is not None:  # vibe_rl_torch.envs.normalize, in torch
                obs = torch.clamp((obs - mean) / torch.sqrt(var_eps), -OBS_CLIP, OBS_CLIP)
            actions = forward(obs)
        return {ACTIONS_KEY: actions.numpy()}

    return LoadedModel(
        infer_fn=infer_fn,
        input_spec={OBSERVATION_KEY: ArraySpec(sp.obs_shape, "float32")},
        metadata={"action_spec": action_spec_metadata(spec.continuous, spec.dim, spec.low,
                                                      spec.high)},
    )
