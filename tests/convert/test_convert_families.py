"""Each family's declared layout is exactly what the flax and the torch module hold, and what
a JAX checkpoint of each preset saves."""

import jax
import jax.numpy as jnp
import pytest

from common import presets
from common.config import TrainConfig
from convert import canonical, families, torch_modules
from convert.canonical import CanonicalParamsError
from convert.families import Spaces
from tests.convert import helpers
from vibe_rl_jax import networks as jnets
from vibe_rl_torch import networks as tnets

OBS, ACT = 5, 3


def _flax_shapes(module, *inputs):
    tree = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
    if isinstance(module, jnets.SACActor):  # SAC saves the actor's params under "actor"
        tree = {"actor": tree}
    return {name: tuple(leaf.shape) for name, leaf in canonical.flatten(
        jax.tree.map(lambda s: jnp.zeros(s.shape), tree)).items()}


FAMILIES = {
    # name: (declared layout, flax module + example inputs, torch module)
    "actor_critic_discrete": lambda h: (
        families.actor_critic(OBS, ACT, False, h),
        (jnets.ActorCritic(ACT, False, h), jnp.zeros((1, OBS))),
        tnets.ActorCritic(OBS, ACT, False, h)),
    "actor_critic_box": lambda h: (
        families.actor_critic(OBS, ACT, True, h),
        (jnets.ActorCritic(ACT, True, h), jnp.zeros((1, OBS))),
        tnets.ActorCritic(OBS, ACT, True, h)),
    "q_network": lambda h: (
        families.q_network(OBS, ACT, h),
        (jnets.QNetwork(ACT, h), jnp.zeros((1, OBS))),
        tnets.QNetwork(OBS, ACT, h)),
    "sac_actor": lambda h: (
        families.sac_actor(OBS, ACT, h),
        (jnets.SACActor(ACT, h), jnp.zeros((1, OBS))),
        tnets.SACActor(OBS, ACT, h)),
    "twin_critic": lambda h: (
        families.twin_critic(OBS, ACT, h),
        (jnets.TwinCritic(h), jnp.zeros((1, OBS)), jnp.zeros((1, ACT))),
        tnets.TwinCritic(OBS, ACT, h)),
}


@pytest.mark.parametrize("hidden", [(8,), (16, 12, 8)])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_declared_layout_is_what_both_modules_hold(family, hidden):
    declared, (flax_module, *inputs), torch_module = FAMILIES[family](hidden)
    assert _flax_shapes(flax_module, *inputs) == {n: leaf.shape for n, leaf in declared.items()}
    assert torch_modules.layout_of(torch_module) == dict(declared)  # names, shapes and kinds


@pytest.mark.parametrize("preset", ["cartpole_ppo", "pendulum_ppo", "cartpole_dqn",
                                    "pendulum_sac"])
def test_checkpoint_layout_is_what_a_jax_checkpoint_of_each_preset_saves(preset, tmp_path):
    from vibe_rl_jax import algorithms, sharding
    from vibe_rl_jax import policy as jax_policy
    from vibe_rl_torch import policy as torch_policy

    config = helpers.make_config(tmp_path, preset)
    spaces = jax_policy.spaces(config)
    assert torch_policy.spaces(config) == spaces  # gymnax and gymnasium agree on the spaces
    algo = algorithms.make(config, sharding.make_mesh(1))
    saved = jax.device_get(algo.inference_params(algo.init(jax.random.PRNGKey(0))))
    layout = families.checkpoint_layout(config, spaces)
    canonical.from_jax_checkpoint(saved, layout)  # raises on any difference
    assert any(k.startswith("obs_normalizer/") for k in layout) == config.env.normalize_obs


def test_unknown_kind_and_wrong_action_space_are_clear_errors():
    dqn = presets.get_preset("cartpole_dqn")
    with pytest.raises(CanonicalParamsError, match="dqn needs discrete actions"):
        families.policy_layout(dqn, Spaces((3,), 1, True))
    with pytest.raises(CanonicalParamsError, match="1-D observations"):
        families.policy_layout(dqn, Spaces((3, 3), 2, False))

    class Fake:
        kind = "nope"

    fake = TrainConfig.__new__(TrainConfig)
    object.__setattr__(fake, "algo", Fake())
    with pytest.raises(CanonicalParamsError, match="No network family .* 'nope' \\(known: .*ppo"):
        families.policy_layout(fake, Spaces((3,), 2, False))
    with pytest.raises(ValueError, match="already registered"):
        families.register_policy_family("ppo")(lambda config, spaces: {})
