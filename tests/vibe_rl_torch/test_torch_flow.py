"""The Torch flow chunk policy: shared math with xp=torch, parity with the JAX model through the
canonical dict, the Torch imitation loop (presets, resume, errors) and serving."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot")

import scripts.collect_demos as collect_demos  # noqa: E402
from common import flow_math as fm  # noqa: E402
from common import lerobot_data as ld  # noqa: E402
from common import normalize, presets  # noqa: E402
from common import run_dir as rd  # noqa: E402
from common.config import ConfigError, FlowConfig  # noqa: E402
from convert import canonical  # noqa: E402
from vibe_rl_torch import checkpoints, networks  # noqa: E402
from vibe_rl_torch import flow as torch_flow  # noqa: E402
from vibe_rl_torch import train as torch_train  # noqa: E402

FLOW_PRESETS = sorted(n for n, (_, c) in presets.PRESETS.items() if c.algo.kind == "flow")


# ---------------------------------------------------------------- shared math, xp=torch


def test_flow_math_with_torch_matches_numpy():
    rng = np.random.default_rng(0)
    u = rng.uniform(size=7)
    np.testing.assert_allclose(fm.time_from_uniform(torch.tensor(u), torch).numpy(),
                               fm.time_from_uniform(u), rtol=1e-12)
    prediction, target = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    is_pad = rng.uniform(size=(3, 4)) < 0.4
    assert float(fm.masked_mse(torch.tensor(prediction), torch.tensor(target),
                               torch.tensor(is_pad), torch)) == pytest.approx(
        fm.masked_mse(prediction, target, is_pad), rel=1e-12)
    # Hand values: (1 + 4 + 9 + 16) / 4 valid entries.
    hand = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert float(fm.masked_mse(hand, torch.zeros_like(hand), torch.tensor([[False, False, True]]),
                               torch)) == pytest.approx(7.5)
    t = torch.tensor([0.5, 0.0], dtype=torch.float64)
    np.testing.assert_allclose(fm.sincos_embedding(t, 8, torch).numpy(),
                               fm.sincos_embedding(t.numpy(), 8), rtol=1e-6, atol=1e-6)
    out = fm.euler_sample(lambda x, t: torch.full_like(x, t), torch.full((1, 1, 1), 3.0), 2)
    assert float(out) == pytest.approx(2.25)


# ---------------------------------------------------------------- parity with JAX


def _configs():
    return [FlowConfig(encoder_sizes=(16,), hidden_sizes=(32, 24), time_embed_dim=8,
                       activation=act, mode=mode)
            for mode, act in (("flow", "silu"), ("flow", "gelu"), ("regression", "relu"))]


@pytest.mark.parametrize("config", _configs(), ids=lambda c: f"{c.mode}-{c.activation}")
def test_jax_and_torch_models_agree_through_the_canonical_dict(config):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from vibe_rl_jax import flow as jax_flow

    jmodel = jax_flow.make_model(config, action_dim=2, horizon=5)
    jparams = jax_flow.init_params(jmodel, jax.random.PRNGKey(3), 3)
    flat = canonical.flatten(jparams)
    tmodel = torch_flow.make_model(config, state_dim=3, action_dim=2, horizon=5)
    assert set(networks.canonical_params(tmodel)) == set(flat)
    assert {k: v.shape for k, v in networks.canonical_params(tmodel).items()} == \
        {k: v.shape for k, v in flat.items()}
    networks.load_canonical(tmodel, flat)
    # ... and back: the round trip is exact.
    for k, v in networks.canonical_params(tmodel).items():
        np.testing.assert_array_equal(v, flat[k])

    rng = np.random.default_rng(4)
    state = rng.normal(size=(6, 3)).astype(np.float32)
    x_t = rng.normal(size=(6, 5, 2)).astype(np.float32)
    t = rng.uniform(size=6).astype(np.float32)
    noise = rng.normal(size=(6, 5, 2)).astype(np.float32)
    with torch.no_grad():
        if config.mode == "flow":
            theirs = tmodel({"state": torch.tensor(state)}, torch.tensor(x_t), torch.tensor(t))
            ours = jmodel.apply({"params": jparams}, {"state": state}, x_t, t)
            np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), rtol=1e-4, atol=1e-5)
        chunk_t = torch_flow.sample_chunk(tmodel, {"state": torch.tensor(state)}, 10,
                                          noise=torch.tensor(noise))
    # The JAX sampler with the same noise: Euler over the JAX velocity.
    features = jmodel.apply({"params": jparams}, {"state": state}, method=jax_flow.FlowPolicyNet.encode)
    if config.mode == "flow":
        chunk_j = fm.euler_sample(lambda x, tt: np.asarray(jmodel.apply(
            {"params": jparams}, features, jnp.asarray(x), jnp.full((6,), tt),
            method=jax_flow.FlowPolicyNet.velocity)), noise, 10)
    else:
        chunk_j = jmodel.apply({"params": jparams}, features, method=jax_flow.FlowPolicyNet.predict)
    np.testing.assert_allclose(chunk_t.numpy(), np.asarray(chunk_j), rtol=1e-4, atol=1e-4)


def test_torch_loss_is_the_shared_math():
    config = FlowConfig(encoder_sizes=(8,), hidden_sizes=(16,), time_embed_dim=4)
    model = torch_flow.make_model(config, state_dim=3, action_dim=2, horizon=4)
    rng = np.random.default_rng(0)
    batch = {"state": torch.tensor(rng.normal(size=(5, 3)), dtype=torch.float32),
             "actions": torch.tensor(rng.normal(size=(5, 4, 2)), dtype=torch.float32),
             "actions_is_pad": torch.tensor(rng.uniform(size=(5, 4)) < 0.3)}
    loss = torch_flow.loss_fn(model, batch, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)  # the same draws, in the same order
    noise = torch.randn((5, 4, 2), generator=gen)
    t = fm.time_from_uniform(torch.rand((5,), generator=gen), torch)
    with torch.no_grad():
        velocity = model(batch, fm.noisy_actions(t, noise, batch["actions"]), t)
    expected = fm.flow_loss(velocity.numpy(), noise.numpy(), batch["actions"].numpy(),
                            batch["actions_is_pad"].numpy())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- the Torch imitation loop


@pytest.fixture(scope="module")
def two_goal_data(hf_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("demos") / "two_goal"
    collect_demos.collect(collect_demos.Args(root=str(root), num_episodes=12, seed=0))
    stats = ld.compute_norm_stats(ld.DataConfig(root=str(root), action_horizon=8))
    path = normalize.save(root.parent / "stats.json", stats)
    return root, path


def tiny(name, data, base, steps=4, **changes):
    root, stats = data
    base_changes = {
        "exp_name": "t", "backend": "torch", "checkpoint_base_dir": str(base),
        "progress_bar": False, "log_interval": 2, "save_interval": 2, "data.root": str(root),
        "data.norm_stats_path": str(stats), "data.batch_size": 16, "algo.num_steps": steps,
        "algo.warmup_steps": 1, "algo.eval_episodes": 1, "algo.hidden_sizes": (32, 32),
        "algo.encoder_sizes": (16,)}
    return presets.replace(presets.get_preset(name), **{**base_changes, **changes})


@pytest.mark.parametrize("name", [n for n in FLOW_PRESETS if "two_goal" in n])
def test_two_goal_presets_run_on_torch(name, two_goal_data, ckpt_base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = torch_train.train(tiny(name, two_goal_data, ckpt_base))
    assert result.final_step == 4 and rd.complete_steps(result.run_dir) == [2, 4]
    step_dir = result.run_dir / "4"
    assert json.loads((step_dir / "assets" / "norm_stats.json").read_text()) == \
        json.loads(two_goal_data[1].read_text())
    assert json.loads((step_dir / "assets" / "config.json").read_text())["backend"] == "torch"
    params = checkpoints.load_params(step_dir)
    assert "obs_encoder/dense_0/kernel" in params and "action_expert/head/bias" in params
    acc = EventAccumulator(str(result.run_dir / "tb"))
    acc.Reload()
    mode = presets.PRESETS[name][1].algo.mode
    assert {f"train/loss/{mode}", "train/learning_rate", "perf/sps", "perf/data_wait_frac",
            "eval/success_rate", "eval/episode_return"} <= set(acc.Tags()["scalars"])


def test_torch_learning_rate_is_the_shared_schedule(two_goal_data, ckpt_base):
    from common import schedules

    config = tiny("two_goal_flow", two_goal_data, ckpt_base, steps=6, log_interval=1,
                  save_interval=6, **{"algo.warmup_steps": 2, "algo.eval_episodes": 0})
    result = torch_train.train(config)
    lrs = [h["train/learning_rate"] for h in result.history]
    expected = [schedules.lr_at("warmup_cosine", config.algo.lr, s, 6, 2) for s in range(6)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)


@pytest.mark.usefixtures("deterministic")
def test_torch_resume_is_bit_exact_and_continues_at_the_same_sample(two_goal_data, ckpt_base):
    kw = {"save_interval": 3, "log_interval": 1, "algo.ema_decay": 0.9, "algo.eval_episodes": 0,
          "data.batch_size": 8}
    straight = torch_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base / "a", steps=6, **kw))
    first = torch_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base / "b", steps=6, **kw),
                              stop_at=3)
    assert first.final_step == 3
    resumed = torch_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base / "b", steps=6,
                                     resume=True, **kw))
    assert resumed.final_step == 6 and [h["step"] for h in resumed.history] == [4, 5, 6]
    for (name, a), (_, b) in zip(straight.module.state_dict().items(),
                                 resumed.module.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for name in straight.ema:
        torch.testing.assert_close(straight.ema[name], resumed.ema[name], rtol=0, atol=0)
    for step in (3, 6):
        a = checkpoints.load_trainer_state(straight.run_dir / str(step))["loader"]
        b = checkpoints.load_trainer_state(resumed.run_dir / str(step))["loader"]
        assert a == b
    order = ld.make_order(ld.DataConfig(batch_size=8, seed=0), a["num_samples"])
    assert checkpoints.load_trainer_state(straight.run_dir / "3")["loader"] == \
        order.state_dict(order.advance(order.start(), 3))
    # params/ holds the EMA weights.
    saved = checkpoints.load_params(resumed.run_dir / "6")
    assert saved.keys() == resumed.params.keys()
    for k in saved:
        np.testing.assert_array_equal(saved[k], resumed.params[k])
    raw = networks.canonical_params(resumed.module)
    assert any(not np.array_equal(raw[k], saved[k]) for k in saved)


def test_torch_errors_name_the_path_and_the_dimensions(two_goal_data, ckpt_base, tmp_path):
    missing = tmp_path / "none" / "norm_stats.json"
    with pytest.raises(ConfigError, match="compute_norm_stats.py two_goal_flow") as error:
        torch_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base,
                               **{"data.norm_stats_path": str(missing)}))
    assert str(missing) in str(error.value)
    wrong = normalize.save(tmp_path / "wrong.json", {
        "state": normalize.NormStats(np.zeros(2), np.ones(2), np.zeros(2), np.ones(2)),
        "actions": normalize.NormStats(np.zeros(3), np.ones(3), np.zeros(3), np.ones(3))})
    with pytest.raises(ConfigError, match=r"\(actions\) has 2 dims but the norm stats .* have 3"):
        torch_train.train(tiny("two_goal_flow", two_goal_data, ckpt_base,
                               **{"data.norm_stats_path": str(wrong)}))


def test_served_torch_policy_applies_the_checkpoints_own_norm_stats(two_goal_data, ckpt_base):
    from common.policy import create_trained_policy

    config = tiny("two_goal_flow", two_goal_data, ckpt_base, **{"algo.eval_episodes": 0})
    result = torch_train.train(config)
    step_dir = result.run_dir / "4"
    policy = create_trained_policy(step_dir, warmup_batch=1)
    assert policy.metadata["backend"] == "torch"
    obs = np.array([0.1, 0.3], np.float32)
    out = policy.infer({"observation": obs})["actions"]
    assert out.shape == (8, 2)
    stats = normalize.load(step_dir / "assets" / "norm_stats.json")
    model = torch_flow.make_model(config.algo, state_dim=2, action_dim=2, horizon=8)
    networks.load_canonical(model, checkpoints.load_params(step_dir))
    state = torch.tensor((obs - stats["state"].mean) / (stats["state"].std + 1e-6),
                         dtype=torch.float32)[None]
    seed = int(np.random.SeedSequence([0, 0]).generate_state(1)[0])
    with torch.no_grad():
        chunk = torch_flow.sample_chunk(model, {"state": state}, config.algo.num_integration_steps,
                                        generator=torch.Generator().manual_seed(seed))
    by_hand = chunk.numpy()[0] * (stats["actions"].std + 1e-6) + stats["actions"].mean
    np.testing.assert_allclose(out, by_hand, rtol=1e-4, atol=1e-6)
    path = step_dir / "assets" / "norm_stats.json"
    payload = json.loads(path.read_text())
    payload["norm_stats"]["actions"]["mean"] = [m + 100.0 for m in
                                                payload["norm_stats"]["actions"]["mean"]]
    path.write_text(json.dumps(payload))
    shifted = create_trained_policy(step_dir, warmup_batch=1).infer({"observation": obs})["actions"]
    np.testing.assert_allclose(shifted - out, 100.0, rtol=0, atol=1e-3)
