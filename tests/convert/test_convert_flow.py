"""Converting flow-matching (and regression) chunk-policy checkpoints between the backends.

The layout the converter checks against is declared once in convert/families.py;
both backends' flow modules must produce it. Real tiny checkpoints come from a
few JAX training steps on generated two-goal demos (tests/vibe_rl_jax/test_flow.py).
"""

import json

import jax
import numpy as np
import pytest
import torch

pytest.importorskip("lerobot")

from common import policy as policy_lib  # noqa: E402
from common import presets  # noqa: E402
from common.config import FlowConfig  # noqa: E402
from convert import canonical, families  # noqa: E402
from convert.checkpoint import ConversionError, checkpoint_spaces, convert_checkpoint  # noqa: E402
from convert.families import Spaces  # noqa: E402
from convert.layout import Leaf, torch_key  # noqa: E402
from tests.vibe_rl_jax.test_flow import tiny, two_goal_data  # noqa: E402,F401 (fixture)
from vibe_rl_jax import checkpoints as jax_checkpoints  # noqa: E402
from vibe_rl_jax import flow as jax_flow  # noqa: E402
from vibe_rl_jax import train as jax_train  # noqa: E402
from vibe_rl_torch import checkpoints as torch_checkpoints  # noqa: E402
from vibe_rl_torch import flow as torch_flow  # noqa: E402
from vibe_rl_torch import networks as torch_networks  # noqa: E402

MODES = ["flow", "regression"]
PRESET = {mode: next(n for n, (_, c) in presets.PRESETS.items()
                     if c.algo.kind == "flow" and c.algo.mode == mode and "two_goal" in n)
          for mode in MODES}


def _shapes(tree):
    """{name: shape} of a layout (Leaf values) or of a flat dict of arrays."""
    return {name: v.shape if isinstance(v, Leaf) else tuple(np.shape(v))
            for name, v in tree.items()}


@pytest.mark.parametrize("mode", MODES)
def test_flax_and_torch_flow_modules_have_the_declared_layout(mode):
    algo = FlowConfig(mode=mode, encoder_sizes=(16, 12), hidden_sizes=(32, 24), time_embed_dim=8)
    config = presets.replace(presets.get_preset(PRESET[mode]), algo=algo,
                             **{"data.action_horizon": 5})
    layout = families.checkpoint_layout(config, Spaces((3,), 2, True))
    assert bool("time_embed/dense_0/kernel" in layout) == (mode == "flow")
    assert layout["action_expert/head/kernel"].shape == (24, 10)

    model = jax_flow.make_model(algo, action_dim=2, horizon=5)
    flax_params = jax.device_get(jax_flow.init_params(model, jax.random.PRNGKey(0), 3))
    assert _shapes(canonical.flatten(flax_params)) == _shapes(layout)

    net = torch_flow.make_model(algo, state_dim=3, action_dim=2, horizon=5)
    assert _shapes(torch_networks.canonical_params(net)) == _shapes(layout)
    torch_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert torch_shapes == {torch_key(n, leaf.kind): leaf.torch_shape for n, leaf in layout.items()}


@pytest.fixture(scope="module", params=MODES)
def jax_flow_step(request, two_goal_data, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp(f"flow_ck_{request.param}")
    result = jax_train.train(tiny(PRESET[request.param], two_goal_data, base, steps=2,
                                  **{"algo.time_embed_dim": 8}))
    return result.run_dir / "2"


def test_flow_round_trip_is_bit_identical_and_carries_the_assets(jax_flow_step, tmp_path):
    config = policy_lib.load_config(jax_flow_step)
    spaces = checkpoint_spaces(jax_flow_step, "jax", config)
    stats = json.loads((jax_flow_step / "assets" / "norm_stats.json").read_text())
    assert spaces.obs_shape == (len(stats["norm_stats"]["state"]["mean"]),)
    assert spaces.action_dim == len(stats["norm_stats"]["actions"]["mean"])

    to_torch = convert_checkpoint(jax_flow_step, "torch", tmp_path / "torch")
    assert to_torch.verified is not None and "agree" in to_torch.verified
    back = convert_checkpoint(to_torch.step_dir, "jax", tmp_path / "jax")
    assert back.params_sha256 == to_torch.params_sha256
    for step in (to_torch.step_dir, back.step_dir):
        assert (step / "assets" / "norm_stats.json").read_text() == \
            (jax_flow_step / "assets" / "norm_stats.json").read_text()
    assert not (to_torch.step_dir / "train_state").exists()

    original = canonical.flatten(jax_checkpoints.load_params(jax_flow_step)["model"])
    torch_flat = torch_checkpoints.load_params(to_torch.step_dir)
    again = canonical.flatten(jax_checkpoints.load_params(back.step_dir)["model"])
    assert original.keys() == torch_flat.keys() == again.keys()
    for name in original:
        for other in (torch_flat, again):
            assert other[name].dtype == original[name].dtype
            assert np.array_equal(other[name], original[name]), name


def test_converted_flow_policy_serves_the_same_chunks(jax_flow_step, tmp_path):
    config = policy_lib.load_config(jax_flow_step)
    to_torch = convert_checkpoint(jax_flow_step, "torch", tmp_path / "torch")
    source = policy_lib.create_trained_policy(jax_flow_step, "jax", warmup_batch=1)
    target = policy_lib.create_trained_policy(to_torch.step_dir, "torch", warmup_batch=1)
    spaces = checkpoint_spaces(jax_flow_step, "jax", config)
    obs = np.random.default_rng(3).uniform(-1, 1, (5, spaces.obs_dim)).astype(np.float32)
    a = source.infer_batch({policy_lib.OBSERVATION_KEY: obs})[policy_lib.ACTIONS_KEY]
    b = target.infer_batch({policy_lib.OBSERVATION_KEY: obs})[policy_lib.ACTIONS_KEY]
    horizon = config.data.action_horizon
    assert np.shape(a) == np.shape(b) == (5, horizon, spaces.action_dim)
    if config.algo.mode == "regression":  # deterministic: the served chunks themselves agree
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        return
    # Flow: each backend draws noise from its own generator, so compare the served
    # models' integration from the same noise (the converter's verify does the same).
    noise = np.random.default_rng(4).standard_normal((5, horizon, spaces.action_dim)).astype(
        np.float32)
    jmodel = jax_flow.make_model(config.algo, action_dim=spaces.action_dim, horizon=horizon)
    jparams = jax_checkpoints.load_params(jax_flow_step)["model"]
    ja = np.asarray(jax_flow.sample_chunk(jparams, jmodel, {"state": obs}, None,
                                          config.algo.num_integration_steps, noise=noise))
    tmodel = torch_flow.make_model(config.algo, state_dim=spaces.obs_dim,
                                   action_dim=spaces.action_dim, horizon=horizon)
    torch_networks.load_canonical(tmodel, torch_checkpoints.load_params(to_torch.step_dir))
    with torch.inference_mode():
        tb = torch_flow.sample_chunk(tmodel, {"state": torch.from_numpy(obs)},
                                     config.algo.num_integration_steps,
                                     noise=torch.from_numpy(noise)).numpy()
    assert np.max(np.abs(ja)) > 1e-3  # not trivially zero
    np.testing.assert_allclose(tb, ja, rtol=1e-4, atol=1e-4)
    # and the deterministic served policies are each reproducible
    np.testing.assert_array_equal(
        target.infer_batch({policy_lib.OBSERVATION_KEY: obs})[policy_lib.ACTIONS_KEY], b)
    # Serving the JAX step with --backend torch converts on the fly: the same Torch policy.
    served = policy_lib.create_trained_policy(jax_flow_step, "torch", warmup_batch=1)
    assert served.metadata["execute_horizon"] == target.metadata["execute_horizon"]
    np.testing.assert_array_equal(
        served.infer_batch({policy_lib.OBSERVATION_KEY: obs})[policy_lib.ACTIONS_KEY], b)


def test_flow_norm_stats_that_disagree_with_the_params_are_an_error(jax_flow_step, tmp_path):
    import shutil

    step = tmp_path / "2"
    shutil.copytree(jax_flow_step, step)
    path = step / "assets" / "norm_stats.json"
    data = json.loads(path.read_text())
    for field in data["norm_stats"]["state"]:
        if isinstance(data["norm_stats"]["state"][field], list):
            data["norm_stats"]["state"][field].append(0.0)
    path.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="norm_stats.json.*'state'"):
        convert_checkpoint(step, "torch", tmp_path / "out")
