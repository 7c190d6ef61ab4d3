"""RL math written once: the numpy reference for GAE and the PPO loss.

`gae` is the reference each backend's compiled/vectorised GAE is tested
against. `ppo_loss` is written against the array API that numpy, jax.numpy
and torch share (`exp`, `clip`, `maximum`, `where`, `sqrt`, `.mean()`), so the
JAX and Torch backends call this very function with their own array module and
cannot drift apart.

Terminated and truncated are separate inputs everywhere: a terminated step
has no future value; a truncated one bootstraps from the value of the true
final observation (`next_values`), and both cut the GAE trace.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray,
        terminated: np.ndarray, truncated: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalized advantage estimation over a [T, ...] rollout.

    `next_values[t]` is V of the observation that followed step t: the true
    final observation when the episode ended at t (before any auto-reset),
    otherwise the next observation of the rollout.
    Returns (advantages, value targets).
    """
    rewards, values, next_values = (np.asarray(a, np.float64) for a in (rewards, values, next_values))
    terminated = np.asarray(terminated, bool)
    done = terminated | np.asarray(truncated, bool)
    advantages = np.zeros_like(rewards)
    running = np.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_values[t] * (~terminated[t]) - values[t]
        running = delta + gamma * lam * (~done[t]) * running
        advantages[t] = running
    return advantages, advantages + values


class PPOLoss(NamedTuple):
    total: Any
    policy: Any
    value: Any
    entropy: Any
    approx_kl: Any
    clip_fraction: Any


def ppo_loss(xp: Any, *, log_prob: Any, old_log_prob: Any, advantages: Any, values: Any,
             old_values: Any, returns: Any, entropy: Any, clip_eps: float, clip_value: bool,
             vf_coef: float, ent_coef: float, normalize_advantages: bool) -> PPOLoss:
    """Clipped-surrogate PPO loss (CleanRL/PureJaxRL form) for one minibatch.

    `xp` is the array module (numpy, jax.numpy or torch). Advantages are
    standardised with the population std (ddof=0) so all three agree.
    """
    if normalize_advantages:
        centred = advantages - advantages.mean()
        advantages = centred / (xp.sqrt((centred * centred).mean()) + 1e-8)
    log_ratio = log_prob - old_log_prob
    ratio = xp.exp(log_ratio)
    policy = xp.maximum(-advantages * ratio,
                        -advantages * xp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)).mean()
    value_err = (values - returns) ** 2
    if clip_value:
        clipped = old_values + xp.clip(values - old_values, -clip_eps, clip_eps)
        value_err = xp.maximum(value_err, (clipped - returns) ** 2)
    value = 0.5 * value_err.mean()
    ent = entropy.mean()
    total = policy + vf_coef * value - ent_coef * ent
    approx_kl = ((ratio - 1.0) - log_ratio).mean()
    clip_fraction = xp.where(xp.abs(ratio - 1.0) > clip_eps, 1.0, 0.0).mean()
    return PPOLoss(total, policy, value, ent, approx_kl, clip_fraction)


# ----------------------------------------------------------------- off-policy
# Written against the shared array API (`xp` = numpy, jax.numpy or torch) so the
# JAX and Torch DQN/SAC call the same formulas. Inputs that must not carry
# gradients (targets, log-probs in the temperature loss) are passed in already
# stopped: gradient stopping is framework-specific, the formulas are not.


def td_target(reward: Any, terminated: Any, next_value: Any, gamma: float) -> Any:
    """r + gamma * V(s') for transitions that did not terminate.

    `next_value` is the value of the true next observation, also when the
    episode was truncated there (truncation is not termination: bootstrap).
    """
    return reward + gamma * (1.0 - terminated) * next_value


# n-step returns (DQN's --algo.n-step). Each env keeps the n - 1 transitions that started in its
# last n - 1 steps and are still gathering rewards ("windows"). Every env step adds its reward
# to every open window, starts a new window, and hands out the oldest one, now n steps old (or
# closed earlier by the end of its episode): so one transition per env per step leaves, exactly
# n - 1 steps after it began, whatever happened in between. A window closes at the first
# terminated or truncated step; `next_obs` is then that step's true final observation, and
# `terminated` says whether to bootstrap from it. The stored `discount` is gamma ** (rewards
# summed), which replaces gamma in the TD target: r_t + ... + g^(m-1) r_(t+m-1) + g^m (1 - term) V.
NSTEP_FIELDS = ("obs", "action", "reward", "discount", "next_obs", "terminated", "open", "valid")


def nstep_empty(xp: Any, n_step: int, num_envs: int, obs_shape: tuple[int, ...],
                action_dtype: Any) -> dict:
    """The n - 1 empty windows per env (`xp` = numpy or jax.numpy; actions of `action_dtype`)."""
    lead = (n_step - 1, num_envs)
    floats = {k: xp.zeros(lead, xp.float32) for k in ("reward", "discount", "terminated")}
    return {"obs": xp.zeros(lead + tuple(obs_shape), xp.float32),
            "action": xp.zeros(lead, action_dtype),
            "next_obs": xp.zeros(lead + tuple(obs_shape), xp.float32), **floats,
            "open": xp.zeros(lead, bool), "valid": xp.zeros(lead, bool)}


def _expand(mask: Any, like: Any) -> Any:
    return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim))


def nstep_push(xp: Any, windows: dict, *, obs: Any, action: Any, reward: Any, terminated: Any,
               done: Any, next_obs: Any, gamma: float) -> tuple[dict, dict]:
    """Fold one vector-env step into the windows: `(windows', the transition that leaves)`.

    `xp` is numpy or jax.numpy (functional: nothing is updated in place). Per env: `obs` and
    `action` of this step, its (scaled) `reward`, `terminated` (0./1.), `done` = terminated or
    truncated, and `next_obs` = the true observation it reached. The transition that leaves
    carries `valid` = False during the first n - 1 steps of a run (no window is that old yet):
    do not store it.
    """
    is_open = windows["open"]
    gathered = {
        "obs": windows["obs"], "action": windows["action"],
        "reward": windows["reward"] + xp.where(is_open, windows["discount"] * reward, 0.0),
        "discount": xp.where(is_open, windows["discount"] * gamma, windows["discount"]),
        "next_obs": xp.where(_expand(is_open, windows["next_obs"]), next_obs, windows["next_obs"]),
        "terminated": xp.where(is_open, terminated, windows["terminated"]),
        "open": is_open & ~done, "valid": windows["valid"]}
    started = {"obs": obs, "action": action.astype(windows["action"].dtype),
               "reward": reward.astype(windows["reward"].dtype),
               "discount": xp.full(reward.shape, gamma, windows["discount"].dtype),
               "next_obs": next_obs, "terminated": terminated.astype(windows["terminated"].dtype),
               "open": ~done, "valid": xp.ones(done.shape, bool)}
    stacked = {k: xp.concatenate([gathered[k], started[k][None]]) for k in NSTEP_FIELDS}
    return ({k: v[1:] for k, v in stacked.items()}, {k: v[0] for k, v in stacked.items()})


def huber(xp: Any, error: Any, delta: float = 1.0) -> Any:
    abs_error = xp.abs(error)
    quadratic = xp.clip(abs_error, 0.0, delta)  # (torch.minimum takes no Python float)
    return 0.5 * quadratic * quadratic + delta * (abs_error - quadratic)


def sac_critic_target(xp: Any, *, reward: Any, terminated: Any, next_q1: Any, next_q2: Any,
                      next_log_prob: Any, alpha: Any, gamma: float) -> Any:
    """Soft TD target: r + gamma (1 - terminated) (min(Q1', Q2')(s', a') - alpha log pi(a'|s'))."""
    return td_target(reward, terminated, xp.minimum(next_q1, next_q2) - alpha * next_log_prob, gamma)


def sac_actor_loss(xp: Any, *, q1: Any, q2: Any, log_prob: Any, alpha: Any) -> Any:
    """E[alpha log pi(a|s) - min(Q1, Q2)(s, a)] with a ~ pi (reparameterised)."""
    return (alpha * log_prob - xp.minimum(q1, q2)).mean()


def sac_temperature_loss(*, log_alpha: Any, log_prob: Any, target_entropy: float) -> Any:
    """-log_alpha * (log pi + target_entropy), log-probs without gradient.

    When the policy's entropy (-log pi) is below the target, (log pi + target) > 0
    and the gradient step raises log_alpha: more weight on entropy.
    """
    return -(log_alpha * (log_prob + target_entropy)).mean()
