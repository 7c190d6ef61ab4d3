"""Load a JAX checkpoint step as a batched inference function for `common.policy.Policy`.

The params come from `<step>/params` as host numpy (`checkpoints.load_params`,
whatever device mesh saved them) and are checked strictly against the network
the resolved config describes: a missing, extra or mis-shaped parameter is one
error listing them all. The forward pass is jitted: the observation
normalizer saved with the params (when training normalised observations), the
actor, then the greedy (Discrete) or mean (Box) action — or a sample from a
seeded stream — with Box actions clipped to the action bounds as in training.
Batches are padded to the next power of two so a few compiled shapes (made
during the Policy's warm-up) serve every batch size.
"""

from __future__ import annotations

import itertools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common.config import PPOConfig, TrainConfig
from common.policy import ACTIONS_KEY, OBSERVATION_KEY, ArraySpec, CheckpointError, LoadedModel
from vibe_rl_jax import checkpoints, envs
from vibe_rl_jax.networks import ActorCritic


def use_inline_cpu_execution() -> None:
    """Run CPU computations inline in the calling thread instead of dispatching them async.

    A policy server runs one tiny computation per request and waits for it at
    once, so async dispatch buys nothing and costs a thread handoff per call:
    the MLP forward takes ~15 us inline vs ~40 us async here, with far smaller
    tails. JAX reads this flag when it creates the CPU client, so call it
    before JAX first touches a device (serve_policy.py does); later it has no
    effect. Training processes should keep async dispatch.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)


def _flat(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    if isinstance(tree, dict):
        out: dict[str, tuple[int, ...]] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}/"))
        return out
    return {prefix[:-1]: tuple(np.shape(tree))}


def check_params(params: dict[str, Any], network: ActorCritic, obs_shape: tuple[int, ...],
                 normalize_obs: bool, step_dir: pathlib.Path | str) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped parameter."""
    expected_tree = jax.eval_shape(network.init, jax.random.PRNGKey(0),
                                   jnp.zeros((1, *obs_shape), jnp.float32))["params"]
    expected = {f"model/{k}": v for k, v in _flat(dict(expected_tree)).items()}
    if normalize_obs:
        expected.update({"obs_normalizer/mean": obs_shape, "obs_normalizer/var": obs_shape})
    found = _flat(params)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: checkpoint {list(found[k])} vs config {list(expected[k])}"
                    for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"The params in {step_dir} do not match the network its assets/config.json describes. "
            f"Missing: {missing or 'none'}. Unexpected: {unexpected or 'none'}. "
            f"Wrong shape: {shapes or 'none'}.")


def _action_metadata(spec: envs.ActionSpec) -> dict[str, Any]:
    if spec.continuous:
        return {"key": ACTIONS_KEY, "type": "box", "shape": [spec.dim], "dtype": "float32",
                "low": spec.low.tolist(), "high": spec.high.tolist()}
    return {"key": ACTIONS_KEY, "type": "discrete", "n": spec.dim, "shape": [], "dtype": "int32"}


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def load_model(step_dir: pathlib.Path | str, config: TrainConfig, *, deterministic: bool = True,
               seed: int = 0) -> LoadedModel:
    """Params of `step_dir` + the network of `config` -> a batched `{"observation"} -> {"actions"}`."""
    if not isinstance(config.algo, PPOConfig):
        raise CheckpointError(f"No JAX policy loader for algo kind {config.algo.kind!r} yet.")
    venv = envs.VecEnv(config.env.id, 1)  # the observation shape and action space training used
    spec = venv.action_spec
    obs_shape = tuple(venv.obs_shape)
    network = ActorCritic(spec.dim, spec.continuous, tuple(config.algo.hidden_sizes),
                          config.algo.activation, config.algo.init_log_std)
    params = checkpoints.load_params(step_dir)
    check_params(params, network, obs_shape, config.env.normalize_obs, step_dir)

    device_params = jax.device_put({"model": params["model"],
                                    "obs_normalizer": params.get("obs_normalizer")})
    low = None if spec.low is None else jnp.asarray(spec.low)
    high = None if spec.high is None else jnp.asarray(spec.high)
    base_key = jax.random.PRNGKey(seed)

    @jax.jit
    def forward(p: dict[str, Any], obs: jax.Array, call_index: jax.Array) -> jax.Array:
        if p["obs_normalizer"] is not None:
            obs = envs.normalize(obs, p["obs_normalizer"]["mean"], p["obs_normalizer"]["var"])
        dist, _ = network.apply({"params": p["model"]}, obs)
        if deterministic:
            action = dist.mode()
        else:
            action = dist.sample(jax.random.fold_in(base_key, call_index))
        if spec.continuous:
            action = jnp.clip(action, low, high)
        return action

    calls = itertools.count()

    def infer_fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = batch[OBSERVATION_KEY]
        n = obs.shape[0]
        size = _bucket(n)
        if size != n:
            obs = np.concatenate([obs, np.zeros((size - n, *obs.shape[1:]), obs.dtype)])
        actions = forward(device_params, obs, np.uint32(next(calls) & 0xFFFFFFFF))
        return {ACTIONS_KEY: np.asarray(actions)[:n]}

    return LoadedModel(
        infer_fn=infer_fn,
        input_spec={OBSERVATION_KEY: ArraySpec(obs_shape, "float32")},
        metadata={"action_spec": _action_metadata(spec)},
    )
