"""Train with one backend, convert, serve with the other, evaluate over the websocket (slow).

Both directions: a short cartpole_ppo run on JAX is converted to Torch and
served with --backend torch, a short Torch run is converted to JAX and served
with --backend jax; scripts/eval_policy.py over the websocket must get the
same per-episode returns as the source policy evaluated in process on the
same gymnasium seeds.

Then each trained policy and its conversion run in the *other* backend's
environment: gymnax CartPole (JAX) and gymnasium CartPole (Torch) from the
same initial state. gymnasium integrates in float64 and gymnax in float32, and
with a bang-bang policy that precision difference alone changes episode
lengths after a few hundred steps (measured: 4 of 20 episodes equal, with the
*same* JAX policy in both envs as with the converted one). So gymnax is
stepped with x64 enabled, from the initial state gymnax's reset key (or
gymnasium's reset seed) gives; its float32 observations reach the policy
exactly as gymnasium's do. With the dynamics matched that way the returns must
be equal episode for episode, and on the gymnasium trajectory the source and
the converted policy must pick the same action at every step.

Timing on 2 shared CPU cores: about 35 s for the whole file (both trainings included).
"""

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import client as client_lib
from common import policy as policy_lib
from common import presets
from convert.checkpoint import convert_checkpoint
from tests.conftest import ROOT, run_script

pytestmark = pytest.mark.slow

ENV_ID = "CartPole-v1"
SEEDS = 10  # first seed of the websocket evaluation
EPISODES = 4


def _train(backend: str, base) -> "pathlib.Path":  # noqa: F821
    config = presets.replace(presets.get_preset("cartpole_ppo"), exp_name=backend,
                             backend=backend, checkpoint_base_dir=str(base),
                             total_timesteps=20480, progress_bar=False)
    if backend == "jax":
        from vibe_rl_jax import train
    else:
        from vibe_rl_torch import train
    result = train.train(config)
    return result.run_dir / str(result.final_step)


@pytest.fixture(scope="module")
def jax_step(tmp_path_factory):
    return _train("jax", tmp_path_factory.mktemp("jax_run"))


@pytest.fixture(scope="module")
def torch_step(tmp_path_factory):
    return _train("torch", tmp_path_factory.mktemp("torch_run"))


@contextlib.contextmanager
def serving(step_dir, backend: str):
    """scripts/serve_policy.py on a free port; yields the port; stops it with SIGTERM."""
    server = subprocess.Popen(
        [sys.executable, "scripts/serve_policy.py", "--policy.dir", str(step_dir), "--backend",
         backend, "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.1)
            match = re.search(r"Serving policy on ws://127\.0\.0\.1:(\d+)", "".join(lines))
            port = int(match.group(1)) if match else None
        assert port is not None, "".join(lines)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        reader.join(timeout=10)
    out = "".join(lines)
    assert server.returncode == 0, out
    assert f"Loaded {backend} policy" in out, out


def _remote_returns(port: int) -> list[float]:
    done = run_script(["scripts/eval_policy.py", "--port", str(port), "--num-episodes",
                       str(EPISODES), "--seed", str(SEEDS), "--json"], timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["env_id"] == ENV_ID
    return report["returns"]


@pytest.mark.parametrize("source", ["jax", "torch"])
def test_train_convert_serve_with_the_other_backend_matches_in_process(source, request,
                                                                       tmp_path):
    step_dir = request.getfixturevalue(f"{source}_step")
    target = "torch" if source == "jax" else "jax"
    converted = convert_checkpoint(step_dir, target, tmp_path / target)
    assert converted.verified  # the converter's own check of random observations passed

    local = client_lib.run_episodes(policy_lib.create_trained_policy(step_dir), ENV_ID,
                                    EPISODES, seed=SEEDS)
    assert np.mean(local) > 40, local  # it learned something (a random policy gets ~20)
    print(f"{source} policy in process: {local}")
    with serving(converted.step_dir, target) as port:
        remote = _remote_returns(port)
    print(f"converted to {target}, served, over the websocket: {remote}")
    assert remote == local


# ------------------------------------------------------------------ the other backend's env
_GYMNAX = {}


def _gymnax_episode(policy, initial_state: np.ndarray) -> float:
    """One gymnax CartPole episode from `initial_state`, dynamics in float64 (see the docstring)."""
    import gymnax

    if not _GYMNAX:
        env, params = gymnax.make(ENV_ID)
        _GYMNAX.update(env=env, params=params, step=jax.jit(env.step_env))
    env, params, step = _GYMNAX["env"], _GYMNAX["params"], _GYMNAX["step"]
    with jax.enable_x64(True):
        _, state = env.reset_env(jax.random.PRNGKey(0), params)
        state = state.replace(**{name: jnp.float64(value) for name, value in zip(
            ("x", "x_dot", "theta", "theta_dot"), initial_state)})
        obs = env.get_obs(state)
    total = 0.0
    for _ in range(params.max_steps_in_episode):  # gymnax's time limit, as gymnasium's TimeLimit
        action = int(policy.infer({"observation": np.asarray(obs, np.float32)})["actions"])
        with jax.enable_x64(True):
            obs, state, reward, done, _ = step(jax.random.PRNGKey(0), state, action, params)
        total += float(reward)
        if bool(done):
            break
    return total


def _gymnasium_episode(policy, initial_state: np.ndarray, other_policy) -> float:
    """One gymnasium episode from `initial_state`; `other_policy` must agree at every step."""
    env = gymnasium.make(ENV_ID)
    env.reset(seed=0)
    env.unwrapped.state = np.array(initial_state, np.float64)
    obs = np.asarray(initial_state, np.float32)
    total, done, steps = 0.0, False, 0
    while not done:
        action = int(policy.infer({"observation": obs})["actions"])
        other = int(other_policy.infer({"observation": obs})["actions"])
        assert action == other, f"step {steps}: actions {action} vs {other} for obs {obs}"
        obs, reward, terminated, truncated, _ = env.step(action)
        total += float(reward)
        done, steps = terminated or truncated, steps + 1
    env.close()
    return total


def _gymnax_initial_state(seed: int) -> np.ndarray:
    import gymnax

    env, params = gymnax.make(ENV_ID)
    _, state = env.reset_env(jax.random.PRNGKey(seed), params)
    return np.asarray(env.get_obs(state), np.float64)


def _gymnasium_initial_state(seed: int) -> np.ndarray:
    env = gymnasium.make(ENV_ID)
    env.reset(seed=seed)
    state = np.array(env.unwrapped.state, np.float64)
    env.close()
    return state


@pytest.mark.parametrize("source", ["jax", "torch"])
def test_converted_policy_in_the_other_backends_env_gets_the_same_returns(source, request,
                                                                          tmp_path):
    step_dir = request.getfixturevalue(f"{source}_step")
    target = "torch" if source == "jax" else "jax"
    original = policy_lib.create_trained_policy(step_dir, warmup_batch=1)
    converted = policy_lib.create_trained_policy(
        convert_checkpoint(step_dir, target, tmp_path / target, check=False).step_dir,
        warmup_batch=1)
    jax_policy, torch_policy = ((original, converted) if source == "jax"
                                else (converted, original))
    # Initial states as the source backend's own env draws them for these seeds.
    initial = _gymnax_initial_state if source == "jax" else _gymnasium_initial_state
    in_gymnax, in_gymnasium = [], []
    for seed in range(8):
        state = initial(seed)
        in_gymnax.append(_gymnax_episode(jax_policy, state))
        in_gymnasium.append(_gymnasium_episode(torch_policy, state, jax_policy))
    print(f"{source}-trained: JAX policy in gymnax {in_gymnax}; Torch policy in gymnasium "
          f"{in_gymnasium}")
    assert np.mean(in_gymnax) > 40
    assert in_gymnax == in_gymnasium
