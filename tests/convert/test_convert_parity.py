"""Numeric parity of every network family across backends, both directions, through safetensors.

Random (perturbed, so no parameter is zero) weights go from one framework
through the canonical dict and a safetensors file into the other; random
inputs must give outputs within 1e-5 (float32) and the same greedy / mean
action.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import canonical, families, torch_modules
from tests.convert.helpers import perturb
from vibe_rl_jax import networks as jnets
from vibe_rl_jax.sac import squash
from vibe_rl_torch import networks as tnets

OBS, ACT, BATCH = 6, 3, 64
TOL = 1e-5
LOW, HIGH = np.full(ACT, -2.0, np.float32), np.full(ACT, 2.0, np.float32)


def _case(family, hidden, activation):
    """(declared layout, flax module, flax scope, torch module, n inputs)."""
    if family == "actor_critic_discrete":
        return (families.actor_critic(OBS, ACT, False, hidden),
                jnets.ActorCritic(ACT, False, hidden, activation), None,
                tnets.ActorCritic(OBS, ACT, False, hidden, activation), 1)
    if family == "actor_critic_box":
        return (families.actor_critic(OBS, ACT, True, hidden),
                jnets.ActorCritic(ACT, True, hidden, activation, -0.5), None,
                tnets.ActorCritic(OBS, ACT, True, hidden, activation, -0.5), 1)
    if family == "q_network":
        return (families.q_network(OBS, ACT, hidden), jnets.QNetwork(ACT, hidden, activation),
                None, tnets.QNetwork(OBS, ACT, hidden, activation), 1)
    if family == "sac_actor":
        return (families.sac_actor(OBS, ACT, hidden), jnets.SACActor(ACT, hidden, activation),
                "actor", tnets.SACActor(OBS, ACT, hidden, activation), 1)
    return (families.twin_critic(OBS, ACT, hidden), jnets.TwinCritic(hidden, activation), None,
            tnets.TwinCritic(OBS, ACT, hidden, activation), 2)


def _inputs(n_inputs, seed=3):
    rng = np.random.default_rng(seed)
    obs = (rng.standard_normal((BATCH, OBS)) * 2).astype(np.float32)
    action = rng.uniform(-2, 2, (BATCH, ACT)).astype(np.float32)
    return (obs,) if n_inputs == 1 else (obs, action)


def _outputs(family, flax_module, flax_params, torch_module, inputs):
    """{name: (jax output, torch output)} plus the actions each backend's policy would take."""
    jout = flax_module.apply({"params": flax_params}, *map(jnp.asarray, inputs))
    with torch.no_grad():
        tout = torch_module(*map(torch.from_numpy, inputs))
    if family.startswith("actor_critic"):
        (dist, value), (out, t_value) = jout, tout
        jhead = dist.mean if family.endswith("box") else dist.logits
        pairs = {"actor": (jhead, out), "value": (value, t_value)}
        if family.endswith("box"):
            pairs["log_std"] = (dist.log_std[0], torch_module.log_std)
            actions = (np.asarray(dist.mode()), out.numpy())
        else:
            actions = (np.asarray(dist.mode()), out.argmax(-1).numpy())
    elif family == "q_network":
        pairs = {"q": (jout, tout)}
        actions = (np.asarray(jnp.argmax(jout, -1)), tout.argmax(-1).numpy())
    elif family == "sac_actor":
        pairs = {"mean": (jout[0], tout[0]), "log_std": (jout[1], tout[1])}
        actions = (np.asarray(squash(jout[0], LOW, HIGH)),
                   (LOW + 0.5 * (HIGH - LOW) * (np.tanh(tout[0].numpy()) + 1)))
    else:
        pairs = {"q1": (jout[0], tout[0]), "q2": (jout[1], tout[1])}
        actions = None
    return {k: (np.asarray(a), b.detach().numpy()) for k, (a, b) in pairs.items()}, actions


def _assert_parity(family, outputs, actions):
    for name, (a, b) in outputs.items():
        assert a.shape == b.shape, name
        assert np.max(np.abs(a - b)) <= TOL, (name, np.max(np.abs(a - b)))
        assert np.std(a) > 1e-3, name  # not a degenerate all-equal output
    if actions is not None:
        a, b = actions
        if family in ("actor_critic_discrete", "q_network"):
            np.testing.assert_array_equal(a, b)
            assert len(np.unique(a)) > 1  # the inputs exercise more than one action
        else:
            assert np.max(np.abs(a - b)) <= TOL


CASES = [(family, hidden, act)
         for family in ("actor_critic_discrete", "actor_critic_box", "q_network", "sac_actor",
                        "twin_critic")
         for hidden, act in (((64, 64), "tanh"), ((32, 16), "relu"))]


@pytest.mark.parametrize("family,hidden,activation", CASES)
def test_jax_to_torch(family, hidden, activation, tmp_path):
    declared, flax_module, scope, torch_module, n_inputs = _case(family, hidden, activation)
    inputs = _inputs(n_inputs)
    params = flax_module.init(jax.random.PRNGKey(0), *map(jnp.asarray, inputs))["params"]
    params = perturb(jax.device_get(params), seed=1)
    flat = canonical.from_flax({scope: params} if scope else params, declared)
    canonical.save_safetensors(tmp_path / "model.safetensors", flat)
    torch_modules.load_canonical(torch_module, canonical.load_safetensors(
        tmp_path / "model.safetensors"))
    _assert_parity(family, *_outputs(family, flax_module, params, torch_module, inputs))


@pytest.mark.parametrize("family,hidden,activation", CASES)
def test_torch_to_jax(family, hidden, activation, tmp_path):
    declared, flax_module, scope, torch_module, n_inputs = _case(family, hidden, activation)
    torch.manual_seed(0)
    torch_modules.load_canonical(torch_module,
                                 perturb(torch_modules.canonical_params(torch_module), seed=2))
    canonical.save_safetensors(tmp_path / "model.safetensors",
                               torch_modules.canonical_params(torch_module))
    tree = canonical.to_flax(canonical.load_safetensors(tmp_path / "model.safetensors"), declared)
    params = jax.tree.map(jnp.asarray, tree[scope] if scope else tree)
    _assert_parity(family, *_outputs(family, flax_module, params, torch_module,
                                     _inputs(n_inputs)))
