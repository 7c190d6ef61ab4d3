"""The Torch path of the shared math: ppo_loss with xp=torch, GAE on real rollouts, sampling."""

import numpy as np
import pytest
import torch

from common import presets, rl_math
from common.config import PPOConfig
from vibe_rl_torch import envs, ppo
from vibe_rl_torch.networks import ActorCritic

import torch_toy_envs  # noqa: F401  (registers the toy ids)


def _loss_inputs(rng, n=64):
    return dict(log_prob=rng.normal(size=n) * 0.3 - 0.7, old_log_prob=rng.normal(size=n) * 0.3 - 0.7,
                advantages=rng.normal(size=n), values=rng.normal(size=n),
                old_values=rng.normal(size=n), returns=rng.normal(size=n),
                entropy=np.abs(rng.normal(size=n)))


@pytest.mark.parametrize("clip_value", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_ppo_loss_torch_equals_numpy_reference(clip_value, normalize):
    inputs = _loss_inputs(np.random.default_rng(0))
    kw = dict(clip_eps=0.2, clip_value=clip_value, vf_coef=0.5, ent_coef=0.01,
              normalize_advantages=normalize)
    ref = rl_math.ppo_loss(np, **inputs, **kw)
    ours = rl_math.ppo_loss(torch, **{k: torch.tensor(v) for k, v in inputs.items()}, **kw)
    for name in rl_math.PPOLoss._fields:
        np.testing.assert_allclose(float(getattr(ours, name)), float(getattr(ref, name)),
                                   rtol=1e-12, atol=1e-12, err_msg=name)
    # Some ratios are outside the clip range, so clipping is exercised.
    assert 0.0 < float(ref.clip_fraction) < 1.0


def test_ppo_loss_torch_hand_computed():
    # Two samples, clip 0.2, no normalisation, no value clipping.
    # ratio = exp(log_prob - old) = [1.5, 0.5]; advantages [1, -1]
    #   policy = mean(max(-A r, -A clip(r))) = mean(max(-1.5, -1.2), max(0.5, 0.8)) = (-1.2 + 0.8)/2
    #   value  = 0.5 * mean((V - R)^2) = 0.5 * (1 + 4) / 2 = 1.25 ; entropy = 0.5
    #   total  = -0.2 + 0.5 * 1.25 - 0.1 * 0.5 = 0.375
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out = rl_math.ppo_loss(torch, log_prob=t(np.log(1.5), np.log(0.5)), old_log_prob=t(0.0, 0.0),
                           advantages=t(1.0, -1.0), values=t(1.0, 2.0), old_values=t(0.0, 0.0),
                           returns=t(0.0, 0.0), entropy=t(0.5, 0.5), clip_eps=0.2,
                           clip_value=False, vf_coef=0.5, ent_coef=0.1, normalize_advantages=False)
    np.testing.assert_allclose(float(out.policy), -0.2, atol=1e-12)
    np.testing.assert_allclose(float(out.value), 1.25, atol=1e-12)
    np.testing.assert_allclose(float(out.total), 0.375, atol=1e-12)
    np.testing.assert_allclose(float(out.clip_fraction), 1.0)


def _module(env_id, num_envs=2, num_steps=5, reward_scale=1.0, **algo):
    cfg = presets.replace(presets.get_preset("cartpole_ppo"), exp_name="m", backend="torch",
                          **{"env.id": env_id, "env.num_envs": num_envs,
                             "env.reward_scale": reward_scale, "algo.num_steps": num_steps,
                             "algo.num_minibatches": 1, **{f"algo.{k}": v for k, v in algo.items()}})
    venv = envs.VecEnv(env_id, num_envs)
    venv.reset(list(range(num_envs)))
    return ppo.PPO(cfg, venv, rank_seed=0)


def _values(net, t_values):
    obs = torch.tensor([[t, 1.0] for t in t_values], dtype=torch.float32)
    with torch.no_grad():
        return net(obs)[1].double().numpy()


@pytest.mark.parametrize("env_id,limit,truncates", [
    ("torch_toy_envs:CounterTrunc-v0", 3, True),  # time limit 3: bootstrap from V(final obs [3, 1])
    ("torch_toy_envs:Counter-v0", 4, False),  # terminates after 4 steps: no bootstrap
])
def test_rollout_gae_bootstraps_from_true_final_observation(env_id, limit, truncates):
    module = _module(env_id, num_steps=7, reward_scale=0.5, gamma=0.9, gae_lambda=0.8)
    batch, episodes = module.rollout()
    t_obs = [t % limit for t in range(7)]  # the observation the policy saw
    t_next = [t % limit + 1 for t in range(7)]  # the true next observation, before any reset
    ends = np.array([n == limit for n in t_next])
    rewards = np.array([0.5 * (1 + t) for t in t_obs])[:, None].repeat(2, 1)
    terminated = (ends & (not truncates))[:, None].repeat(2, 1)
    truncated = (ends & truncates)[:, None].repeat(2, 1)
    values = _values(module.network, t_obs)[:, None].repeat(2, 1)
    next_values = _values(module.network, t_next)[:, None].repeat(2, 1)
    adv, ret = rl_math.gae(rewards, values, next_values, terminated, truncated, 0.9, 0.8)
    np.testing.assert_allclose(batch.obs[:, 0].numpy(), np.repeat(t_obs, 2))
    np.testing.assert_allclose(batch.advantages.numpy(), adv.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch.returns.numpy(), ret.reshape(-1), rtol=1e-5, atol=1e-6)
    if truncates:
        # Bootstrapping from the reset observation instead would give a different answer.
        wrong = next_values.copy()
        wrong[ends] = _values(module.network, [0])[0]
        adv_wrong, _ = rl_math.gae(rewards, values, wrong, terminated, truncated, 0.9, 0.8)
        assert not np.allclose(adv_wrong.reshape(-1), batch.advantages.numpy(), atol=1e-4)
    # Episode statistics use the unscaled rewards: 1 + 2 + ... + limit per episode.
    n_episodes = 2 * int(ends.sum())
    assert episodes["episode_count"] == n_episodes
    assert episodes["episode_return_sum"] == n_episodes * sum(range(1, limit + 1))
    assert episodes["episode_length_sum"] == n_episodes * limit


def test_stored_log_prob_is_of_the_unclipped_action():
    module = _module("torch_toy_envs:BoxCounter-v0", num_steps=8, init_log_std=1.0)
    batch, _ = module.rollout()
    actions = batch.action
    assert actions.shape == (16, 2) and (actions.abs() > 1).any(), "std e^1 must exceed the bounds"
    with torch.no_grad():
        out, values = module.network(batch.obs)
        log_prob = module.network.distribution(out).log_prob(actions)
    np.testing.assert_allclose(batch.log_prob.numpy(), log_prob.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch.value.numpy(), values.numpy(), rtol=1e-6)
    # The env received the clipped action.
    sent = np.stack([e.unwrapped.last_action for e in module.venv.envs.envs])
    assert np.abs(sent).max() <= 1.0


def test_sampling_frequencies_and_generator_determinism():
    net = ActorCritic(2, 3, False)
    probs = torch.tensor([0.1, 0.6, 0.3])
    logits = probs.log().repeat(20000, 1)
    draws = ppo.sample_action(net, logits, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(np.bincount(draws.numpy(), minlength=3) / 20000, probs, atol=0.015)
    again = ppo.sample_action(net, logits, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    gauss = ActorCritic(2, 2, True, init_log_std=np.log(0.5))
    mean = torch.tensor([[1.0, -2.0]]).repeat(20000, 1)
    x = ppo.sample_action(gauss, mean, torch.Generator().manual_seed(1)).detach()
    np.testing.assert_allclose(x.mean(0).numpy(), [1.0, -2.0], atol=0.02)
    np.testing.assert_allclose(x.std(0).numpy(), [0.5, 0.5], atol=0.02)


def test_minibatch_loss_is_the_shared_loss():
    """ppo.loss feeds the network's own log-probs/entropy/values into rl_math.ppo_loss."""
    torch.manual_seed(0)
    net = ActorCritic(3, 2, True, init_log_std=-0.3)
    algo = PPOConfig(clip_value=True, normalize_advantages=True)
    n = 32
    batch = ppo.Batch(torch.randn(n, 3), torch.randn(n, 2), torch.randn(n) - 2, torch.randn(n),
                      torch.randn(n), torch.randn(n))
    with torch.no_grad():
        ours = ppo.loss(net, algo, batch)
        mean, values = net(batch.obs)
        std = np.exp(-0.3)
        a, m = batch.action.numpy().astype(np.float64), mean.numpy().astype(np.float64)
        log_prob = (-0.5 * ((a - m) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)
        entropy = np.full(n, 2 * (0.5 + 0.5 * np.log(2 * np.pi) - 0.3))
    ref = rl_math.ppo_loss(np, log_prob=log_prob, old_log_prob=batch.log_prob.numpy(),
                           advantages=batch.advantages.numpy(), values=values.numpy(),
                           old_values=batch.value.numpy(), returns=batch.returns.numpy(),
                           entropy=entropy, clip_eps=algo.clip_eps, clip_value=True,
                           vf_coef=algo.vf_coef, ent_coef=algo.ent_coef, normalize_advantages=True)
    for name in rl_math.PPOLoss._fields:
        np.testing.assert_allclose(float(getattr(ours, name)), float(getattr(ref, name)),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
