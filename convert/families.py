"""Network families: each declares its canonical parameter names, shapes and kinds once.

The flax modules (vibe_rl_jax/networks.py) and the torch modules
(vibe_rl_torch/networks.py) of a family must both produce exactly this layout;
tests/convert holds them to it, so a renamed layer on either side fails there
and not in a user's converted checkpoint.

    actor_critic   actor/{dense_<i>,head}/{kernel,bias}, critic/..., log_std (Box only)
    q_network      q/{dense_<i>,head}/{kernel,bias}
    sac_actor      actor/{dense_<i>,mean,log_std}/{kernel,bias}
    twin_critic    critic_0/{dense_<i>,head}/..., critic_1/...  (input: obs ++ action)
    flow_policy    obs_encoder/dense_<i>/..., time_embed/dense_0/... (flow mode only),
                   action_expert/{dense_<i>,head}/...  (head: action_horizon * action_dim)

`policy_layout(config, spaces)` is what a checkpoint's params/ holds for the
config's algorithm (the inference network only: SAC saves its actor), and
`checkpoint_layout` adds the observation statistics when the run normalised
observations. A new family (encoders, the flow policy) registers its
algorithm kind with `register_policy_family` in this package, so the
converter and both loaders pick it up.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from common.config import TrainConfig
from convert.canonical import OBS_NORMALIZER, CanonicalParamsError
from convert.layout import Kind, Layout, Leaf, check_name, dense, mlp


@dataclasses.dataclass(frozen=True)
class Spaces:
    """What a policy network's shapes depend on besides the config: the env's spaces."""

    obs_shape: tuple[int, ...]
    action_dim: int
    """Number of discrete actions, or the size of a Box action vector."""
    continuous: bool

    @property
    def obs_dim(self) -> int:
        if len(self.obs_shape) != 1:
            raise CanonicalParamsError(f"The MLP families take 1-D observations, got shape "
                                       f"{self.obs_shape}.")
        return int(self.obs_shape[0])


def _checked(layout: dict[str, Leaf]) -> dict[str, Leaf]:
    for name, leaf in layout.items():
        check_name(name, leaf.kind)
    return layout


# ------------------------------------------------------------------ the families
def actor_critic(obs_dim: int, action_dim: int, continuous: bool,
                 hidden_sizes: tuple[int, ...]) -> dict[str, Leaf]:
    """PPO's separate actor and critic MLPs (+ a state-independent log_std for Box actions)."""
    out = {**mlp("actor", obs_dim, hidden_sizes, action_dim),
           **mlp("critic", obs_dim, hidden_sizes, 1)}
    if continuous:
        out["log_std"] = Leaf((action_dim,), Kind.PARAM)
    return _checked(out)


def q_network(obs_dim: int, num_actions: int, hidden_sizes: tuple[int, ...]) -> dict[str, Leaf]:
    """DQN's Q(s, .) MLP."""
    return _checked(mlp("q", obs_dim, hidden_sizes, num_actions))


def sac_actor(obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...]) -> dict[str, Leaf]:
    """SAC's actor: shared hidden layers, then a mean head and a log-std head."""
    out = mlp("actor", obs_dim, hidden_sizes, action_dim, head="mean")
    out.update(dense("actor/log_std", hidden_sizes[-1] if hidden_sizes else obs_dim, action_dim))
    return _checked(out)


def twin_critic(obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...]) -> dict[str, Leaf]:
    """SAC's two Q(s, a) MLPs on the concatenation of observation and action."""
    return _checked({**mlp("critic_0", obs_dim + action_dim, hidden_sizes, 1),
                     **mlp("critic_1", obs_dim + action_dim, hidden_sizes, 1)})


def flow_policy(state_dim: int, action_dim: int, horizon: int, encoder_sizes: tuple[int, ...],
                hidden_sizes: tuple[int, ...], time_embed_dim: int, mode: str) -> dict[str, Leaf]:
    """The flow-matching chunk policy (vibe_rl_{jax,torch}/flow.py) in `mode` flow or regression.

    The encoder MLP has no head; in flow mode the action expert's input is the
    state features ++ the time embedding ++ the flattened noisy chunk.
    """
    out: dict[str, Leaf] = {}
    features = state_dim
    for i, width in enumerate(encoder_sizes):
        out.update(dense(f"obs_encoder/dense_{i}", features, width))
        features = width
    expert_in = features
    if mode == "flow":
        out.update(dense("time_embed/dense_0", time_embed_dim, time_embed_dim))
        expert_in += time_embed_dim + horizon * action_dim
    out.update(mlp("action_expert", expert_in, hidden_sizes, horizon * action_dim))
    return _checked(out)


def flow_dims(shapes: dict[str, tuple[int, ...]], horizon: int) -> tuple[int, int]:
    """(state_dim, action_dim) of a flow policy, read off its canonical `{name: shape}`.

    A flow checkpoint's config names no env, so the sizes come from the params
    themselves (as the flow loaders read them); the layout check then holds
    every other shape to the config.
    """
    try:
        state_dim = int(shapes["obs_encoder/dense_0/kernel"][0])
        out = int(shapes["action_expert/head/bias"][0])
    except KeyError as error:
        raise CanonicalParamsError(f"Not a flow chunk policy: no {error.args[0]!r} "
                                   f"parameter.") from None
    if out % horizon:
        raise CanonicalParamsError(f"action_expert/head has {out} outputs, not a multiple of the "
                                   f"action horizon {horizon} (--data.action-horizon).")
    return state_dim, out // horizon


def obs_normalizer(obs_shape: tuple[int, ...]) -> dict[str, Leaf]:
    """The running observation statistics saved with the params (`env.normalize_obs`)."""
    return {f"{OBS_NORMALIZER}/mean": Leaf(tuple(obs_shape)),
            f"{OBS_NORMALIZER}/var": Leaf(tuple(obs_shape))}


# ------------------------------------------------------------------ what a checkpoint holds
PolicyLayoutFn = Callable[[TrainConfig, Spaces], Layout]
_POLICY_FAMILIES: dict[str, PolicyLayoutFn] = {}


def register_policy_family(kind: str) -> Callable[[PolicyLayoutFn], PolicyLayoutFn]:
    """Declare the params/ layout of checkpoints of algorithm `kind` (a decorator)."""

    def decorate(fn: PolicyLayoutFn) -> PolicyLayoutFn:
        if kind in _POLICY_FAMILIES:
            raise ValueError(f"A policy family for algo kind {kind!r} is already registered.")
        _POLICY_FAMILIES[kind] = fn
        return fn

    return decorate


def _need(spaces: Spaces, continuous: bool, config: TrainConfig) -> None:
    if spaces.continuous != continuous:
        want, got = ("Box", "discrete") if continuous else ("discrete", "Box")
        raise CanonicalParamsError(f"{config.algo.kind} needs {want} actions but env "
                                   f"{config.env.id!r} has {got} ones.")


@register_policy_family("ppo")
def _ppo(config: TrainConfig, spaces: Spaces) -> Layout:
    return actor_critic(spaces.obs_dim, spaces.action_dim, spaces.continuous,
                        tuple(config.algo.hidden_sizes))


@register_policy_family("dqn")
def _dqn(config: TrainConfig, spaces: Spaces) -> Layout:
    _need(spaces, False, config)
    return q_network(spaces.obs_dim, spaces.action_dim, tuple(config.algo.hidden_sizes))


@register_policy_family("sac")
def _sac(config: TrainConfig, spaces: Spaces) -> Layout:
    _need(spaces, True, config)  # inference needs the actor only; the critics stay in train_state/
    return sac_actor(spaces.obs_dim, spaces.action_dim, tuple(config.algo.hidden_sizes))


@register_policy_family("flow")
def _flow(config: TrainConfig, spaces: Spaces) -> Layout:
    algo = config.algo
    return flow_policy(spaces.obs_dim, spaces.action_dim, config.data.action_horizon,
                       tuple(algo.encoder_sizes), tuple(algo.hidden_sizes), algo.time_embed_dim,
                       algo.mode)


def registered_kinds() -> list[str]:
    return sorted(_POLICY_FAMILIES)


def policy_layout(config: TrainConfig, spaces: Spaces) -> Layout:
    """The inference network's canonical layout for `config` on an env with `spaces`."""
    fn = _POLICY_FAMILIES.get(config.algo.kind)
    if fn is None:
        raise CanonicalParamsError(
            f"No network family is registered for algo kind {config.algo.kind!r} (known: "
            f"{', '.join(registered_kinds())}); see convert/families.py.")
    return fn(config, spaces)


def checkpoint_layout(config: TrainConfig, spaces: Spaces) -> Layout:
    """Everything a step's params/ holds: the policy network, plus obs statistics if normalised."""
    out = dict(policy_layout(config, spaces))
    # imitation policies normalise with assets/norm_stats.json, not saved running statistics
    if config.env.normalize_obs and config.algo.kind != "flow":
        out.update(obs_normalizer(spaces.obs_shape))
    return out


def split_normalizer(flat: dict) -> tuple[dict, dict | None]:
    """(the network's own parameters, `{"mean", "var"}` observation statistics or None)."""
    prefix = OBS_NORMALIZER + "/"
    model = {k: v for k, v in flat.items() if not k.startswith(prefix)}
    stats = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    return model, (stats or None)
