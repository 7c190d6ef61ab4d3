"""Canonical parameter names of the Torch ActorCritic, and numeric parity with the flax one."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vibe_rl_jax.networks import ActorCritic as FlaxActorCritic
from convert import canonical
from vibe_rl_torch import networks
from vibe_rl_torch.networks import ActorCritic, CanonicalParamsError


def _unflat(flat):
    """The flax params tree of a canonical dict, as JAX arrays."""
    return jax.tree.map(jnp.asarray, canonical.unflatten(flat))


def test_state_dict_and_canonical_names():
    net = ActorCritic(4, 2, True, hidden_sizes=(8, 6))
    assert sorted(net.state_dict()) == sorted([
        "actor.dense_0.weight", "actor.dense_0.bias", "actor.dense_1.weight", "actor.dense_1.bias",
        "actor.head.weight", "actor.head.bias", "critic.dense_0.weight", "critic.dense_0.bias",
        "critic.dense_1.weight", "critic.dense_1.bias", "critic.head.weight", "critic.head.bias",
        "log_std"])
    flat = networks.canonical_params(net)
    assert flat["actor/dense_0/kernel"].shape == (4, 8)  # (in, out)
    assert flat["actor/head/kernel"].shape == (6, 2)
    assert flat["critic/head/kernel"].shape == (6, 1)
    assert flat["log_std"].shape == (2,)
    np.testing.assert_array_equal(flat["actor/dense_1/kernel"], net.actor["dense_1"].weight.detach().numpy().T)
    assert "log_std" not in networks.canonical_params(ActorCritic(4, 2, False))


def test_init_orthogonal_scales_zero_biases_and_log_std():
    net = ActorCritic(5, 3, True, hidden_sizes=(64, 64), init_log_std=-0.5,
                      generator=torch.Generator().manual_seed(0))
    flat = networks.canonical_params(net)
    for name, gain in [("actor/dense_0", math.sqrt(2)), ("actor/dense_1", math.sqrt(2)),
                       ("actor/head", 0.01), ("critic/dense_1", math.sqrt(2)), ("critic/head", 1.0)]:
        k = flat[name + "/kernel"].astype(np.float64)
        small = k if k.shape[0] <= k.shape[1] else k.T  # rows orthonormal on the short side
        np.testing.assert_allclose(small @ small.T, gain**2 * np.eye(small.shape[0]), atol=1e-5,
                                   err_msg=name)
        np.testing.assert_array_equal(flat[name + "/bias"], 0.0)
    np.testing.assert_array_equal(flat["log_std"], -0.5)
    # The seed decides the init: same generator seed, same params; another seed, others.
    again = networks.canonical_params(ActorCritic(5, 3, True, hidden_sizes=(64, 64),
                                                  generator=torch.Generator().manual_seed(0)))
    other = networks.canonical_params(ActorCritic(5, 3, True, hidden_sizes=(64, 64),
                                                  generator=torch.Generator().manual_seed(1)))
    np.testing.assert_array_equal(again["actor/dense_0/kernel"], flat["actor/dense_0/kernel"])
    assert not np.array_equal(other["actor/dense_0/kernel"], flat["actor/dense_0/kernel"])


def test_canonical_round_trip():
    src = ActorCritic(3, 2, True, hidden_sizes=(16,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        src.log_std.fill_(0.3)
    dst = ActorCritic(3, 2, True, hidden_sizes=(16,), generator=torch.Generator().manual_seed(2))
    networks.load_canonical(dst, networks.canonical_params(src))
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_canonical_is_strict_and_lists_every_problem():
    net = ActorCritic(3, 2, True, hidden_sizes=(16,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flat = networks.canonical_params(ActorCritic(3, 2, True, hidden_sizes=(16,)))
    del flat["critic/head/bias"], flat["log_std"]
    flat["actor/dense_9/kernel"] = np.zeros((1, 1), np.float32)
    flat["actor/head/kernel"] = flat["actor/head/kernel"].T  # (out, in): the torch layout
    with pytest.raises(CanonicalParamsError) as info:
        networks.load_canonical(net, flat)
    message = str(info.value)
    for part in ("missing keys: critic/head/bias, log_std", "unexpected keys: actor/dense_9/kernel",
                 "actor/head/kernel: expected (16, 2), got (2, 16)"):
        assert part in message, message
    for k, v in net.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("continuous,activation,hidden", [
    (False, "tanh", (64, 64)), (True, "tanh", (64, 64)), (True, "relu", (32,)), (False, "relu", (8, 16, 8))])
def test_flax_params_through_canonical_dict_give_same_outputs(continuous, activation, hidden):
    obs_dim, action_dim = 5, 3
    flax_net = FlaxActorCritic(action_dim, continuous, hidden, activation, init_log_std=0.0)
    variables = flax_net.init(jax.random.PRNGKey(0), jnp.zeros((1, obs_dim)))
    flat = canonical.flatten(variables["params"])
    rng = np.random.default_rng(0)
    # Non-zero biases and log_std, so a dropped or transposed tensor cannot go unnoticed.
    flat = {k: (v + rng.normal(size=v.shape).astype(np.float32) * 0.1) for k, v in flat.items()}
    torch_net = ActorCritic(obs_dim, action_dim, continuous, hidden, activation)
    assert set(flat) == set(networks.canonical_params(torch_net))
    networks.load_canonical(torch_net, flat)

    obs = rng.normal(size=(32, obs_dim)).astype(np.float32) * 2
    dist, value = flax_net.apply({"params": _unflat(flat)}, jnp.asarray(obs))
    with torch.no_grad():
        out, t_value = torch_net(torch.from_numpy(obs))
        t_dist = torch_net.distribution(out)
    np.testing.assert_allclose(t_value.numpy(), np.asarray(value), rtol=1e-5, atol=1e-5)
    if continuous:
        np.testing.assert_allclose(out.numpy(), np.asarray(dist.mean), rtol=1e-5, atol=1e-5)
        actions = rng.normal(size=(32, action_dim)).astype(np.float32)
    else:
        np.testing.assert_allclose(out.numpy(), np.asarray(dist.logits), rtol=1e-5, atol=1e-5)
        actions = rng.integers(0, action_dim, size=32)
    np.testing.assert_allclose(t_dist.log_prob(torch.from_numpy(actions)).numpy(),
                               np.asarray(dist.log_prob(jnp.asarray(actions))), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t_dist.entropy().numpy(), np.asarray(dist.entropy()),
                               rtol=1e-5, atol=1e-5)
    # And back: the torch module's canonical dict is the flax tree it was loaded from.
    for name, value in networks.canonical_params(torch_net).items():
        np.testing.assert_array_equal(value, flat[name], err_msg=name)
