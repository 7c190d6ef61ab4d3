"""The JAX flow-matching chunk policy: model, losses, the imitation loop, resume, errors, serving.

Every imitation preset runs here for a few steps on tiny generated datasets (the
preset test in test_train.py skips presets that read a dataset).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lerobot")

import scripts.collect_demos as collect_demos  # noqa: E402
from common import flow_math as fm  # noqa: E402
from common import lerobot_data as ld  # noqa: E402
from common import normalize, presets  # noqa: E402
from common import run_dir as rd  # noqa: E402
from common.config import ConfigError, FlowConfig  # noqa: E402
from convert import canonical  # noqa: E402
from vibe_rl_jax import checkpoints, flow  # noqa: E402
from vibe_rl_jax import train as jax_train  # noqa: E402
from tests.conftest import run_script  # noqa: E402
from tests.vibe_rl_jax import test_multiprocess as multiprocess  # noqa: E402

FLOW_PRESETS = sorted(n for n, (_, c) in presets.PRESETS.items() if c.algo.kind == "flow")


def _with_stats(root, data_config):
    stats = ld.compute_norm_stats(data_config)
    path = root.parent / f"{root.name}_stats.json"
    normalize.save(path, stats)
    return root, path


@pytest.fixture(scope="module")
def two_goal_data(hf_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("demos") / "two_goal"
    collect_demos.collect(collect_demos.Args(root=str(root), num_episodes=12, seed=0))
    return _with_stats(root, ld.DataConfig(root=str(root), action_horizon=8))


@pytest.fixture(scope="module")
def pendulum_like_data(hf_home, tmp_path_factory):
    """3-dim state, 1-dim action, like Pendulum-v1 demos (random values: only shapes matter)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path_factory.mktemp("demos") / "pendulum"
    features = {"observation.state": {"dtype": "float32", "shape": (3,), "names": None},
                "action": {"dtype": "float32", "shape": (1,), "names": None}}
    dataset = LeRobotDataset.create("test/pendulum", fps=20, features=features, root=root,
                                    use_videos=False)
    rng = np.random.default_rng(0)
    for _ in range(3):
        for _ in range(20):
            dataset.add_frame({"observation.state": rng.normal(size=3).astype(np.float32),
                               "action": rng.normal(size=1).astype(np.float32), "task": "t"})
        ld.save_episode(dataset)
    dataset.finalize()
    return _with_stats(root, ld.DataConfig(root=str(root), action_horizon=4))


def tiny(name, data, base, steps=4, **changes):
    root, stats = data
    base_changes = {
        "exp_name": "t", "checkpoint_base_dir": str(base), "progress_bar": False,
        "log_interval": 2, "save_interval": 2, "data.root": str(root),
        "data.norm_stats_path": str(stats), "data.batch_size": 16, "algo.num_steps": steps,
        "algo.warmup_steps": 1, "algo.eval_episodes": 1, "algo.hidden_sizes": (32, 32),
        "algo.encoder_sizes": (16,)}
    return presets.replace(presets.get_preset(name), **{**base_changes, **changes})


def leaves(tree):
    return jax.tree.leaves(jax.device_get(tree))


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("mode", ["flow", "regression"])
def test_canonical_param_names_and_shapes(mode):
    model = flow.make_model(FlowConfig(mode=mode, encoder_sizes=(16,), hidden_sizes=(32, 24),
                                       time_embed_dim=8), action_dim=2, horizon=5)
    shapes = flow.param_shapes(model, state_dim=3)
    expected = {
        "obs_encoder/dense_0/kernel": (3, 16), "obs_encoder/dense_0/bias": (16,),
        "action_expert/dense_0/kernel": (16 + (8 + 10 if mode == "flow" else 0), 32),
        "action_expert/dense_0/bias": (32,),
        "action_expert/dense_1/kernel": (32, 24), "action_expert/dense_1/bias": (24,),
        "action_expert/head/kernel": (24, 10), "action_expert/head/bias": (10,),
    }
    if mode == "flow":
        expected.update({"time_embed/dense_0/kernel": (8, 8), "time_embed/dense_0/bias": (8,)})
    assert shapes == expected
    params = flow.init_params(model, jax.random.PRNGKey(0), 3)
    assert flow.dims_from_params(params, horizon=5) == (3, 2)
    assert canonical.unflatten(canonical.flatten(params)).keys() == params.keys()


def _batch(rng, b=6, h=4, a=2, s=3):
    return {"state": jnp.asarray(rng.normal(size=(b, s)), jnp.float32),
            "actions": jnp.asarray(rng.normal(size=(b, h, a)), jnp.float32),
            "actions_is_pad": jnp.asarray(rng.uniform(size=(b, h)) < 0.3)}


def test_flow_loss_is_the_shared_math_on_the_models_velocity():
    rng = np.random.default_rng(0)
    batch = _batch(rng)
    model = flow.make_model(FlowConfig(hidden_sizes=(32,), encoder_sizes=(8,), time_embed_dim=8),
                            action_dim=2, horizon=4)
    params = flow.init_params(model, jax.random.PRNGKey(1), 3)
    key = jax.random.PRNGKey(7)
    loss = flow.loss_fn(params, model, batch, key)
    # The same draws by hand: noise ~ N(0, 1), t = Beta(1.5, 1) via the inverse CDF.
    noise_key, time_key = jax.random.split(key)
    noise = np.asarray(jax.random.normal(noise_key, batch["actions"].shape))
    t = fm.time_from_uniform(np.asarray(jax.random.uniform(time_key, (6,))))
    actions = np.asarray(batch["actions"])
    x_t = fm.noisy_actions(t, noise, actions)
    velocity = np.asarray(model.apply({"params": params}, {"state": batch["state"]},
                                      jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32)))
    expected = fm.flow_loss(velocity, noise, actions, np.asarray(batch["actions_is_pad"]))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_regression_loss_is_masked_mse_of_the_predicted_chunk():
    rng = np.random.default_rng(1)
    batch = _batch(rng)
    model = flow.make_model(FlowConfig(mode="regression", hidden_sizes=(32,), encoder_sizes=(8,)),
                            action_dim=2, horizon=4)
    params = flow.init_params(model, jax.random.PRNGKey(1), 3)
    prediction = np.asarray(model.apply({"params": params}, {"state": batch["state"]}))
    expected = fm.masked_mse(prediction, np.asarray(batch["actions"]),
                             np.asarray(batch["actions_is_pad"]))
    loss = flow.loss_fn(params, model, batch, jax.random.PRNGKey(0))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    chunk = flow.sample_chunk(params, model, {"state": batch["state"]}, jax.random.PRNGKey(0))
    np.testing.assert_allclose(chunk, prediction, rtol=1e-6)


def test_sample_chunk_is_euler_over_the_models_velocity():
    model = flow.make_model(FlowConfig(hidden_sizes=(32,), encoder_sizes=(8,), time_embed_dim=8),
                            action_dim=2, horizon=4)
    params = flow.init_params(model, jax.random.PRNGKey(2), 3)
    state = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32)
    key = jax.random.PRNGKey(3)
    chunk = flow.sample_chunk(params, model, {"state": state}, key, num_steps=4)
    noise = np.asarray(jax.random.normal(key, (5, 4, 2)))

    def velocity(x, t):  # the full model call (encoder included) at each step
        return np.asarray(model.apply({"params": params}, {"state": state},
                                      jnp.asarray(x, jnp.float32), jnp.full((5,), t)))

    np.testing.assert_allclose(chunk, fm.euler_sample(velocity, noise, 4), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the training loop


@pytest.mark.parametrize("name", FLOW_PRESETS)
def test_every_imitation_preset_runs(name, two_goal_data, pendulum_like_data, ckpt_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = pendulum_like_data if "pendulum" in name else two_goal_data
    result = jax_train.train(tiny(name, data, ckpt_base))
    assert result.final_step == 4
    run = result.run_dir
    assert rd.complete_steps(run) == [2, 4]
    saved = json.loads((run / "4" / "assets" / "config.json").read_text())
    assert saved["name"] == name and saved["algo"]["kind"] == "flow"
    assert normalize.load(run / "4" / "assets" / "norm_stats.json").keys() == {"state", "actions"}
    assert json.loads((run / "4" / "assets" / "norm_stats.json").read_text()) == \
        json.loads(data[1].read_text())
    params = checkpoints.load_params(run / "4")
    assert {"obs_encoder", "action_expert"} <= set(params["model"])
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    mode = presets.PRESETS[name][1].algo.mode
    tags = set(acc.Tags()["scalars"])
    assert {f"train/loss/{mode}", "train/learning_rate", "perf/sps", "perf/data_wait_frac",
            "eval/episode_return"} <= tags, tags
    assert ("eval/success_rate" in tags) == ("two_goal" in name)
    assert [e.step for e in acc.Scalars(f"train/loss/{mode}")] == [2, 4]
    assert set(result.eval) >= {"episode_return", "episode_length"}


def test_resume_is_bit_exact_and_continues_at_the_same_sample(two_goal_data, ckpt_base):
    """6 steps straight == 3, then --resume, then 3: params, EMA, optimizer, RNG and loader."""
    kw = {"save_interval": 3, "log_interval": 1, "algo.ema_decay": 0.9, "algo.eval_episodes": 0,
          "data.batch_size": 8}
    straight = jax_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base / "a", steps=6, **kw))
    first = jax_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base / "b", steps=6, **kw),
                            stop_at=3)
    assert first.final_step == 3
    resumed = jax_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base / "b", steps=6,
                                   resume=True, **kw))
    assert resumed.final_step == 6
    a, b = leaves(straight.runner), leaves(resumed.runner)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    # The saved loader positions agree at the interruption and at the end.
    for step in (3, 6):
        pos_a = _loader(straight.run_dir, step)
        assert pos_a == _loader(resumed.run_dir, step)
    order = ld.make_order(ld.DataConfig(batch_size=8, seed=0), _loader(straight.run_dir, 3)[
        "num_samples"])
    assert _loader(straight.run_dir, 3) == order.state_dict(order.advance(order.start(), 3))
    # With EMA on, params/ holds the EMA weights, not the raw ones.
    saved = checkpoints.load_params(resumed.run_dir / "6")["model"]
    for x, y in zip(leaves(saved), leaves(resumed.runner["ema_params"])):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in
               zip(leaves(saved), leaves(resumed.runner["params"])))


def test_flow_on_several_devices_matches_one(two_goal_data, tmp_path):
    """The global batch split over meshes of 4 fake CPU devices ((4, 1) and (2, 2) as
    (batch, fsdp)) or over 2 processes trains like 1 device."""
    def worker(n, fsdp_devices):
        out = tmp_path / f"{n}-{fsdp_devices}.npz"
        proc = run_script(["tests/vibe_rl_jax/_flow_mesh_worker.py", str(two_goal_data[0]),
                           str(two_goal_data[1]), str(tmp_path / f"ck{n}-{fsdp_devices}"),
                           str(fsdp_devices), str(out)],
                          env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
                               "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        data = dict(np.load(out))
        assert int(data.pop("n_devices")) == n
        return data

    one = worker(1, 1)
    assert len(one["loss"]) == 3
    for fsdp_devices in (1, 2):
        many = worker(4, fsdp_devices)
        assert one.keys() == many.keys()
        for key in one:
            np.testing.assert_allclose(many[key], one[key], rtol=1e-4, atol=1e-5,
                                       err_msg=f"fsdp={fsdp_devices} {key}")
    # Two JAX processes (jax.distributed over gloo), each loading half of every global batch.
    port = multiprocess._free_port()
    multiprocess._launch(
        lambda env: ["tests/vibe_rl_jax/_flow_mesh_worker.py", str(two_goal_data[0]),
                     str(two_goal_data[1]), str(tmp_path / "ck-procs"), "1",
                     str(tmp_path / f"procs-{env['JAX_PROCESS_ID']}.npz")],
        [{"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": str(i)} for i in range(2)])
    for i in range(2):
        procs = dict(np.load(tmp_path / f"procs-{i}.npz"))
        assert int(procs.pop("n_devices")) == 2
        for key in one:
            np.testing.assert_allclose(procs[key], one[key], rtol=1e-4, atol=1e-5,
                                       err_msg=f"2 processes, process {i}: {key}")


def _loader(run_dir, step):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore((run_dir / str(step) / "train_state").absolute())
    return {k: int(v) for k, v in restored["loader"].items()}


def test_missing_norm_stats_names_the_path_and_the_command(two_goal_data, ckpt_base, tmp_path):
    missing = tmp_path / "nowhere" / "norm_stats.json"
    config = tiny("two_goal_flow", two_goal_data, ckpt_base, **{"data.norm_stats_path": str(missing)})
    with pytest.raises(ConfigError) as error:
        jax_train.train(config)
    assert str(missing) in str(error.value)
    assert "python scripts/compute_norm_stats.py two_goal_flow" in str(error.value)
    assert not config.run_dir.exists()  # nothing was created for a run that cannot start


def test_dimension_mismatch_between_dataset_and_stats(two_goal_data, pendulum_like_data,
                                                      ckpt_base):
    # Stats of the pendulum data (state 3, action 1) for the two-goal data (state 2, action 2).
    config = tiny("two_goal_flow", two_goal_data, ckpt_base,
                  **{"data.norm_stats_path": str(pendulum_like_data[1])})
    with pytest.raises(ConfigError, match=r"'observation.state' \(state\) has 2 dims but the norm "
                                          r"stats .* have 3.*compute_norm_stats.py two_goal_flow"):
        jax_train.train(config)


def test_resume_with_a_different_model_is_an_error(two_goal_data, ckpt_base):
    jax_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base, steps=2,
                         **{"algo.eval_episodes": 0}))
    with pytest.raises(ConfigError, match="action_expert/dense_0/kernel.*--overwrite"):
        jax_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base, steps=4, resume=True,
                             **{"algo.eval_episodes": 0, "algo.hidden_sizes": (48, 32)}))


# ---------------------------------------------------------------- serving


@pytest.mark.parametrize("mode", ["flow", "regression"])
def test_served_policy_applies_the_checkpoints_own_norm_stats(mode, two_goal_data, ckpt_base):
    from common.policy import create_trained_policy

    name = f"two_goal_{mode}"
    config = tiny(name, two_goal_data, ckpt_base, **{"algo.eval_episodes": 0})
    result = jax_train.train(config)
    step_dir = result.run_dir / "4"
    policy = create_trained_policy(result.run_dir, warmup_batch=1)
    obs = np.array([0.1, 0.3], np.float32)
    out = policy.infer({"observation": obs})["actions"]
    assert out.shape == (8, 2) and out.dtype == np.float32
    assert policy.metadata["action_horizon"] == 8 and policy.metadata["execute_horizon"] == 4
    assert policy.metadata["norm_stats_keys"] == ["actions", "state"]
    # The same chunk by hand: Normalize the state, sample, Unnormalize the chunk.
    stats = normalize.load(step_dir / "assets" / "norm_stats.json")
    model = flow.make_model(config.algo, action_dim=2, horizon=8)
    params = checkpoints.load_params(step_dir)["model"]
    state = (obs - stats["state"].mean) / (stats["state"].std + 1e-6)
    chunk = flow.sample_chunk(params, model, {"state": jnp.asarray(state[None], jnp.float32)},
                              jax.random.PRNGKey(0), config.algo.num_integration_steps)
    by_hand = np.asarray(chunk)[0] * (stats["actions"].std + 1e-6) + stats["actions"].mean
    np.testing.assert_allclose(out, by_hand, rtol=1e-4, atol=1e-6)
    # Stats are read from the checkpoint's assets/, not from the preset's path.
    path = step_dir / "assets" / "norm_stats.json"
    payload = json.loads(path.read_text())
    payload["norm_stats"]["actions"]["mean"] = [m + 100.0 for m in
                                                payload["norm_stats"]["actions"]["mean"]]
    path.write_text(json.dumps(payload))
    shifted = create_trained_policy(step_dir, warmup_batch=1).infer({"observation": obs})["actions"]
    np.testing.assert_allclose(shifted - out, 100.0, rtol=0, atol=1e-3)


def test_flow_config_validation_names_the_flags():
    base = presets.get_preset("two_goal_flow")
    with pytest.raises(ConfigError, match="--algo.execute-horizon .* --data.action-horizon"):
        presets.replace(base, **{"algo.execute_horizon": 9})
    with pytest.raises(ConfigError, match="needs a dataset"):
        presets.replace(base, data=None)
    with pytest.raises(ConfigError, match="--algo.ema-decay"):
        presets.replace(base, **{"algo.ema_decay": 1.0})
    with pytest.raises(ConfigError, match="--algo.eval-interval"):
        presets.replace(base, log_interval=100, **{"algo.eval_interval": 150})
    assert base.num_updates == base.algo.num_steps  # training steps, not env steps
    cli = presets.cli(["two_goal_flow", "--exp-name", "r", "--data.root", "/d", "--algo.mode",
                       "regression", "--data.action-horizon", "4", "--algo.execute-horizon", "2"])
    assert (cli.data.root, cli.algo.mode, cli.data.action_horizon) == ("/d", "regression", 4)
