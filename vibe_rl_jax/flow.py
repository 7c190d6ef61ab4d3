"""The flow-matching action-chunk policy in flax (and its mean-regression baseline).

pi0's recipe on a small MLP: an observation encoder turns the observation into
features; an action expert maps (features, time embedding, noisy chunk x_t) to
the velocity over the whole H-step chunk (flattened H x action_dim). Training
and sampling use the shared math of common/flow_math.py (time t = 1 is noise,
t = 0 is data). In regression mode the same encoder and expert (without the
time and x_t inputs) predict the chunk directly and train with masked MSE: the
mean-regression baseline that averages the modes of multimodal demonstrations.

Layer names are the canonical parameter names (DESIGN.md, contract 3)::

    obs_encoder/dense_<i>/{kernel,bias}     MLP on the state
    time_embed/dense_0/{kernel,bias}        sinusoidal features -> Dense (flow mode only)
    action_expert/dense_<i>/{kernel,bias}
    action_expert/head/{kernel,bias}        -> H * action_dim

Dense kernels are (in, out). Image encoders join as `obs_encoder/<camera>/...`
in `FlowPolicyNet.encode`, concatenated to the state features.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import flow_math
from common.config import FlowConfig
from convert import canonical

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "silu": nn.silu,
    "gelu": functools.partial(nn.gelu, approximate=False),  # torch's default (erf) form
}

STATE_KEY = "state"
ACTIONS_KEY = "actions"
IS_PAD_KEY = "actions_is_pad"


class DenseStack(nn.Module):
    """Dense layers `dense_<i>` with the activation after each; an optional linear `head`."""

    hidden_sizes: Sequence[int]
    activation: str
    out_dim: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden_sizes):
            x = act(nn.Dense(width, name=f"dense_{i}")(x))
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, name="head")(x)
        return x


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t (common.flow_math.sincos_embedding), then Dense + activation."""

    dim: int
    activation: str

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        features = flow_math.sincos_embedding(t, self.dim, jnp)
        return ACTIVATIONS[self.activation](nn.Dense(self.dim, name="dense_0")(features))


class FlowPolicyNet(nn.Module):
    """Observation encoder + action expert over an H-step chunk; `mode` flow or regression."""

    action_dim: int
    horizon: int
    encoder_sizes: Sequence[int] = (128,)
    hidden_sizes: Sequence[int] = (256, 256)
    time_embed_dim: int = 32
    activation: str = "silu"
    mode: str = "flow"

    def setup(self) -> None:
        self.obs_encoder = DenseStack(tuple(self.encoder_sizes), self.activation)
        if self.mode == "flow":
            self.time_embed = TimeEmbedding(self.time_embed_dim, self.activation)
        self.action_expert = DenseStack(tuple(self.hidden_sizes), self.activation,
                                        self.horizon * self.action_dim)

    def encode(self, obs: Mapping[str, jax.Array]) -> jax.Array:
        """Observation features `(B, F)`. Image encoders add their features here (concatenated)."""
        return self.obs_encoder(obs[STATE_KEY])

    def velocity(self, features: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Velocity `(B, H, A)` of the noisy chunk `x_t` `(B, H, A)` at times `t` `(B,)`."""
        batch = x_t.shape[0]
        inputs = jnp.concatenate([features, self.time_embed(t), x_t.reshape(batch, -1)], axis=-1)
        return self.action_expert(inputs).reshape(batch, self.horizon, self.action_dim)

    def predict(self, features: jax.Array) -> jax.Array:
        """Regression mode: the chunk `(B, H, A)` itself."""
        return self.action_expert(features).reshape(features.shape[0], self.horizon,
                                                    self.action_dim)

    def __call__(self, obs: Mapping[str, jax.Array], x_t: jax.Array | None = None,
                 t: jax.Array | None = None) -> jax.Array:
        features = self.encode(obs)
        if self.mode == "flow":
            return self.velocity(features, x_t, t)
        return self.predict(features)


def make_model(config: FlowConfig, *, action_dim: int, horizon: int) -> FlowPolicyNet:
    return FlowPolicyNet(action_dim=action_dim, horizon=horizon,
                         encoder_sizes=tuple(config.encoder_sizes),
                         hidden_sizes=tuple(config.hidden_sizes),
                         time_embed_dim=config.time_embed_dim, activation=config.activation,
                         mode=config.mode)


def init_params(model: FlowPolicyNet, key: jax.Array, state_dim: int) -> dict[str, Any]:
    obs = {STATE_KEY: jnp.zeros((1, state_dim), jnp.float32)}
    x_t = jnp.zeros((1, model.horizon, model.action_dim), jnp.float32)
    return model.init(key, obs, x_t, jnp.ones((1,), jnp.float32))["params"]


def loss_fn(params: Any, model: FlowPolicyNet, batch: Mapping[str, jax.Array],
            key: jax.Array) -> jax.Array:
    """pi0's flow loss (or the regression MSE), masked by `actions_is_pad`."""
    actions = batch[ACTIONS_KEY]
    is_pad = batch.get(IS_PAD_KEY)
    obs = {STATE_KEY: batch[STATE_KEY]}
    if model.mode == "regression":
        prediction = model.apply({"params": params}, obs)
        return flow_math.masked_mse(prediction, actions, is_pad, jnp)
    noise_key, time_key = jax.random.split(key)
    noise = jax.random.normal(noise_key, actions.shape, actions.dtype)
    t = flow_math.time_from_uniform(jax.random.uniform(time_key, actions.shape[:1]), jnp)
    x_t = flow_math.noisy_actions(t, noise, actions)
    velocity = model.apply({"params": params}, obs, x_t, t)
    return flow_math.flow_loss(velocity, noise, actions, is_pad, jnp)


def sample_chunk(params: Any, model: FlowPolicyNet, obs: Mapping[str, jax.Array], key: jax.Array,
                 num_steps: int = flow_math.DEFAULT_INTEGRATION_STEPS, *,
                 noise: jax.Array | None = None) -> jax.Array:
    """A normalised action chunk `(B, H, A)`: Euler from noise (t=1) to actions (t=0).

    The observation is encoded once; each Euler step runs only the time
    embedding and the action expert. Regression mode returns its prediction.
    `noise` (B, H, A) replaces the draw from `key` (the converter's cross-backend check).
    """
    variables = {"params": params}
    features = model.apply(variables, obs, method=FlowPolicyNet.encode)
    if model.mode == "regression":
        return model.apply(variables, features, method=FlowPolicyNet.predict)
    batch = features.shape[0]
    if noise is None:
        noise = jax.random.normal(key, (batch, model.horizon, model.action_dim), features.dtype)

    def velocity(x: jax.Array, t: float) -> jax.Array:
        times = jnp.full((batch,), t, features.dtype)
        return model.apply(variables, features, x, times, method=FlowPolicyNet.velocity)

    return flow_math.euler_sample(velocity, noise, num_steps)


# ---------------------------------------------------------------- canonical names / checks


def param_shapes(model: FlowPolicyNet, state_dim: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of the params `model` has for `state_dim` (no materialising)."""
    abstract = jax.eval_shape(functools.partial(init_params, model, state_dim=state_dim),
                              jax.random.PRNGKey(0))
    return canonical.shapes(abstract)


def dims_from_params(params: Mapping[str, Any], horizon: int) -> tuple[int, int]:
    """(state_dim, action_dim) a trained model was built for, read off its canonical params."""
    found = canonical.shapes(params)
    state_dim = int(found["obs_encoder/dense_0/kernel"][0])
    out = int(found["action_expert/head/bias"][0])
    if out % horizon:
        raise ValueError(f"action_expert/head has {out} outputs, not a multiple of the action "
                         f"horizon {horizon}.")
    return state_dim, out // horizon


# ---------------------------------------------------------------- inference with transforms


def make_chunk_fn(model: FlowPolicyNet, params: Any, *, num_steps: int, seed: int = 0,
                  deterministic: bool = False, input_transform: Callable[[dict], dict] | None = None,
                  output_transform: Callable[[dict], dict] | None = None,
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """`states (N, S)` in dataset units -> action chunks `(N, H, A)` in dataset units.

    The transforms are the training data group's (Normalize in, Unnormalize
    out), applied to `{"state": ...}` and `{"actions": ...}` batches. With
    `deterministic`, every call uses the same noise (the same state gives the
    same chunk); otherwise each call folds a counter into the seed. Batches are
    padded to the next power of two so few shapes compile.
    """
    params = jax.device_put(params)
    base_key = jax.random.PRNGKey(seed)

    @jax.jit
    def sample(p: Any, state: jax.Array, call: jax.Array) -> jax.Array:
        key = base_key if deterministic else jax.random.fold_in(base_key, call)
        return sample_chunk(p, model, {STATE_KEY: state}, key, num_steps)

    calls = itertools.count()

    def chunk_fn(states: np.ndarray) -> np.ndarray:
        data = {STATE_KEY: np.asarray(states, np.float32)}
        if input_transform is not None:
            data = input_transform(data)
        state = np.asarray(data[STATE_KEY], np.float32)
        n = state.shape[0]
        size = 1 << max(n - 1, 0).bit_length()
        if size != n:
            state = np.concatenate([state, np.zeros((size - n, *state.shape[1:]), state.dtype)])
        chunk = np.asarray(sample(params, state, np.uint32(next(calls) & 0xFFFFFFFF)))[:n]
        out = {ACTIONS_KEY: chunk}
        if output_transform is not None:
            out = output_transform(out)
        return np.asarray(out[ACTIONS_KEY])

    return chunk_fn


# ---------------------------------------------------------------- serving a checkpoint


def load_model(step_dir: Any, config: Any, *, deterministic: bool = True, seed: int = 0):
    """A flow (or regression) checkpoint as `common.policy.LoadedModel`:
    `{"observation": (N, S)} -> {"actions": (N, H, A)}` in the dataset's units.

    The state and action sizes are read off the saved params and checked
    against the network the config describes. The checkpoint's own
    `assets/norm_stats.json` feeds the same Normalize / Unnormalize group as
    training. With `deterministic` every call integrates from the same noise
    (same observation, same chunk); otherwise each call draws new noise from a
    stream seeded by `seed`. The whole chunk is returned: execute its first
    `metadata["execute_horizon"]` actions, then ask again (receding horizon).
    """
    from common import lerobot_data
    from common.policy import (ACTIONS_KEY as OUT_KEY, OBSERVATION_KEY, ArraySpec, CheckpointError,
                               LoadedModel, load_norm_stats)
    from vibe_rl_jax import checkpoints

    data = config.data
    params = checkpoints.load_params(step_dir)
    if "model" not in params:
        raise CheckpointError(f"{step_dir}/params has no 'model' entry (found {sorted(params)}).")
    horizon = data.action_horizon
    try:
        state_dim, action_dim = dims_from_params(params["model"], horizon)
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"The params in {step_dir} are not a flow chunk policy with "
                              f"--data.action-horizon {horizon}: {error}") from None
    model = make_model(config.algo, action_dim=action_dim, horizon=horizon)
    problems = canonical.problems(canonical.shapes(params["model"]), param_shapes(model, state_dim))
    if problems:
        raise CheckpointError(f"The params in {step_dir} do not match the network its "
                              f"assets/config.json describes: {' | '.join(problems)}.")
    stats = load_norm_stats(step_dir, config.name) if data.use_norm_stats else None
    if stats is not None:
        for key, dim in (("state", state_dim), ("actions", action_dim)):
            have = int(np.shape(stats[key].mean)[0]) if key in stats else None
            if have != dim:
                raise CheckpointError(f"{step_dir}/assets/norm_stats.json: {key!r} has {have} "
                                      f"dims, the model {dim}.")
    group = lerobot_data.norm_transforms(data, stats)
    chunk_fn = make_chunk_fn(model, params["model"], num_steps=config.algo.num_integration_steps,
                             seed=seed, deterministic=deterministic,
                             input_transform=group.input_fn(), output_transform=group.output_fn())

    def infer_fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {OUT_KEY: chunk_fn(batch[OBSERVATION_KEY])}

    return LoadedModel(
        infer_fn=infer_fn,
        input_spec={OBSERVATION_KEY: ArraySpec((state_dim,), "float32")},
        metadata={"action_spec": {"key": OUT_KEY, "type": "chunk", "shape": [horizon, action_dim],
                                  "dtype": "float32"},
                  "policy_type": config.algo.mode, "action_horizon": horizon,
                  "execute_horizon": config.algo.execute_horizon,
                  "num_integration_steps": config.algo.num_integration_steps},
    )
