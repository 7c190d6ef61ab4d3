"""Serving JAX checkpoints: the loader against a numpy reference, strictness, and end to end.

Checkpoints for the unit tests are written straight from `PPO.init` (no
training, so no compile of the training loop); the end-to-end test trains a
short cartpole_ppo run, serves it with scripts/serve_policy.py and evaluates it
over the websocket with scripts/eval_policy.py.
"""

import json
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from common import client as client_lib
from common import config as config_lib
from common import policy as policy_lib
from common import presets
from tests.conftest import ROOT, run_script
from vibe_rl_jax import checkpoints, sharding
from vibe_rl_jax.ppo import PPO


def write_checkpoint(base: pathlib.Path, name: str, *, step: int = 7, params_config=None,
                     edit_params=None, **changes) -> tuple[config_lib.TrainConfig, pathlib.Path]:
    """A step directory holding freshly initialised params of preset `name` (+ `changes`)."""
    config = presets.replace(presets.get_preset(name), exp_name="t", checkpoint_base_dir=str(base),
                             **changes)
    algo = PPO(params_config or config, sharding.make_mesh(1))
    runner = algo.init(jax.random.PRNGKey(3))
    params = jax.device_get(algo.inference_params(runner))
    if edit_params is not None:
        params = edit_params(params)
    manager = checkpoints.make_manager(config.run_dir, max_to_keep=2, keep_period=None,
                                       async_save=False)
    checkpoints.save(manager, step, params=params, train_state={"step": np.int32(step)},
                     assets={"config.json": config_lib.to_dict(config)})
    manager.wait_until_finished()
    manager.close()
    return config, config.run_dir / str(step)


def reference_actions(params: dict, obs: np.ndarray, *, continuous: bool, low=None, high=None):
    """The actor in numpy: normalise, tanh MLP, then argmax or clipped mean."""
    x = obs.astype(np.float64)
    if "obs_normalizer" in params:
        norm = params["obs_normalizer"]
        x = np.clip((x - norm["mean"]) / np.sqrt(norm["var"] + 1e-8), -10, 10)
    actor = params["model"]["actor"]
    i = 0
    while f"dense_{i}" in actor:
        x = np.tanh(x @ actor[f"dense_{i}"]["kernel"] + actor[f"dense_{i}"]["bias"])
        i += 1
    out = x @ actor["head"]["kernel"] + actor["head"]["bias"]
    return np.clip(out, low, high) if continuous else out.argmax(-1)


def test_discrete_policy_matches_numpy_reference_and_describes_itself(tmp_path):
    config, step_dir = write_checkpoint(tmp_path, "cartpole_ppo")
    policy = policy_lib.create_trained_policy(config.run_dir, warmup_batch=4)  # run dir -> step 7
    meta = policy.metadata
    assert meta["backend"] == "jax" and meta["preset"] == "cartpole_ppo" and meta["step"] == 7
    assert meta["env_id"] == "CartPole-v1"
    assert meta["observation_spec"] == {"observation": {"shape": [4], "dtype": "float32"}}
    assert meta["action_spec"] == {"key": "actions", "type": "discrete", "n": 2, "shape": [],
                                   "dtype": "int32"}

    params = checkpoints.load_params(step_dir)
    obs = np.random.default_rng(0).standard_normal((13, 4)).astype(np.float32) * 2
    want = reference_actions(params, obs, continuous=False)
    assert 0 < want.sum() < len(want)  # both actions occur, so the check can fail
    batched = policy.infer_batch({"observation": obs})["actions"]
    np.testing.assert_array_equal(batched, want)
    for row, action in zip(obs, want):
        out = policy.infer({"observation": row.astype(np.float64)})
        assert out["actions"].shape == () and out["actions"] == action


def test_continuous_policy_normalises_and_clips_to_the_action_bounds(tmp_path):
    rng = np.random.default_rng(1)

    def edit(params):  # non-trivial normaliser and a head large enough to hit both bounds
        params["obs_normalizer"] = {"mean": rng.standard_normal(3).astype(np.float32),
                                    "var": rng.uniform(0.5, 2.0, 3).astype(np.float32)}
        params["model"]["actor"]["head"]["kernel"] = params["model"]["actor"]["head"]["kernel"] * 3000
        return params

    config, step_dir = write_checkpoint(tmp_path, "pendulum_ppo", edit_params=edit)
    policy = policy_lib.create_trained_policy(step_dir)
    spec = policy.metadata["action_spec"]
    assert spec["type"] == "box" and spec["low"] == [-2.0] and spec["high"] == [2.0]
    params = checkpoints.load_params(step_dir)
    obs = rng.standard_normal((32, 3)).astype(np.float32)
    want = reference_actions(params, obs, continuous=True, low=-2.0, high=2.0)
    got = policy.infer_batch({"observation": obs})["actions"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got == 2.0).any() and (got == -2.0).any() and (np.abs(got) < 2.0).any()


def test_sampling_is_seeded_and_differs_from_the_mean(tmp_path):
    _, step_dir = write_checkpoint(tmp_path, "pendulum_ppo")
    obs = {"observation": np.zeros((64, 3), np.float32)}

    def sample(seed):
        policy = policy_lib.create_trained_policy(step_dir, deterministic=False, seed=seed,
                                                  warmup_batch=1)
        return [policy.infer_batch(obs)["actions"] for _ in range(2)]

    first, again, other = sample(0), sample(0), sample(1)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], first[1])  # a fresh stream per call
    assert not np.array_equal(first[0], other[0])
    mean = policy_lib.create_trained_policy(step_dir, warmup_batch=1).infer_batch(obs)["actions"]
    assert np.std(first[0] - mean) > 0.1  # init_log_std -0.5: std ~0.6


def test_params_that_do_not_match_the_config_list_every_difference(tmp_path):
    default = presets.get_preset("cartpole_ppo")
    other = presets.replace(default, exp_name="t", checkpoint_base_dir=str(tmp_path / "x"),
                            **{"algo.hidden_sizes": (32,)})
    _, step_dir = write_checkpoint(tmp_path, "cartpole_ppo", params_config=other)
    with pytest.raises(policy_lib.CheckpointError) as error:
        policy_lib.create_trained_policy(step_dir)
    message = str(error.value)
    assert "model/actor/dense_1/kernel" in message and "model/critic/dense_1/bias" in message
    assert "model/actor/dense_0/kernel: expected (4, 64), got (4, 32)" in message


def test_missing_observation_normaliser_is_an_error(tmp_path):
    def drop(params):
        params.pop("obs_normalizer")
        return params

    _, step_dir = write_checkpoint(tmp_path, "pendulum_ppo", edit_params=drop)
    with pytest.raises(policy_lib.CheckpointError, match="obs_normalizer/mean"):
        policy_lib.create_trained_policy(step_dir)


@pytest.mark.slow
def test_train_serve_and_evaluate_over_the_websocket_matches_in_process(tmp_path):
    """~25 s: train 20480 steps, evaluate in process, serve (openpi spelling), evaluate remotely."""
    from vibe_rl_jax import train as jax_train

    KEY = "e2e-secret-key"
    config = presets.replace(presets.get_preset("cartpole_ppo"), exp_name="e2e",
                             checkpoint_base_dir=str(tmp_path), total_timesteps=20480,
                             progress_bar=False)
    result = jax_train.train(config)
    step_dir = result.run_dir / str(result.final_step)

    policy = policy_lib.create_trained_policy(step_dir)
    local = client_lib.run_episodes(policy, "CartPole-v1", num_episodes=4, seed=10)
    assert np.mean(local) > 40, local  # learned something (a random policy gets ~20)
    print("in-process returns", local)

    server = subprocess.Popen(
        [sys.executable, "scripts/serve_policy.py", "policy:checkpoint", "--policy.config",
         "cartpole_ppo", "--policy.dir", str(step_dir), "--port", "0", "--api-key", KEY, "--log-level", "debug"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()  # keep draining the server's log, or a full pipe would block it
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.1)
            match = re.search(r"Serving policy on ws://127\.0\.0\.1:(\d+)", "".join(lines))
            port = int(match.group(1)) if match else None
        assert port is not None, "".join(lines)
        remote = run_script(["scripts/eval_policy.py", "--port", str(port), "--api-key", KEY,
                             "--num-episodes", "4", "--seed", "10", "--json"], timeout=300)
        assert remote.returncode == 0, remote.stderr
        report = json.loads(remote.stdout.strip().splitlines()[-1])
        assert report["env_id"] == "CartPole-v1"
        assert report["returns"] == local
        assert report["mean_return"] == pytest.approx(np.mean(local))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        reader.join(timeout=10)
    out = "".join(lines)
    assert server.returncode == 0, out
    assert "Server stopped." in out and "Request from" in out  # per-request debug lines
    assert KEY not in out


def test_serve_policy_refuses_a_mismatched_preset_and_policy_default(tmp_path):
    _, step_dir = write_checkpoint(tmp_path, "cartpole_ppo")
    wrong = run_script(["scripts/serve_policy.py", "policy:checkpoint", "--policy.config",
                        "pendulum_ppo", "--policy.dir", str(step_dir), "--port", "0"], timeout=120)
    assert wrong.returncode == 2
    assert "trained with preset 'cartpole_ppo'" in wrong.stderr
    default = run_script(["scripts/serve_policy.py", "policy:default"], timeout=60)
    assert default.returncode == 2 and "policy:default is not supported" in default.stderr
