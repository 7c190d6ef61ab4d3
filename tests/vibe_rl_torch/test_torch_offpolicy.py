"""DQN and SAC on the Torch backend: shared math on hand values, parity with the JAX networks and
squashing, the replay buffer (true final obs, sampling, checkpoint files and memory), exact resume,
presets through the CLI, DDP, and the learning thresholds (slow)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_toy_envs  # noqa: F401  (registers the toy ids)
from common import presets, rl_math
from common import run_dir as rd
from common.config import ConfigError
from convert import canonical
from tests.conftest import ROOT, run_script
from vibe_rl_torch import checkpoints, envs, networks, replay
from vibe_rl_torch import train as torch_train
from vibe_rl_torch.dqn import DQN, double_dqn_target
from vibe_rl_torch.sac import SAC, Squash, squashed_log_prob

HERE = pathlib.Path(__file__).resolve().parent


# Every test here runs with deterministic kernels on one thread (tests/vibe_rl_torch/conftest.py).
pytestmark = pytest.mark.usefixtures("deterministic")


def small(name, updates, base, **changes):
    changes = {"exp_name": "t", "backend": "torch", "log_interval": 2, "save_interval": 2,
               "progress_bar": False, "checkpoint_base_dir": str(base), **changes}
    cfg = presets.replace(presets.get_preset(name), **changes)
    return presets.replace(cfg, total_timesteps=updates * cfg.steps_per_update)


def module_for(name, env_id, num_envs=2, **changes):
    """A DQN/SAC module on its own envs (no Trainer: enough for collect and the losses)."""
    cfg = presets.replace(presets.get_preset(name), exp_name="m", backend="torch",
                          **{"env.id": env_id, "env.num_envs": num_envs, **changes})
    venv = envs.VecEnv(env_id, num_envs)
    venv.reset(list(range(num_envs)))
    return (DQN if cfg.algo.kind == "dqn" else SAC)(cfg, venv, rank_seed=0)


# ------------------------------------------------------------------ math on hand values
def test_td_target_terminated_vs_truncated():
    # Two transitions reward 1, gamma 0.5, V(next) = 4: the first was truncated (terminated = 0:
    # bootstraps from the true final observation's value), the second terminated (no future).
    reward, next_value = torch.tensor([1.0, 1.0]), torch.tensor([4.0, 4.0])
    terminated = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(rl_math.td_target(reward, terminated, next_value, 0.5),
                               torch.tensor([3.0, 1.0]))


def test_double_dqn_target_selection():
    # The online net prefers action 1 in s'; the target net values it 2.0 (its own max: 5.0).
    next_online = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    next_target = torch.tensor([[5.0, 2.0], [5.0, 2.0]])
    reward, terminated = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    double = double_dqn_target(reward, terminated, next_online, next_target, 0.5, True)
    torch.testing.assert_close(double, torch.tensor([1.0 + 0.5 * 2.0, 1.0]))
    plain = double_dqn_target(reward, terminated, next_online, next_target, 0.5, False)
    torch.testing.assert_close(plain, torch.tensor([1.0 + 0.5 * 5.0, 1.0]))


@pytest.mark.parametrize("loss, double, expected", [
    ("mse", True, 0.5 * (0.5**2 + 2.0**2) / 2),
    ("huber", True, (0.5 * 0.5**2 + (0.5 + (2.0 - 1.0))) / 2),  # huber(2) = 0.5 + 1 * (2 - 1)
    ("mse", False, 0.5 * (1.5**2 + 2.0**2) / 2),
])
def test_dqn_loss_on_a_hand_batch(loss, double, expected):
    """The module's loss wires Q(s, a), the target network and the terminated mask as written.

    One hidden ReLU layer = identity on positive inputs; heads: online Q(s) = [s0, 2 s0],
    target Q(s) = [3 s0, s0]. Row 0: a = 1 at s0 = 1 -> Q = 2; s0' = 2: online [2, 4] picks
    a' = 1, the target net values it 2 -> 0.5 + 0.5 * 2 = 1.5 (error 0.5); without double DQN
    the target's own max 6 -> 3.5 (error -1.5). Row 1: Q(s0 = 2, a = 0) = 2, terminated,
    reward 0 -> target 0 (error 2).
    """
    module = module_for("cartpole_dqn", "torch_toy_envs:Counter-v0",
                        **{"algo.loss": loss, "algo.gamma": 0.5, "algo.double_dqn": double,
                           "algo.hidden_sizes": (2,)})
    with torch.no_grad():
        for net, head in ((module.q_network, [[1.0, 0.0], [2.0, 0.0]]),
                          (module.target_network, [[3.0, 0.0], [1.0, 0.0]])):
            net.q["dense_0"].weight.copy_(torch.eye(2))
            net.q["dense_0"].bias.zero_()
            net.q["head"].weight.copy_(torch.tensor(head))
            net.q["head"].bias.zero_()
    batch = {"obs": torch.tensor([[1.0, 0.0], [2.0, 0.0]]), "action": torch.tensor([1, 0]),
             "reward": torch.tensor([0.5, 0.0]), "next_obs": torch.tensor([[2.0, 0.0], [1.0, 0.0]]),
             "terminated": torch.tensor([0.0, 1.0])}
    got, q_mean = module.loss(batch)
    assert got.item() == pytest.approx(expected)
    assert q_mean.item() == pytest.approx(2.0)


def test_gradient_clipping_is_optax_clip_by_global_norm():
    """Gradients above max_grad_norm are rescaled to exactly that norm; below it, untouched."""
    module = module_for("cartpole_dqn", "torch_toy_envs:Counter-v0")
    for direction, expected in (([30.0, 40.0], [-6.0, -8.0]), ([0.3, 0.4], [-0.3, -0.4])):
        p = torch.nn.Parameter(torch.zeros(2))
        module.optimizer_step(torch.optim.SGD([p], lr=1.0), (p * torch.tensor(direction)).sum(),
                              [p], max_grad_norm=10.0)
        torch.testing.assert_close(p.detach(), torch.tensor(expected))


def test_sac_critic_target_with_entropy_term():
    # r 1, gamma 0.5, min(Q1', Q2') = 2, alpha 0.5, log pi' = -1: 1 + 0.5 (2 + 0.5) = 2.25.
    target = rl_math.sac_critic_target(
        torch, reward=torch.tensor([1.0, 1.0]), terminated=torch.tensor([0.0, 1.0]),
        next_q1=torch.tensor([3.0, 3.0]), next_q2=torch.tensor([2.0, 2.0]),
        next_log_prob=torch.tensor([-1.0, -1.0]), alpha=torch.tensor(0.5), gamma=0.5)
    torch.testing.assert_close(target, torch.tensor([2.25, 1.0]))


def test_sac_module_losses_use_the_shared_formulas():
    """critic_loss: target critics, min, entropy term, terminated mask; actor_loss: online critics."""
    module = module_for("pendulum_sac", "torch_toy_envs:BoxCounter-v0", **{"algo.hidden_sizes": (8,)})
    with torch.no_grad():  # make the target critics differ from the online ones
        for p in module.target_critic.parameters():
            p.add_(0.1)
    g = torch.Generator().manual_seed(3)
    batch = {"obs": torch.randn(5, 2, generator=g), "action": torch.rand(5, 2, generator=g) * 2 - 1,
             "reward": torch.randn(5, generator=g), "next_obs": torch.randn(5, 2, generator=g),
             "terminated": torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])}
    alpha = torch.tensor(0.3)
    state = module.action_rng.get_state()
    loss, q_mean = module.critic_loss(batch, alpha)
    module.action_rng.set_state(state)  # the same noise for the reference
    with torch.no_grad():
        next_action, next_log_prob = module.sample(batch["next_obs"])
        nq1, nq2 = module.target_critic(batch["next_obs"], next_action)
        target = batch["reward"] + 0.99 * (1 - batch["terminated"]) * (
            torch.minimum(nq1, nq2) - 0.3 * next_log_prob)
        q1, q2 = module.critic(batch["obs"], batch["action"])
    torch.testing.assert_close(loss, 0.5 * ((q1 - target) ** 2).mean() + 0.5 * ((q2 - target) ** 2).mean())
    torch.testing.assert_close(q_mean, 0.5 * (q1 + q2).mean())

    state = module.action_rng.get_state()
    actor_loss, log_prob = module.actor_loss(batch["obs"], alpha)
    actor_loss.backward()
    assert all(p.grad is None for p in module.critic.parameters())  # actor gradient only
    assert all(p.grad is not None for p in module.actor.parameters())
    module.action_rng.set_state(state)
    with torch.no_grad():
        action, ref_log_prob = module.sample(batch["obs"])
        ref = (0.3 * ref_log_prob - torch.minimum(*module.critic(batch["obs"], action))).mean()
    torch.testing.assert_close(actor_loss.detach(), ref)
    assert all(p.requires_grad for p in module.critic.parameters())  # restored


def test_squashed_log_prob_matches_jax_and_torch_distributions():
    from vibe_rl_jax import sac as jax_sac
    from vibe_rl_jax.distributions import DiagGaussian

    rng = np.random.default_rng(0)
    mean = rng.normal(size=(6, 2)).astype(np.float32)
    log_std = (rng.normal(size=(6, 2)) * 0.3).astype(np.float32)
    u = (rng.normal(size=(6, 2)) * 2).astype(np.float32)
    u[5] = [9.0, -12.0]  # saturated tanh: the stable form stays finite
    low, high = np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32)
    squash = Squash(torch.tensor(low), torch.tensor(high))
    action, log_prob = squashed_log_prob(torch.tensor(mean), torch.tensor(log_std), torch.tensor(u),
                                         squash)
    jax_action = jax_sac.squash(jnp.asarray(u), low, high)
    jax_log_prob = jax_sac.squashed_log_prob(DiagGaussian(jnp.asarray(mean), jnp.asarray(log_std)),
                                             jnp.asarray(u), low, high)
    np.testing.assert_allclose(action.numpy(), np.asarray(jax_action), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_prob.numpy(), np.asarray(jax_log_prob), rtol=1e-5, atol=1e-5)
    assert np.isfinite(log_prob.numpy()).all()
    # And the torch.distributions composition (its log_prob inverts the action: unsaturated rows).
    T = torch.distributions.transforms
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Independent(
            torch.distributions.Normal(torch.tensor(mean[:5]), torch.tensor(log_std[:5]).exp()), 1),
        [T.TanhTransform(), T.AffineTransform(torch.tensor((low + high) / 2),
                                              torch.tensor((high - low) / 2))])
    np.testing.assert_allclose(log_prob[:5].numpy(), ref.log_prob(action[:5]).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_temperature_loss_sign():
    """Entropy below target -> the gradient step raises log_alpha; above target -> lowers it."""
    for log_prob, direction in ((2.0, +1), (0.5, -1)):  # entropy -2 or -0.5; target -1
        log_alpha = torch.zeros((), requires_grad=True)
        loss = rl_math.sac_temperature_loss(log_alpha=log_alpha,
                                            log_prob=torch.full((4,), log_prob), target_entropy=-1.0)
        loss.backward()
        assert log_alpha.grad.item() == pytest.approx(-(log_prob - 1.0))  # d/dla -(la (lp + te))
        assert np.sign(-log_alpha.grad.item()) == direction  # descent moves log_alpha this way


# ------------------------------------------------------------------ networks: canonical names
def _unflat(flat):
    """The flax params tree of a canonical dict, as JAX arrays."""
    return jax.tree.map(jnp.asarray, canonical.unflatten(flat))


def _through_canonical(flax_module, args, torch_module, prefix=""):
    """flax params -> canonical dict (biases perturbed) -> torch module; returns (flat, variables).

    `prefix`: the JAX SAC exports its actor's tree under "actor" (vibe_rl_jax.sac.inference_params).
    """
    variables = flax_module.init(jax.random.PRNGKey(0), *args)
    flat = canonical.flatten(variables["params"], prefix)
    rng = np.random.default_rng(1)
    flat = {k: v + rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in flat.items()}
    assert set(flat) == set(networks.canonical_params(torch_module))
    networks.load_canonical(torch_module, flat)
    for name, value in networks.canonical_params(torch_module).items():  # and back, unchanged
        np.testing.assert_array_equal(value, flat[name], err_msg=name)
    tree = _unflat(flat)
    return flat, {"params": tree[prefix.rstrip("/")] if prefix else tree}


def test_offpolicy_networks_match_flax_through_canonical_names():
    from vibe_rl_jax import networks as jax_networks

    rng = np.random.default_rng(0)
    obs = rng.normal(size=(16, 5)).astype(np.float32) * 2
    act = rng.uniform(-1, 1, size=(16, 2)).astype(np.float32)

    q_flax = jax_networks.QNetwork(3, (32, 16), "relu")
    q_torch = networks.QNetwork(5, 3, (32, 16), "relu")
    flat, variables = _through_canonical(q_flax, (jnp.zeros((1, 5)),), q_torch)
    assert sorted(flat) == sorted(f"q/{layer}/{p}" for layer in ("dense_0", "dense_1", "head")
                                  for p in ("kernel", "bias"))
    with torch.no_grad():
        np.testing.assert_allclose(q_torch(torch.from_numpy(obs)).numpy(),
                                   np.asarray(q_flax.apply(variables, obs)), rtol=1e-5, atol=1e-5)

    actor_flax = jax_networks.SACActor(2, (32, 32), "relu", -5.0, 2.0)
    actor_torch = networks.SACActor(5, 2, (32, 32), "relu", -5.0, 2.0)
    flat, variables = _through_canonical(actor_flax, (jnp.zeros((1, 5)),), actor_torch, "actor/")
    assert {k.rsplit("/", 1)[0] for k in flat} == {"actor/dense_0", "actor/dense_1", "actor/mean",
                                                    "actor/log_std"}
    mean, log_std = actor_flax.apply(variables, obs)
    with torch.no_grad():
        t_mean, t_log_std = actor_torch(torch.from_numpy(obs))
    np.testing.assert_allclose(t_mean.numpy(), np.asarray(mean), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t_log_std.numpy(), np.asarray(log_std), rtol=1e-5, atol=1e-5)
    assert (t_log_std.numpy() >= -5.0).all() and (t_log_std.numpy() <= 2.0).all()

    critic_flax = jax_networks.TwinCritic((32, 32), "relu")
    critic_torch = networks.TwinCritic(5, 2, (32, 32), "relu")
    flat, variables = _through_canonical(critic_flax, (jnp.zeros((1, 5)), jnp.zeros((1, 2))),
                                         critic_torch)
    assert flat["critic_1/dense_0/kernel"].shape == (7, 32)  # (obs + action, hidden)
    q1, q2 = critic_flax.apply(variables, obs, act)
    with torch.no_grad():
        t_q1, t_q2 = critic_torch(torch.from_numpy(obs), torch.from_numpy(act))
    np.testing.assert_allclose(t_q1.numpy(), np.asarray(q1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t_q2.numpy(), np.asarray(q2), rtol=1e-5, atol=1e-5)


def test_sac_actor_init_is_flax_dense_default():
    """lecun-normal (truncated) kernels with variance 1/fan_in and zero biases, like nn.Dense."""
    actor = networks.SACActor(64, 4, (256,), generator=torch.Generator().manual_seed(0))
    k = actor.actor["dense_0"].weight.detach().numpy()
    assert abs(k.var() * 64 - 1.0) < 0.05
    assert np.abs(k).max() <= 2 * np.sqrt(1 / 64) / 0.87962566103423978 + 1e-6
    np.testing.assert_array_equal(actor.actor["mean"].bias.detach().numpy(), 0.0)


# ------------------------------------------------------------------ replay buffer
def test_buffer_ring_order_cursor_and_sampling_generator():
    buf = replay.ReplayBuffer(5, (1,), (), torch.int64)
    for start in (0, 3):  # 3 rows then 3 more: wraps, the oldest row is overwritten
        rows = torch.arange(start, start + 3)
        buf.add(obs=rows[:, None].float(), action=rows, reward=rows.float(),
                next_obs=rows[:, None].float() + 0.5, terminated=torch.zeros(3))
    assert buf.data["action"].tolist() == [5, 1, 2, 3, 4] and (buf.pos, buf.size) == (1, 5)
    torch.manual_seed(0)
    global_state = torch.get_rng_state()
    a = buf.sample(64, torch.Generator().manual_seed(7))
    b = buf.sample(64, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never used
    assert torch.equal(a["action"], b["action"]) and set(a["action"].tolist()) == {1, 2, 3, 4, 5}
    torch.testing.assert_close(a["next_obs"][:, 0], a["obs"][:, 0] + 0.5)  # rows stay whole
    with pytest.raises(ConfigError, match="--algo.buffer-size"):
        buf.set_cursor({"pos": 0, "size": 0, "capacity": 6})


@pytest.mark.parametrize("env_id, expect_terminated", [
    ("torch_toy_envs:CounterTrunc-v0", False),  # time limit 3: truncated at obs [3, 1]
    ("torch_toy_envs:Counter-v0", True),  # terminates at obs [4, 1]
])
def test_buffer_stores_true_final_obs_and_terminated_only(env_id, expect_terminated):
    module = module_for("cartpole_dqn", env_id, num_envs=2)
    last = 3 if not expect_terminated else 4
    for _ in range(2 * last):  # two episodes per env
        module.collect(lambda obs: torch.zeros(obs.shape[0], dtype=torch.int64))
    data = {k: v[:module.buffer.size].numpy() for k, v in module.buffer.data.items()}
    ends = np.flatnonzero(data["next_obs"][:, 0] == last)
    assert len(ends) == 4  # the episode ends stored [last, 1], not the reset observation [0, 1]
    np.testing.assert_array_equal(data["obs"][ends, 0], last - 1)
    np.testing.assert_array_equal(data["terminated"][ends], float(expect_terminated))
    assert data["terminated"].sum() == (4 if expect_terminated else 0)  # truncation bootstraps
    # Elsewhere next_obs of one row is obs of the same env's next row (2 envs: row + 2).
    inner = np.setdiff1d(np.arange(len(data["obs"]) - 2), ends)
    np.testing.assert_array_equal(data["next_obs"][inner], data["obs"][inner + 2])
    np.testing.assert_array_equal(data["reward"][ends], float(last))  # Counter: reward 1 + t


# ------------------------------------------------------------------ training runs
OFFPOLICY = [
    ("cartpole_dqn", {"algo.learning_starts": 40, "algo.batch_size": 16, "algo.buffer_size": 64,
                      "algo.target_update_interval": 3, "algo.gradient_steps": 2,
                      "algo.lr_schedule": "linear", "algo.hidden_sizes": (32, 32)}),
    ("pendulum_sac", {"algo.learning_starts": 40, "algo.batch_size": 16, "algo.buffer_size": 64,
                      "algo.gradient_steps": 2, "algo.hidden_sizes": (32, 32)}),
    ("cartpole_dqn", {"algo.learning_starts": 40, "algo.batch_size": 16, "algo.buffer_size": 64,
                      "algo.target_update_interval": 3, "algo.hidden_sizes": (32, 32),
                      "algo.n_step": 3}),
]


def _module_state(result):
    """Everything a continuation depends on, as comparable tensors."""
    m = result.module
    out = {f"module/{k}": v for k, v in m.state_dict().items()}  # online, targets, critics, alpha
    out.update({f"buffer/{k}": v for k, v in m.buffer.data.items()})
    out["cursor"] = torch.tensor([m.buffer.pos, m.buffer.size])
    out["action_rng"], out["sample_rng"] = m.action_rng.get_state(), m.sample_rng.get_state()
    out["env_obs"] = torch.from_numpy(m.venv.obs)
    for i, opt in enumerate(m.trainer.optimizers):
        for index, state in opt.state_dict()["state"].items():
            out.update({f"opt{i}/{index}/{k}": v for k, v in state.items()})
    for i, cfg in enumerate(m.trainer.lr_scheduler_configs):
        out[f"sched{i}"] = torch.tensor(cfg.scheduler.state_dict()["last_epoch"])
    if hasattr(m, "grad_step"):
        out["grad_step"] = torch.tensor(m.grad_step)
    if m.nstep_windows is not None:  # n-step transitions in flight
        out.update({f"nstep/{k}": torch.from_numpy(v) for k, v in m.nstep_windows.items()})
    return out


def test_dqn_nstep_buffer_holds_discounted_sums(ckpt_base):
    """The JAX test of the same name, on this backend's buffer: CartPole pays 1 per step, so an
    m-step transition stores 1 + g + ... + g^(m-1) with discount g^m."""
    gamma = 0.9
    result = torch_train.train(small("cartpole_dqn", 60, ckpt_base, **{
        "algo.n_step": 3, "algo.gamma": gamma, "algo.learning_starts": 10_000}))
    buffer = result.module.buffer
    assert buffer.size == (60 - 2) * 10  # nothing leaves the windows in the first n - 1 steps
    data = {k: v[:buffer.size].numpy() for k, v in buffer.data.items()}
    m = np.rint(np.log(data["discount"]) / np.log(gamma)).astype(int)
    assert set(m) <= {1, 2, 3} and (m == 3).mean() > 0.8
    np.testing.assert_allclose(data["reward"], (1 - gamma**m) / (1 - gamma), rtol=1e-6)
    assert data["terminated"][m < 3].all() and data["terminated"].sum() > 0


def test_nstep_windows_must_fit_the_config_on_resume(ckpt_base):
    module = module_for("cartpole_dqn", "CartPole-v1", **{"algo.n_step": 3})
    saved = module.nstep_windows
    module.load_nstep_windows(saved)  # fits
    one_step = module_for("cartpole_dqn", "CartPole-v1")
    with pytest.raises(ConfigError, match="--algo.n-step 1: resume with the --algo.n-step"):
        one_step.load_nstep_windows(saved)
    with pytest.raises(ConfigError, match="--algo.n-step 3"):
        module.load_nstep_windows(None)


def test_update_batches_end_at_every_log_and_save_point():
    """Lightning gets runs of updates that stop wherever the bookkeeper logs or saves."""
    module = module_for("cartpole_dqn", "torch_toy_envs:Counter-v0", log_interval=3,
                        save_interval=6)
    assert list(module.update_batches(2, 13)) == [(2, 3), (3, 6), (6, 9), (9, 12), (12, 13)]
    assert len(module.update_batches(4, 4)) == 0


@pytest.mark.parametrize("name, extra", OFFPOLICY)
def test_offpolicy_resume_is_exact(name, extra, ckpt_base):
    """12 updates straight == 6, --resume, 6: every parameter (online, target networks, critics,
    temperature), optimizer and scheduler state, buffer contents (it wraps across the resume)
    and cursor, generators and envs. Tolerance: none (bit-exact, CPU, deterministic, 1 thread)."""
    straight = torch_train.train(small(name, 12, ckpt_base / "a", **extra))
    first = torch_train.train(small(name, 12, ckpt_base / "b", **extra), stop_at=6)
    assert first.final_step == 6 and first.module.buffer.size < 64  # not yet wrapped at the save
    resumed = torch_train.train(small(name, 12, ckpt_base / "b", resume=True, **extra))
    assert resumed.final_step == 12 and resumed.module.buffer.pos != 0
    a, b = _module_state(straight), _module_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for h_a, h_b in zip(straight.history[3:], resumed.history):
        for tag in h_a:
            if tag not in ("perf/sps", "time"):
                assert h_a[tag] == h_b[tag] or (np.isnan(h_a[tag]) and np.isnan(h_b[tag])), tag
    # Learning happened in both halves, so the comparison covers the update path.
    assert not np.isnan(straight.history[2]["train/q_values"])
    assert not np.isnan(resumed.history[-1]["train/q_values"])


def test_streamed_buffer_save_writes_the_same_files_synchronously(ckpt_base, monkeypatch):
    """Over BACKGROUND_MAX_BYTES the buffer is written from its tensors in the training thread;
    the files are the same as the background (bytes) path's."""
    name, extra = OFFPOLICY[0]
    cfg = presets.replace(small(name, 5, ckpt_base / "bytes", **extra), save_interval=6,
                          log_interval=1)
    torch_train.train(cfg)
    threads = []
    original = checkpoints.write_step
    monkeypatch.setattr(checkpoints, "write_step",
                        lambda *a, **k: threads.append(threading.current_thread()) or original(*a, **k))
    monkeypatch.setattr(replay, "BACKGROUND_MAX_BYTES", 0)
    torch_train.train(presets.replace(cfg, checkpoint_base_dir=str(ckpt_base / "stream")))
    assert threads == [threading.main_thread()]
    dirs = [ckpt_base / b / name / "t" / "5" / "train_state" / "replay_rank_0"
            for b in ("bytes", "stream")]
    names = sorted(p.name for p in dirs[0].iterdir())
    assert names == sorted(f"{f}.npy" for f in replay.FIELDS)
    for f in names:
        assert (dirs[0] / f).read_bytes() == (dirs[1] / f).read_bytes(), f
    obs = np.load(dirs[0] / "obs.npy")
    assert obs.shape == (64, 4) and np.abs(obs[:50]).sum() > 0 and not obs[50:].any()


_BIG_SAVE = r"""
import sys, torch
from vibe_rl_torch import checkpoints, replay
def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
def reset_peak():  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
# 1e6 transitions of a 48-float observation: obs + next_obs + action/reward/terminated = 400 MB.
buf = replay.ReplayBuffer(1_000_000, (48,), (), torch.int64)
for chunk in range(0, 1_000_000, 100_000):  # fill it: every page is touched, as in training
    rows = torch.full((100_000, 48), float(chunk))
    buf.add(obs=rows, action=torch.ones(100_000, dtype=torch.int64), reward=torch.ones(100_000),
            next_obs=rows, terminated=torch.zeros(100_000))
del rows
stream = sys.argv[2] == "stream"
writer = checkpoints.CheckpointWriter(sys.argv[1], max_to_keep=1, keep_period=None)
reset_peak()
before = status_mb("VmRSS")
files = {"train_state/" + k: v for k, v in replay.buffer_files(buf, 0, stream=stream).items()}
writer.save(1, files)
del files
writer.wait(); writer.close()
print("INCREASE_MB", status_mb("VmHWM") - before, "RSS_BEFORE_MB", before)
"""


def test_large_buffer_saves_without_doubling_memory(tmp_path):
    script = tmp_path / "big_save.py"
    script.write_text(_BIG_SAVE)
    out = run_script([str(script), str(tmp_path / "run"), "stream"], env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    increase = float(out.stdout.split("INCREASE_MB")[1].split()[0])
    assert increase < 100, f"peak RSS grew by {increase:.0f} MB while saving a 400 MB buffer"
    saved = np.load(tmp_path / "run" / "1" / "train_state" / "replay_rank_0" / "obs.npy",
                    mmap_mode="r")
    assert saved.shape == (1_000_000, 48) and saved[-1, 0] == 900_000.0
    # Control: serialised to bytes first (the background path), the same save doubles it.
    out = run_script([str(script), str(tmp_path / "run2"), "bytes"], env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("INCREASE_MB")[1].split()[0]) > 300, out.stdout


def test_restore_reads_the_buffer_chunkwise_into_place(tmp_path, monkeypatch):
    """Restoring fills the existing tensors chunk by chunk from a memory map (no second copy)."""
    monkeypatch.setattr(replay, "CHUNK_BYTES", 64)  # several chunks even for a tiny buffer
    src = replay.ReplayBuffer(10, (3,), (2,), torch.float32)
    g = torch.Generator().manual_seed(0)
    src.add(obs=torch.randn(7, 3, generator=g), action=torch.randn(7, 2, generator=g),
            reward=torch.randn(7, generator=g), next_obs=torch.randn(7, 3, generator=g),
            terminated=torch.ones(7))
    for rel, content in replay.buffer_files(src, 0, stream=False).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    dst = replay.ReplayBuffer(10, (3,), (2,), torch.float32)
    storage = {k: v.data_ptr() for k, v in dst.data.items()}
    replay.check_files(tmp_path, dst, 1)
    replay.load_files(tmp_path, dst, 0)
    for k in replay.FIELDS:
        assert torch.equal(src.data[k], dst.data[k]) and dst.data[k].data_ptr() == storage[k], k
    wrong = replay.ReplayBuffer(12, (3,), (2,), torch.float32)
    with pytest.raises(ConfigError, match="--algo.buffer-size"):
        replay.check_files(tmp_path, wrong, 1)


def _jax_tags(name):
    """The TensorBoard tags the JAX backend writes for this preset (from its own code)."""
    from vibe_rl_jax import algorithms, sharding
    from vibe_rl_jax import train as jax_train

    cfg = presets.replace(presets.get_preset(name), exp_name="x", backend="jax")
    algo = algorithms.make(cfg, sharding.make_mesh(1))
    sums = {k: 1.0 for k in ("episode_return_sum", "episode_length_sum", "episode_count",
                             "learn_count", "td", "q_values", "epsilon", "critic", "actor",
                             "alpha_loss", "alpha", "entropy")}
    return set(jax_train._chunk_metrics(algo, sums, 1, 1, 1.0))


@pytest.mark.parametrize("name, model_prefix, updates, log", [
    ("cartpole_dqn", "q/", 40, 10),  # random CartPole episodes end within 40 vector steps
    ("pendulum_sac", "actor/", 200, 50),  # Pendulum episodes are 200 steps long
])
def test_presets_run_through_the_cli(name, model_prefix, updates, log, ckpt_base):
    """`scripts/train.py <preset> --backend torch`: run dir, canonical params, same tags as JAX."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    preset = presets.get_preset(name)
    args = ["scripts/train.py", name, "--backend", "torch", "--exp-name", "cli",
            "--checkpoint-base-dir", str(ckpt_base), "--total-timesteps",
            str(updates * preset.steps_per_update), "--log-interval", str(log), "--save-interval",
            str(2 * log), "--algo.learning-starts", "20", "--algo.batch-size", "16",
            "--algo.buffer-size", "100", "--algo.hidden-sizes", "32", "32"]
    out = run_script(args, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"update {updates}/{updates} |" in out.stderr
    run = ckpt_base / name / "cli"
    assert rd.complete_steps(run) == [updates // 2, updates]
    step = run / str(updates)
    params = checkpoints.load_params(step)
    assert params and all(k.startswith(model_prefix) for k in params), sorted(params)
    saved = json.loads((step / "assets" / "config.json").read_text())
    assert saved["name"] == name and saved["backend"] == "torch"
    trainer_state = checkpoints.load_trainer_state(step)
    assert trainer_state["update_step"] == updates and "algo_state" in trainer_state
    rank = checkpoints.load_rank_state(step, 0)
    assert rank["replay"]["size"] == min(100, updates * preset.steps_per_update)
    # The saved inference weights load strictly into a fresh network.
    obs_dim = 4 if name == "cartpole_dqn" else 3
    fresh = (networks.QNetwork(obs_dim, 2, (32, 32)) if name == "cartpole_dqn"
             else networks.SACActor(obs_dim, 1, (32, 32)))
    networks.load_canonical(fresh, params)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == _jax_tags(name)
    assert [e.step for e in acc.Scalars("train/learning_rate")] == list(range(log, updates + 1, log))


def test_action_space_and_batch_split_are_checked(ckpt_base):
    from vibe_rl_torch import distributed, offpolicy

    dqn = small("cartpole_dqn", 2, ckpt_base, **{"env.id": "Pendulum-v1", "env.num_envs": 2})
    with pytest.raises(ConfigError, match="DQN needs a discrete action space"):
        torch_train.validate(dqn)
    with pytest.raises(ConfigError, match="SAC needs a Box action space"):
        torch_train.validate(small("pendulum_sac", 2, ckpt_base, **{"env.id": "CartPole-v1"}))
    torch_train.validate(small("pendulum_sac", 2, ckpt_base))  # the presets themselves are fine
    odd = small("cartpole_dqn", 2, ckpt_base, **{"algo.batch_size": 127})
    with pytest.raises(distributed.LaunchError, match=r"--algo.batch-size \(127\).*WORLD_SIZE=2"):
        offpolicy.check_config(odd, distributed.DistInfo(2, 0, 0, 2))


# ------------------------------------------------------------------ DDP (slow)
_STREAMING_WORKER = r"""
import sys
from vibe_rl_torch import replay
replay.BACKGROUND_MAX_BYTES = 0  # every save streams: rank 1's buffer goes over the process group
sys.argv = ["train.py"] + sys.argv[1:]
from common import entrypoint, presets
entrypoint.run(presets.cli())
"""


def _torchrun(script, args, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra, obs_dim, n_step", [
    ("cartpole_dqn", ["--algo.target-update-interval", "2", "--algo.n-step", "1"], 4, 1),
    ("cartpole_dqn", ["--algo.target-update-interval", "2", "--algo.n-step", "3"], 4, 3),
    ("pendulum_sac", [], 3, 1),
])
def test_torchrun_two_process_offpolicy_own_buffers_and_exact_resume(preset, extra, obs_dim,
                                                                     n_step, ckpt_base, tmp_path):
    """2 ranks: each its own buffer (half the capacity, its own transitions), gradients averaged
    (rank 0 checks the ranks' parameter fingerprints at every save; SAC's three optimizers each
    all-reduce), buffers streamed to rank 0 at save and back to each rank at resume; the resumed
    run ends where the straight one does (with n-step returns: each rank's open windows travel
    with its state)."""
    worker = tmp_path / "streaming_train.py"
    worker.write_text(_STREAMING_WORKER)
    args = [preset, "--backend", "torch", "--exp-name", "ddp", "--checkpoint-base-dir",
            str(ckpt_base / "a"), "--env.num-envs", "4", "--total-timesteps", str(12 * 4),
            "--log-interval", "2", "--save-interval", "6", "--algo.learning-starts", "16",
            "--algo.batch-size", "8", "--algo.buffer-size", "40", "--algo.hidden-sizes", "16",
            "16", *extra, "--no-progress-bar"]
    out = _torchrun(worker, args)
    assert out.returncode == 0, out.stderr[-4000:]
    run = ckpt_base / "a" / preset / "ddp"
    assert rd.complete_steps(run) == [6, 12]
    ranks = [np.load(run / "12" / "train_state" / f"replay_rank_{r}" / "obs.npy") for r in (0, 1)]
    assert ranks[0].shape == ranks[1].shape == (20, obs_dim)  # 40 / 2 ranks
    assert not np.array_equal(ranks[0], ranks[1])  # each rank's own envs
    # Resume from update 6 with the default (bytes) save path: same params and buffers at 12.
    shutil.copytree(ckpt_base / "a", ckpt_base / "b")
    shutil.rmtree(ckpt_base / "b" / preset / "ddp" / "12")
    args_b = [a if a != str(ckpt_base / "a") else str(ckpt_base / "b") for a in args]
    out = _torchrun(ROOT / "scripts" / "train.py", args_b + ["--resume"])
    assert out.returncode == 0, out.stderr[-4000:]
    other = ckpt_base / "b" / preset / "ddp" / "12"
    straight, resumed = checkpoints.load_params(run / "12"), checkpoints.load_params(other)
    for key in straight:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    fields = replay.FIELDS + (("discount",) if n_step > 1 else ())
    for r in (0, 1):
        for field in fields:
            rel = pathlib.Path("train_state") / f"replay_rank_{r}" / f"{field}.npy"
            assert (run / "12" / rel).read_bytes() == (other / rel).read_bytes(), rel


# ------------------------------------------------------------------ learning (slow)
@pytest.mark.slow
def test_cartpole_dqn_reaches_475(ckpt_base):
    cfg = presets.replace(presets.get_preset("cartpole_dqn"), backend="torch", exp_name="full",
                          checkpoint_base_dir=str(ckpt_base), progress_bar=False)
    result = torch_train.train(cfg)
    final = np.mean([h["train/episode_return"] for h in result.history[-10:]])
    assert final >= 475, final


@pytest.mark.slow
def test_pendulum_sac_beats_minus_250(ckpt_base):
    cfg = presets.replace(presets.get_preset("pendulum_sac"), backend="torch", exp_name="full",
                          checkpoint_base_dir=str(ckpt_base), progress_bar=False)
    result = torch_train.train(cfg)
    final = np.mean([h["train/episode_return"] for h in result.history[-5:]])  # last 1e4 steps
    assert final > -250, final
