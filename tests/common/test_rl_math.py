"""GAE and the PPO loss against numbers worked out by hand."""

import numpy as np
import pytest

from common import rl_math


def test_gae_hand_computed_terminated_vs_truncated():
    # One env, three steps, gamma=0.5, lambda=0.5.
    #   t0: r=1, V=1, next V=2, neither flag
    #   t1: r=1, V=2, episode TRUNCATED; V(true final obs)=4 -> bootstraps, trace cut
    #   t2: r=1, V=3, TERMINATED; next V=10 must be ignored
    rewards = np.array([1.0, 1.0, 1.0])
    values = np.array([1.0, 2.0, 3.0])
    next_values = np.array([2.0, 4.0, 10.0])
    terminated = np.array([False, False, True])
    truncated = np.array([False, True, False])
    adv, ret = rl_math.gae(rewards, values, next_values, terminated, truncated, 0.5, 0.5)
    # t2: delta = 1 + 0 - 3 = -2                -> A2 = -2
    # t1: delta = 1 + 0.5*4 - 2 = 1, trace cut  -> A1 = 1
    # t0: delta = 1 + 0.5*2 - 1 = 1             -> A0 = 1 + 0.25*1 = 1.25
    np.testing.assert_allclose(adv, [1.25, 1.0, -2.0])
    np.testing.assert_allclose(ret, [2.25, 3.0, 1.0])


def test_gae_batch_dims_are_independent():
    rng = np.random.default_rng(0)
    shape = (7, 3)
    args = [rng.normal(size=shape) for _ in range(3)]
    term = rng.random(shape) < 0.2
    trunc = rng.random(shape) < 0.2
    adv, _ = rl_math.gae(*args, term, trunc, 0.9, 0.8)
    for e in range(3):
        single, _ = rl_math.gae(*(a[:, e] for a in args), term[:, e], trunc[:, e], 0.9, 0.8)
        np.testing.assert_allclose(adv[:, e], single)


def test_ppo_loss_hand_computed():
    # Two samples, clip 0.2, no advantage normalisation.
    log_prob = np.log(np.array([1.5, 0.5]))  # ratios 1.5 and 0.5 against old log-prob 0
    old = np.zeros(2)
    adv = np.array([1.0, -1.0])
    values = np.array([1.0, 0.0])
    old_values = np.array([0.0, 0.0])
    returns = np.array([2.0, 1.0])
    entropy = np.array([0.3, 0.5])
    loss = rl_math.ppo_loss(np, log_prob=log_prob, old_log_prob=old, advantages=adv,
                            values=values, old_values=old_values, returns=returns,
                            entropy=entropy, clip_eps=0.2, clip_value=True, vf_coef=0.5,
                            ent_coef=0.1, normalize_advantages=False)
    # policy: max(-1*1.5, -1*1.2) = -1.2 ; max(1*0.5, 1*0.8) = 0.8 -> mean -0.2
    assert loss.policy == pytest.approx(-0.2)
    # value: sample 0: unclipped (1-2)^2=1, clipped v=0.2 -> (0.2-2)^2=3.24 -> 3.24
    #        sample 1: (0-1)^2 = 1 both -> 1 ; 0.5*mean = 0.5*2.12 = 1.06
    assert loss.value == pytest.approx(1.06)
    assert loss.entropy == pytest.approx(0.4)
    assert loss.total == pytest.approx(-0.2 + 0.5 * 1.06 - 0.1 * 0.4)
    assert loss.clip_fraction == pytest.approx(1.0)
    # approx_kl = mean((r-1) - log r)
    expected_kl = np.mean([(0.5 - np.log(1.5)), (-0.5 - np.log(0.5))])
    assert loss.approx_kl == pytest.approx(expected_kl)


def test_ppo_loss_unclipped_value_and_advantage_normalisation():
    adv = np.array([1.0, 3.0])  # normalised to [-1, 1] (population std)
    loss = rl_math.ppo_loss(np, log_prob=np.zeros(2), old_log_prob=np.zeros(2), advantages=adv,
                            values=np.array([1.0, 0.0]), old_values=np.zeros(2),
                            returns=np.array([2.0, 1.0]), entropy=np.zeros(2), clip_eps=0.2,
                            clip_value=False, vf_coef=1.0, ent_coef=0.0,
                            normalize_advantages=True)
    assert loss.policy == pytest.approx(0.0, abs=1e-6)  # -mean([-1, 1]) * ratio 1
    assert loss.value == pytest.approx(0.5 * 1.0)


def test_td_target_terminated_vs_truncated():
    # gamma 0.9: terminated drops the bootstrap; truncated keeps V(true final obs).
    reward = np.array([1.0, 1.0, 1.0])
    terminated = np.array([0.0, 1.0, 0.0])  # third is truncated: not terminated
    next_value = np.array([10.0, 10.0, 5.0])
    np.testing.assert_allclose(rl_math.td_target(reward, terminated, next_value, 0.9),
                               [10.0, 1.0, 5.5])


def test_huber():
    np.testing.assert_allclose(rl_math.huber(np, np.array([0.5, -2.0, 3.0])),
                               [0.125, 1.5, 2.5])


def test_sac_critic_target_with_entropy_term():
    # min(2, 3) - 0.5 * (-1) = 2.5 ; 1 + 0.9 * 2.5 = 3.25 ; terminated -> 1
    out = rl_math.sac_critic_target(np, reward=np.array([1.0, 1.0]), terminated=np.array([0.0, 1.0]),
                                    next_q1=np.array([2.0, 2.0]), next_q2=np.array([3.0, 3.0]),
                                    next_log_prob=np.array([-1.0, -1.0]), alpha=0.5, gamma=0.9)
    np.testing.assert_allclose(out, [3.25, 1.0])


def test_sac_actor_loss():
    out = rl_math.sac_actor_loss(np, q1=np.array([1.0, 4.0]), q2=np.array([2.0, 3.0]),
                                 log_prob=np.array([-1.0, 0.5]), alpha=0.2)
    # (0.2*-1 - 1) = -1.2 ; (0.2*0.5 - 3) = -2.9 ; mean -2.05
    assert out == pytest.approx(-2.05)


def test_temperature_loss_sign():
    # Entropy 0.5 (log pi = -0.5) below target 1.0: loss = -log_alpha * 0.5, so its
    # gradient wrt log_alpha is -0.5 and gradient descent raises alpha.
    log_alpha = 0.3
    loss = rl_math.sac_temperature_loss(log_alpha=log_alpha, log_prob=np.array([-0.5]),
                                        target_entropy=-1.0)
    assert loss == pytest.approx(-0.3 * (-1.5))
    grad = -(np.array([-0.5]) + -1.0).mean()  # d loss / d log_alpha
    assert grad > 0  # log pi + target = -1.5 < 0: entropy above target -> lower alpha
    loss_low_entropy = rl_math.sac_temperature_loss(log_alpha=log_alpha, log_prob=np.array([2.0]),
                                                    target_entropy=-1.0)
    assert loss_low_entropy == pytest.approx(-0.3 * 1.0)  # gradient -1: descent raises alpha


# ------------------------------------------------------------------ n-step windows
def nstep_run(xp, n_step, gamma, steps, windows=None):
    """Push `steps` (dicts of per-env arrays) through fresh windows; the transitions that leave."""
    if windows is None:
        windows = rl_math.nstep_empty(np, n_step, 2, (1,), np.int64)
        windows = {k: xp.asarray(v) for k, v in windows.items()}
    out = []
    for step in steps:
        windows, leaving = rl_math.nstep_push(xp, windows, gamma=gamma,
                                              **{k: xp.asarray(v) for k, v in step.items()})
        out.append({k: np.asarray(v) for k, v in leaving.items()})
    return out


def nstep_example():
    """Two envs, six steps. Env 0: rewards 1..6, terminated at step 3 (then it starts over).
    Env 1: reward 1 each step, truncated at step 1. obs of step t: 10t + env; true next
    observation: 10t + 5 + env; action: t."""
    terminated = {3: (1.0, 0.0)}
    done = {1: (False, True), 3: (True, False)}
    return [{"obs": np.array([[10.0 * t], [10.0 * t + 1]], np.float32),
             "action": np.array([t, t]),
             "reward": np.array([t + 1.0, 1.0], np.float32),
             "terminated": np.array(terminated.get(t, (0.0, 0.0)), np.float32),
             "done": np.array(done.get(t, (False, False))),
             "next_obs": np.array([[10.0 * t + 5], [10.0 * t + 6]], np.float32)}
            for t in range(6)]


# (start step, env) -> (n-step reward, discount, next_obs, terminated), n = 3, gamma = 0.5,
# worked out by hand from nstep_example's description.
NSTEP_EXPECTED = {
    (0, 0): (1 + 0.5 * 2 + 0.25 * 3, 0.125, 25.0, 0.0),   # three rewards, bootstrap
    (0, 1): (1 + 0.5 * 1, 0.25, 16.0, 0.0),              # truncated at 1: bootstrap from 16
    (1, 0): (2 + 0.5 * 3 + 0.25 * 4, 0.125, 35.0, 1.0),  # reaches the termination at 3
    (1, 1): (1.0, 0.5, 16.0, 0.0),                       # starts on the truncating step
    (2, 0): (3 + 0.5 * 4, 0.25, 35.0, 1.0),              # cut short by the termination at 3
    (2, 1): (1 + 0.5 + 0.25, 0.125, 46.0, 0.0),          # the new episode: a full window
    (3, 0): (4.0, 0.5, 35.0, 1.0),                       # the terminating step alone
    (3, 1): (1 + 0.5 + 0.25, 0.125, 56.0, 0.0),
}


def test_nstep_returns_hand_computed_terminated_vs_truncated():
    out = nstep_run(np, 3, 0.5, nstep_example())
    assert [bool(o["valid"].any()) for o in out] == [False, False, True, True, True, True]
    for t in range(2, 6):
        start = t - 2  # a transition leaves exactly n - 1 steps after it began
        for env in (0, 1):
            reward, discount, next_obs, terminated = NSTEP_EXPECTED[(start, env)]
            got = {k: v[env] for k, v in out[t].items()}
            assert got["obs"][0] == 10 * start + env and got["action"] == start
            assert got["reward"] == pytest.approx(reward)
            assert got["discount"] == pytest.approx(discount)
            assert got["next_obs"][0] == next_obs
            assert got["terminated"] == terminated
    # The TD target then uses the stored discount in place of gamma.
    got = out[2]
    np.testing.assert_allclose(
        rl_math.td_target(got["reward"], got["terminated"], np.array([10.0, 10.0]),
                          got["discount"]),
        [2.75 + 0.125 * 10, 1.5 + 0.25 * 10])


def test_one_step_windows_hand_out_each_step_at_once():
    steps = nstep_example()
    out = nstep_run(np, 1, 0.9, steps)
    for step, got in zip(steps, out):
        assert got["valid"].all()
        np.testing.assert_array_equal(got["reward"], step["reward"])
        np.testing.assert_array_equal(got["next_obs"], step["next_obs"])
        np.testing.assert_array_equal(got["terminated"], step["terminated"])
        np.testing.assert_allclose(got["discount"], [0.9, 0.9])
