"""The per-kind layout rules, proven on real layers, and strictness of every map."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from convert import canonical, layout, torch_modules
from convert.canonical import CanonicalParamsError
from convert.layout import Kind, Leaf


def test_rules_name_and_transpose_each_kind():
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((3, 5)).astype(np.float32)
    assert layout.torch_key("a/dense_0/kernel", Kind.DENSE) == "a.dense_0.weight"
    np.testing.assert_array_equal(layout.to_torch(kernel, Kind.DENSE), kernel.T)
    conv = rng.standard_normal((3, 4, 2, 7)).astype(np.float32)  # HWIO
    oihw = layout.to_torch(conv, Kind.CONV)
    assert oihw.shape == (7, 2, 3, 4)
    assert oihw[6, 1, 2, 3] == conv[2, 3, 1, 6]
    assert Leaf((3, 4, 2, 7), Kind.CONV).torch_shape == (7, 2, 3, 4)
    assert layout.shape_from_torch((7, 2, 3, 4), Kind.CONV) == (3, 4, 2, 7)
    assert layout.torch_key("enc/norm/scale", Kind.SCALE) == "enc.norm.weight"
    assert layout.torch_key("log_std", Kind.PARAM) == "log_std"
    for kind, value in [(Kind.DENSE, kernel), (Kind.CONV, conv),
                        (Kind.CONV, rng.standard_normal((5, 2, 3))), (Kind.SCALE, kernel[0]),
                        (Kind.BIAS, kernel[0]), (Kind.PARAM, kernel)]:
        np.testing.assert_array_equal(layout.from_torch(layout.to_torch(value, kind), kind), value)
    with pytest.raises(ValueError, match="must end in /kernel"):
        layout.torch_key("a/dense_0/w", Kind.DENSE)
    with pytest.raises(ValueError, match="dense kernel is"):
        Leaf((3,), Kind.DENSE)


class FlaxEncoder(fnn.Module):
    """Conv -> LayerNorm -> Dense, the pieces image encoders are made of."""

    @fnn.compact
    def __call__(self, x):
        x = fnn.Conv(6, (3, 2), padding="VALID", name="conv_0")(x)  # NHWC
        x = fnn.LayerNorm(epsilon=1e-5, name="norm")(x)
        x = x.reshape(x.shape[0], -1)
        return fnn.Dense(5, name="head")(x)


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_0 = nn.Conv2d(3, 6, (3, 2))
        self.norm = nn.LayerNorm(6, eps=1e-5)
        self.head = nn.Linear(4 * 5 * 6, 5)

    def forward(self, x):  # NCHW in; channels-last before the norm and the flatten, as flax
        x = self.conv_0(x).permute(0, 2, 3, 1)
        return self.head(self.norm(x).flatten(1))


def test_conv_layernorm_and_dense_rules_give_the_same_outputs_both_ways():
    flax_net = FlaxEncoder()
    x = np.random.default_rng(0).standard_normal((2, 6, 6, 3)).astype(np.float32)
    params = flax_net.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                          params)
    torch_net = TorchEncoder()
    declared = torch_modules.layout_of(torch_net)
    assert declared["conv_0/kernel"] == Leaf((3, 2, 3, 6), Kind.CONV)
    assert declared["norm/scale"] == Leaf((6,), Kind.SCALE)
    assert declared["head/kernel"] == Leaf((120, 5), Kind.DENSE)

    flat = canonical.from_flax(jax.device_get(params), declared)  # flax tree fits torch's layout
    torch_modules.load_canonical(torch_net, flat)
    want = np.asarray(flax_net.apply({"params": params}, jnp.asarray(x)))
    with torch.no_grad():
        got = torch_net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    assert np.max(np.abs(got - want)) <= 1e-5
    back = torch_modules.canonical_params(torch_net)  # and the way back is exact
    for name, value in canonical.flatten(jax.device_get(params)).items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_layout_of_refuses_layers_it_has_no_rule_for():
    with pytest.raises(TypeError, match="No canonical layout for BatchNorm1d"):
        torch_modules.layout_of(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        torch_modules.layout_of(nn.ModuleDict({"up": nn.ConvTranspose2d(2, 2, 3)}))
    with pytest.raises(TypeError, match="named submodule"):
        torch_modules.layout_of(nn.Linear(2, 2))


def _layout():
    return {**layout.dense("a/dense_0", 3, 4), **layout.dense("a/head", 4, 2),
            "log_std": Leaf((2,))}


def _flat(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(leaf.shape).astype(np.float32)
            for name, leaf in _layout().items()}


def test_one_error_lists_missing_unexpected_and_misshaped_keys():
    flat = _flat()
    del flat["a/head/bias"], flat["log_std"]
    flat["a/dense_7/kernel"] = np.zeros((1, 1), np.float32)
    flat["a/dense_0/kernel"] = flat["a/dense_0/kernel"].T
    for convert_fn in (canonical.to_flax, canonical.to_torch_state_dict,
                       canonical.to_jax_checkpoint,
                       lambda f, lay: canonical.from_flax(canonical.unflatten(f), lay)):
        with pytest.raises(CanonicalParamsError) as info:
            convert_fn(flat, _layout())
        message = str(info.value)
        for part in ("missing keys: a/head/bias, log_std", "unexpected keys: a/dense_7/kernel",
                     "mis-shaped keys: a/dense_0/kernel: expected (3, 4), got (4, 3)"):
            assert part in message, message


def test_torch_state_dict_problems_are_named_by_torch_keys():
    state = canonical.to_torch_state_dict(_flat(), _layout())
    assert state["a.dense_0.weight"].shape == (4, 3)
    np.testing.assert_array_equal(canonical.from_torch_state_dict(state, _layout())["log_std"],
                                  _flat()["log_std"])
    del state["a.head.bias"]
    state["a.extra"] = np.zeros(1, np.float32)
    state["a.dense_0.weight"] = state["a.dense_0.weight"].T
    with pytest.raises(CanonicalParamsError) as info:
        canonical.from_torch_state_dict(state, _layout())
    message = str(info.value)
    for part in ("missing keys: a.head.bias", "unexpected keys: a.extra",
                 "a.dense_0.weight: expected (4, 3), got (3, 4)"):
        assert part in message, message


def test_integer_params_are_refused():
    flat = _flat()
    flat["log_std"] = np.zeros(2, np.int32)
    with pytest.raises(CanonicalParamsError, match="non-float keys: log_std"):
        canonical.check(flat, _layout())


def test_jax_checkpoint_tree_and_safetensors_round_trip(tmp_path):
    lay = {**_layout(), "obs_normalizer/mean": Leaf((3,)), "obs_normalizer/var": Leaf((3,))}
    flat = {**_flat(), "obs_normalizer/mean": np.ones(3, np.float32),
            "obs_normalizer/var": np.full(3, 2.0, np.float32)}
    tree = canonical.to_jax_checkpoint(flat, lay)
    assert set(tree) == {"model", "obs_normalizer"} and set(tree["model"]) == {"a", "log_std"}
    assert canonical.digest(canonical.from_jax_checkpoint(tree, lay)) == canonical.digest(flat)
    canonical.save_safetensors(tmp_path / "m.safetensors", flat)
    again = canonical.load_safetensors(tmp_path / "m.safetensors")
    assert canonical.digest(again) == canonical.digest(flat)
    changed = dict(flat, log_std=np.nextafter(flat["log_std"], np.inf))  # one ulp
    assert canonical.digest(changed) != canonical.digest(flat)
