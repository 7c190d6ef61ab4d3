"""The flow-matching action-chunk policy in torch: the mirror of vibe_rl_jax/flow.py.

Same architecture, same shared math (common/flow_math.py, called with
xp=torch: t = 1 is noise, t = 0 is data), and module paths that are the
canonical parameter names, so `vibe_rl_torch.networks.canonical_params` /
`load_canonical` (convert/torch_modules.py) map it 1:1 onto the JAX model::

    obs_encoder.dense_<i>.weight (out, in)   <->  obs_encoder/dense_<i>/kernel (in, out)
    time_embed.dense_0.{weight,bias}         <->  time_embed/dense_0/{kernel,bias}   (flow only)
    action_expert.dense_<i>.{weight,bias}    <->  action_expert/dense_<i>/...
    action_expert.head.{weight,bias}         <->  action_expert/head/...   (H * action_dim)

Kernels start as flax's default (LeCun normal, truncated at 2 std), biases at
zero, so both backends start from the same distribution. Image encoders join
in `FlowPolicyNet.encode`.
"""

from __future__ import annotations

import itertools
import math
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from common import flow_math
from common.config import FlowConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "silu": F.silu, "gelu": F.gelu}  # gelu: the exact (erf) form, as in JAX

STATE_KEY = "state"
ACTIONS_KEY = "actions"
IS_PAD_KEY = "actions_is_pad"

_TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2] (flax's constant)


def _linear(in_dim: int, out_dim: int, generator: torch.Generator | None) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim)
    std = math.sqrt(1.0 / in_dim) / _TRUNC_STD
    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std, generator=generator)
    nn.init.zeros_(layer.bias)
    return layer


class DenseStack(nn.ModuleDict):
    """Linear layers `dense_<i>` with the activation after each; an optional linear `head`."""

    def __init__(self, in_dim: int, hidden_sizes: Sequence[int], activation: str,
                 out_dim: int | None = None, generator: torch.Generator | None = None):
        layers: dict[str, nn.Module] = {}
        for i, width in enumerate(hidden_sizes):
            layers[f"dense_{i}"] = _linear(in_dim, width, generator)
            in_dim = width
        if out_dim is not None:
            layers["head"] = _linear(in_dim, out_dim, generator)
        super().__init__(layers)
        self._act = ACTIVATIONS[activation]
        self._hidden = len(hidden_sizes)
        self.out_dim = in_dim if out_dim is None else out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(self._hidden):
            x = self._act(self[f"dense_{i}"](x))
        return self["head"](x) if "head" in self else x


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t (common.flow_math.sincos_embedding), then Linear + activation."""

    def __init__(self, dim: int, activation: str, generator: torch.Generator | None = None):
        super().__init__()
        self.dim = dim
        self.dense_0 = _linear(dim, dim, generator)
        self._act = ACTIVATIONS[activation]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self._act(self.dense_0(flow_math.sincos_embedding(t, self.dim, torch)))


class FlowPolicyNet(nn.Module):
    """Observation encoder + action expert over an H-step chunk; `mode` flow or regression."""

    def __init__(self, state_dim: int, action_dim: int, horizon: int,
                 encoder_sizes: Sequence[int] = (128,), hidden_sizes: Sequence[int] = (256, 256),
                 time_embed_dim: int = 32, activation: str = "silu", mode: str = "flow",
                 generator: torch.Generator | None = None):
        super().__init__()
        self.state_dim, self.action_dim, self.horizon, self.mode = (state_dim, action_dim,
                                                                    horizon, mode)
        self.obs_encoder = DenseStack(state_dim, tuple(encoder_sizes), activation,
                                      generator=generator)
        expert_in = self.obs_encoder.out_dim
        if mode == "flow":
            self.time_embed = TimeEmbedding(time_embed_dim, activation, generator)
            expert_in += time_embed_dim + horizon * action_dim
        self.action_expert = DenseStack(expert_in, tuple(hidden_sizes), activation,
                                        horizon * action_dim, generator)

    def encode(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Observation features `(B, F)`. Image encoders add their features here (concatenated)."""
        return self.obs_encoder(obs[STATE_KEY])

    def velocity(self, features: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch = x_t.shape[0]
        inputs = torch.cat([features, self.time_embed(t), x_t.reshape(batch, -1)], dim=-1)
        return self.action_expert(inputs).reshape(batch, self.horizon, self.action_dim)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.action_expert(features).reshape(features.shape[0], self.horizon,
                                                    self.action_dim)

    def forward(self, obs: Mapping[str, torch.Tensor], x_t: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
        features = self.encode(obs)
        if self.mode == "flow":
            return self.velocity(features, x_t, t)
        return self.predict(features)


def make_model(config: FlowConfig, *, state_dim: int, action_dim: int, horizon: int,
               generator: torch.Generator | None = None) -> FlowPolicyNet:
    return FlowPolicyNet(state_dim, action_dim, horizon, tuple(config.encoder_sizes),
                         tuple(config.hidden_sizes), config.time_embed_dim, config.activation,
                         config.mode, generator)


def loss_fn(model: FlowPolicyNet, batch: Mapping[str, torch.Tensor],
            generator: torch.Generator | None = None, *, shard_index: int = 0,
            num_shards: int = 1) -> torch.Tensor:
    """pi0's flow loss (or the regression MSE), masked by `actions_is_pad`.

    With `num_shards` > 1, `batch` is slice `shard_index` of a global batch
    split evenly over data-parallel ranks: every rank draws the noise and times
    of the whole global batch from its (identically seeded) generator and keeps
    its slice, so together the ranks use exactly the draws one process would
    and their generators stay equal. The cost is num_shards x B x H x A normal
    draws per step, small next to the network's forward pass. The loss is the
    masked mean over this slice (`valid_count` entries).
    """
    actions = batch[ACTIONS_KEY]
    is_pad = batch.get(IS_PAD_KEY)
    obs = {STATE_KEY: batch[STATE_KEY]}
    if model.mode == "regression":
        return flow_math.masked_mse(model(obs), actions, is_pad, torch)
    size = actions.shape[0]
    noise = torch.randn((size * num_shards, *actions.shape[1:]), generator=generator,
                        dtype=actions.dtype, device=actions.device)
    u = torch.rand((size * num_shards,), generator=generator, dtype=actions.dtype,
                   device=actions.device)
    if num_shards > 1:
        mine = slice(shard_index * size, (shard_index + 1) * size)
        noise, u = noise[mine], u[mine]
    t = flow_math.time_from_uniform(u, torch)
    x_t = flow_math.noisy_actions(t, noise, actions)
    return flow_math.flow_loss(model(obs, x_t, t), noise, actions, is_pad, torch)


def valid_count(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """How many action entries `loss_fn` averages over (float): those not in padded steps."""
    actions = batch[ACTIONS_KEY]
    is_pad = batch.get(IS_PAD_KEY)
    if is_pad is None:
        return torch.tensor(float(actions.numel()), device=actions.device)
    return (~is_pad.bool()).sum().to(actions.dtype) * actions.shape[-1]


def sample_chunk(model: FlowPolicyNet, obs: Mapping[str, torch.Tensor],
                 num_steps: int = flow_math.DEFAULT_INTEGRATION_STEPS, *,
                 generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """A normalised chunk `(B, H, A)`: Euler from noise (t=1) to actions (t=0); encoder once."""
    features = model.encode(obs)
    if model.mode == "regression":
        return model.predict(features)
    batch = features.shape[0]
    if noise is None:
        noise = torch.randn((batch, model.horizon, model.action_dim), generator=generator,
                            dtype=features.dtype, device=features.device)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return model.velocity(features, x, torch.full((batch,), t, dtype=features.dtype,
                                                      device=features.device))

    return flow_math.euler_sample(velocity, noise, num_steps)


def make_chunk_fn(model: FlowPolicyNet, *, num_steps: int, seed: int = 0,
                  deterministic: bool = False,
                  input_transform: Callable[[dict], dict] | None = None,
                  output_transform: Callable[[dict], dict] | None = None,
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """`states (N, S)` -> chunks `(N, H, A)` in dataset units (the JAX backend's contract).

    With `deterministic` every call restarts the noise stream at `seed`;
    otherwise call i uses the stream seeded by (seed, i).
    """
    device = next(model.parameters()).device
    calls = itertools.count()

    def chunk_fn(states: np.ndarray) -> np.ndarray:
        data = {STATE_KEY: np.asarray(states, np.float32)}
        if input_transform is not None:
            data = input_transform(data)
        call = 0 if deterministic else next(calls)
        generator = torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence([seed, call]).generate_state(1)[0]))
        state = torch.as_tensor(np.asarray(data[STATE_KEY], np.float32), device=device)
        with torch.inference_mode():
            chunk = sample_chunk(model, {STATE_KEY: state}, num_steps, generator=generator)
        out = {ACTIONS_KEY: chunk.cpu().numpy()}
        if output_transform is not None:
            out = output_transform(out)
        return np.asarray(out[ACTIONS_KEY])

    return chunk_fn


def dims_from_params(flat: Mapping[str, Any], horizon: int) -> tuple[int, int]:
    """(state_dim, action_dim) from canonical params (kernels are (in, out))."""
    state_dim = int(np.shape(flat["obs_encoder/dense_0/kernel"])[0])
    out = int(np.shape(flat["action_expert/head/bias"])[0])
    if out % horizon:
        raise ValueError(f"action_expert/head has {out} outputs, not a multiple of the action "
                         f"horizon {horizon}.")
    return state_dim, out // horizon


def load_model(step_dir: pathlib.Path | str, config: Any, *, deterministic: bool = True,
               seed: int = 0):
    """A Torch flow checkpoint as `common.policy.LoadedModel` (see vibe_rl_jax.flow.load_model):
    `{"observation": (N, S)} -> {"actions": (N, H, A)}`, norm stats from the step's assets/."""
    from common import lerobot_data
    from common.policy import (OBSERVATION_KEY, ArraySpec, CheckpointError, LoadedModel,
                               load_norm_stats)
    from vibe_rl_torch import checkpoints, networks

    data = config.data
    flat = checkpoints.load_params(step_dir)
    horizon = data.action_horizon
    try:
        state_dim, action_dim = dims_from_params(flat, horizon)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"The params in {step_dir} are not a flow chunk policy with "
                              f"--data.action-horizon {horizon}: {error}") from None
    model = make_model(config.algo, state_dim=state_dim, action_dim=action_dim, horizon=horizon)
    try:
        networks.load_canonical(model, flat)
    except Exception as error:  # CanonicalParamsError lists every missing/extra/mis-shaped key
        raise CheckpointError(f"{step_dir}: {error}") from None
    model.eval()
    stats = load_norm_stats(step_dir, config.name) if data.use_norm_stats else None
    if stats is not None:
        for key, dim in (("state", state_dim), ("actions", action_dim)):
            have = int(np.shape(stats[key].mean)[0]) if key in stats else None
            if have != dim:
                raise CheckpointError(f"{step_dir}/assets/norm_stats.json: {key!r} has {have} "
                                      f"dims, the model {dim}.")
    group = lerobot_data.norm_transforms(data, stats)
    chunk_fn = make_chunk_fn(model, num_steps=config.algo.num_integration_steps, seed=seed,
                             deterministic=deterministic, input_transform=group.input_fn(),
                             output_transform=group.output_fn())

    def infer_fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {ACTIONS_KEY: chunk_fn(batch[OBSERVATION_KEY])}

    return LoadedModel(
        infer_fn=infer_fn,
        input_spec={OBSERVATION_KEY: ArraySpec((state_dim,), "float32")},
        metadata={"action_spec": {"key": ACTIONS_KEY, "type": "chunk",
                                  "shape": [horizon, action_dim], "dtype": "float32"},
                  "policy_type": config.algo.mode, "action_horizon": horizon,
                  "execute_horizon": config.algo.execute_horizon,
                  "num_integration_steps": config.algo.num_integration_steps},
    )
