"""Policy wrapper (batch dims, transforms, input checks, batching) and checkpoint detection.

Uses a numpy model so it runs without jax or torch; the JAX loader is tested in
tests/vibe_rl_jax/test_jax_policy.py.
"""

import json
import sys
import pathlib

import numpy as np
import pytest

from common import config as config_lib
from common import policy as policy_lib
from common import presets
from common.policy import ArraySpec, ObservationError, Policy

SPEC = {"observation": ArraySpec((3,), "float32")}
WEIGHTS = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]], np.float32)


class Recorder:
    """A batched linear model that records the batches it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, batch):
        self.calls.append({k: v.copy() for k, v in batch.items()})
        return {"actions": batch["observation"] @ WEIGHTS}


def test_infer_adds_and_removes_the_batch_dim_and_reports_timing():
    model = Recorder()
    policy = Policy(model, input_spec=SPEC)
    obs = np.array([1.0, 2.0, 3.0], np.float32)
    out = policy.infer({"observation": obs})
    assert model.calls[0]["observation"].shape == (1, 3)
    np.testing.assert_allclose(out["actions"], obs @ WEIGHTS)
    assert out["actions"].shape == (2,)
    assert out["policy_timing"]["infer_ms"] >= 0.0


def test_infer_batch_matches_per_sample_infer_with_one_model_call():
    model = Recorder()
    policy = Policy(model, input_spec=SPEC)
    batch = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    out = policy.infer_batch({"observation": batch})
    assert len(model.calls) == 1 and model.calls[0]["observation"].shape == (5, 3)
    singles = np.stack([policy.infer({"observation": row})["actions"] for row in batch])
    np.testing.assert_allclose(out["actions"], singles, rtol=1e-6)
    assert "infer_ms" in out["policy_timing"]


def test_infer_batch_needs_a_shared_leading_dim():
    policy = Policy(Recorder(), input_spec=SPEC)
    with pytest.raises(ObservationError, match="leading batch dim"):
        policy.infer_batch({"observation": np.zeros((2, 3)), "other": np.zeros((3, 1))})


def test_transforms_run_in_order_around_the_model_and_do_not_touch_the_caller_dict():
    order = []

    def scale(data):
        order.append("scale")
        return {**data, "observation": data["raw"] * 2}

    def shift(data):
        order.append("shift")
        return {**data, "observation": data["observation"] + 1}

    def rename(out):
        order.append("rename")
        return {"action": out.pop("actions"), **out}

    def double(out):
        order.append("double")
        return {**out, "action": out["action"] * 2}

    policy = Policy(Recorder(), [scale, shift], [rename, double], input_spec=SPEC)
    raw = np.array([1.0, 0.0, 2.0], np.float32)
    request = {"raw": raw}
    out = policy.infer(request)
    assert order == ["scale", "shift", "rename", "double"]
    np.testing.assert_allclose(out["action"], ((raw * 2 + 1) @ WEIGHTS) * 2)
    assert request == {"raw": raw}


def test_a_transform_group_is_accepted():
    class Group:
        inputs = (lambda d: {"observation": d["observation"] * 0},)
        outputs = (lambda o: {**o, "tag": np.array(1)},)

    out = Policy(Recorder(), Group(), input_spec=SPEC).infer({"observation": np.ones(3)})
    np.testing.assert_array_equal(out["actions"], [0.0, 0.0])
    assert out["tag"] == 1
    with pytest.raises(TypeError, match="group"):
        Policy(Recorder(), Group(), [lambda o: o])


def test_missing_key_names_the_key_and_what_was_sent():
    policy = Policy(Recorder(), input_spec=SPEC)
    with pytest.raises(ObservationError, match=r"lacks key\(s\) \['observation'\].*got \['state'\]"):
        policy.infer({"state": np.zeros(3)})


def test_wrong_shape_names_expected_and_got_and_hints_at_batching():
    policy = Policy(Recorder(), input_spec=SPEC)
    with pytest.raises(ObservationError, match=r"shape \[4\], expected \[3\]"):
        policy.infer({"observation": np.zeros(4, np.float32)})
    with pytest.raises(ObservationError, match="infer_batch"):
        policy.infer({"observation": np.zeros((2, 3), np.float32)})


def test_dtype_same_kind_cast_is_accepted_other_kinds_refused():
    model = Recorder()
    policy = Policy(model, input_spec=SPEC)
    policy.infer({"observation": np.ones(3, np.float64)})
    policy.infer({"observation": [1, 2, 3]})  # ints and lists cast safely to float32
    assert all(call["observation"].dtype == np.float32 for call in model.calls)
    for bad in (np.array(["a", "b", "c"]), np.ones(3, np.complex64)):
        with pytest.raises(ObservationError, match="cannot be cast"):
            policy.infer({"observation": bad})
    int_policy = Policy(Recorder(), input_spec={"observation": ArraySpec((3,), "int32")})
    with pytest.raises(ObservationError, match="float64 cannot be cast"):
        int_policy.infer({"observation": np.ones(3)})


def test_non_dict_observation_and_failing_input_transform_are_observation_errors():
    policy = Policy(Recorder(), [lambda d: {"observation": d["state"]}], input_spec=SPEC)
    with pytest.raises(ObservationError, match="dict"):
        policy.infer([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ObservationError, match="KeyError"):
        policy.infer({"observation": np.zeros(3)})


def test_nested_input_spec_paths():
    spec = {"state/joints": ArraySpec((2,), "float32"), "image": ArraySpec((None, 2), "uint8")}

    def model(batch):
        return {"actions": batch["state"]["joints"].sum(-1) + batch["image"].sum((1, 2))}

    policy = Policy(model, input_spec=spec)
    out = policy.infer({"state": {"joints": np.array([1.0, 2.0])}, "image": np.ones((4, 2), np.uint8)})
    assert out["actions"] == pytest.approx(11.0)
    with pytest.raises(ObservationError, match="state/joints"):
        policy.infer({"state": {}, "image": np.ones((4, 2), np.uint8)})


def test_infer_many_batches_compatible_requests_and_isolates_bad_ones():
    model = Recorder()
    policy = Policy(model, input_spec=SPEC)
    good = [np.full(3, i, np.float32) for i in range(4)]
    results = policy.infer_many([{"observation": good[0]}, {"observation": np.zeros(5)},
                                 {"observation": good[1]}, "not a dict",
                                 {"observation": good[2]}, {"observation": good[3]}])
    assert isinstance(results[1], ObservationError) and isinstance(results[3], ObservationError)
    for index, obs in zip((0, 2, 4, 5), good):
        np.testing.assert_allclose(results[index]["actions"], obs @ WEIGHTS)
    assert len(model.calls) == 1 and model.calls[0]["observation"].shape == (4, 3)


def test_infer_many_reports_a_model_failure_per_request():
    def broken(batch):
        raise RuntimeError("model exploded")

    results = Policy(broken, input_spec=SPEC).infer_many([{"observation": np.zeros(3)}] * 2)
    assert all(isinstance(r, RuntimeError) for r in results)


def test_warmup_calls_the_model_for_power_of_two_batches():
    model = Recorder()
    Policy(model, input_spec=SPEC).warmup(max_batch=6)
    assert [c["observation"].shape[0] for c in model.calls] == [1, 2, 4, 6]


def test_without_a_spec_every_leaf_reaches_the_model():
    seen = []

    def model(batch):
        seen.append(batch)
        return {"actions": batch["a"] + batch["b"]}

    out = Policy(model).infer({"a": np.ones(2), "b": 2.0})
    np.testing.assert_array_equal(out["actions"], [3.0, 3.0])
    assert seen[0]["b"].shape == (1,)


# ----------------------------------------------------------------- checkpoint directories


def _write_step(step_dir: pathlib.Path, *, torch=False, jax=False, config=True):
    params = step_dir / "params"
    params.mkdir(parents=True)
    if torch:
        (params / "model.safetensors").write_bytes(b"")
    if jax:
        (params / "_METADATA").write_text("{}")
    if config:
        assets = step_dir / "assets"
        assets.mkdir()
        cfg = presets.replace(presets.get_preset("cartpole_ppo"), exp_name="t")
        (assets / "config.json").write_text(json.dumps(config_lib.to_dict(cfg)))
    return step_dir


def test_detect_backend_from_params_contents(tmp_path):
    assert policy_lib.detect_backend(_write_step(tmp_path / "a" / "10", jax=True)) == "jax"
    assert policy_lib.detect_backend(_write_step(tmp_path / "b" / "10", torch=True)) == "torch"
    with pytest.raises(policy_lib.CheckpointError, match="Cannot tell"):
        policy_lib.detect_backend(_write_step(tmp_path / "c" / "10"))
    with pytest.raises(policy_lib.CheckpointError, match="Cannot tell"):
        policy_lib.detect_backend(_write_step(tmp_path / "d" / "10", jax=True, torch=True))


def test_resolve_step_dir_picks_the_latest_complete_step_of_a_run_dir(tmp_path):
    run = tmp_path / "run"
    _write_step(run / "20", jax=True)
    _write_step(run / "100", jax=True)
    (run / "200.orbax-checkpoint-tmp-1").mkdir()  # an interrupted save is not a step
    assert policy_lib.resolve_step_dir(run) == run / "100"
    assert policy_lib.resolve_step_dir(run / "20") == run / "20"
    with pytest.raises(policy_lib.CheckpointError, match="does not exist"):
        policy_lib.resolve_step_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(policy_lib.CheckpointError, match="scripts/train.py"):
        policy_lib.resolve_step_dir(tmp_path / "empty")


def test_torch_checkpoint_without_a_torch_loader_is_a_clear_error(tmp_path, monkeypatch):
    """An install without the Torch backend names what to install instead of a traceback."""
    step = _write_step(tmp_path / "run" / "10", torch=True)
    monkeypatch.setitem(sys.modules, "vibe_rl_torch.policy", None)  # import now fails
    with pytest.raises(policy_lib.BackendUnavailableError, match=r"pip install -e '\.\[torch"):
        policy_lib.create_trained_policy(step)


def test_a_broken_step_is_a_clear_error_with_either_backend(tmp_path):
    """The other backend converts first; a source it cannot read names the path either way."""
    pytest.importorskip("jax")
    step = _write_step(tmp_path / "run" / "10", jax=True)  # params/ is no orbax checkpoint
    for backend in (None, "torch"):
        with pytest.raises(policy_lib.CheckpointError, match=r"run/10/params .*not a complete"):
            policy_lib.create_trained_policy(step, backend=backend)


def test_missing_config_names_the_path(tmp_path):
    step = _write_step(tmp_path / "run" / "10", jax=True, config=False)
    with pytest.raises(policy_lib.CheckpointError, match=r"assets/config.json"):
        policy_lib.create_trained_policy(step)


def test_norm_stats_missing_names_path_and_command_and_valid_file_loads(tmp_path, monkeypatch):
    step = _write_step(tmp_path / "run" / "10", jax=True)
    monkeypatch.setattr(policy_lib, "uses_norm_stats", lambda config: True)
    with pytest.raises(policy_lib.CheckpointError,
                       match=r"assets/norm_stats.json.*scripts/compute_norm_stats.py cartpole_ppo"):
        policy_lib.create_trained_policy(step)
    (step / "assets" / "norm_stats.json").write_text(json.dumps(
        {"norm_stats": {"state": {"mean": [0.0, 1.0], "std": [1.0, 2.0], "q01": [-1, -1],
                                  "q99": [1, 1]}}}))
    stats = policy_lib.load_norm_stats(step, "cartpole_ppo")
    np.testing.assert_array_equal(stats["state"].std, [1.0, 2.0])
    (step / "assets" / "norm_stats.json").write_text(json.dumps({"norm_stats": {"s": {"mean": [0]}}}))
    with pytest.raises(policy_lib.CheckpointError, match="std"):
        policy_lib.load_norm_stats(step, "cartpole_ppo")


def test_rl_presets_do_not_use_dataset_norm_stats():
    assert not policy_lib.uses_norm_stats(presets.get_preset("pendulum_ppo"))
