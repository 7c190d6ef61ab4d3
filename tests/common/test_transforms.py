"""Transforms: group composition, repack, normalisation formulas and dimension rules, padding, resize."""

import numpy as np
import pytest

from common import transforms as T
from common.normalize import NormStats


def _recorder(log, name):
    def transform(data):
        log.append(name)
        return data
    return transform


def test_group_push_mirrors_outputs():
    log = []
    base = T.Group(inputs=[_recorder(log, "in_a")], outputs=[_recorder(log, "out_a")])
    group = base.push(inputs=[_recorder(log, "in_b")], outputs=[_recorder(log, "out_b")])
    group.input_fn()({})
    group.output_fn()({})
    # New inputs run last, new outputs run first: out_b undoes in_b before out_a undoes in_a.
    assert log == ["in_a", "in_b", "out_b", "out_a"]
    assert len(base.inputs) == 1 and len(base.outputs) == 1  # push returns a new group


def test_compose_applies_left_to_right():
    add = lambda d: {**d, "x": d["x"] + 1}  # noqa: E731
    double = lambda d: {**d, "x": d["x"] * 2}  # noqa: E731
    assert T.compose([add, double])({"x": 3})["x"] == 8
    assert T.compose([])({"x": 3})["x"] == 3


def test_flatten_unflatten_roundtrip_and_alias_error():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "observation.state": 3}
    flat = T.flatten_dict(tree)
    assert flat == {"a/b": 1, "a/c/d": 2, "observation.state": 3}
    assert T.unflatten_dict(flat) == tree
    with pytest.raises(ValueError, match="a"):
        T.unflatten_dict({"a": 1, "a/b": 2})


def test_repack_renames_selects_and_nests():
    data = {"observation.state": np.ones(3), "action": np.zeros((4, 2)),
            "observation.images.top": np.zeros((2, 2, 3)), "index": 5}
    out = T.RepackTransform({"state": "observation.state", "actions": "action",
                             "images": {"top": "observation.images.top"}})(data)
    assert set(out) == {"state", "actions", "images"}
    assert out["images"]["top"] is data["observation.images.top"]
    assert "index" not in out


def test_repack_reads_nested_paths_and_names_missing_key():
    data = {"obs": {"pos": np.arange(2)}}
    assert np.array_equal(T.RepackTransform({"state": "obs/pos"})(data)["state"], np.arange(2))
    with pytest.raises(KeyError, match="obs/vel"):
        T.RepackTransform({"state": "obs/vel"})(data)


STATS = {"state": NormStats(mean=np.array([1.0, -2.0, 3.0]), std=np.array([2.0, 0.5, 1.0]),
                            q01=np.array([-1.0, 0.0, 2.0]), q99=np.array([3.0, 4.0, 2.0]))}


def test_normalize_zscore_hand_values():
    out = T.Normalize(STATS)({"state": np.array([3.0, -1.0, 3.0]), "other": np.array([7.0])})
    np.testing.assert_allclose(out["state"], [2.0 / (2 + 1e-6), 1.0 / (0.5 + 1e-6), 0.0])
    assert out["other"][0] == 7.0  # keys without stats pass through


def test_normalize_quantile_hand_values():
    out = T.Normalize(STATS, use_quantiles=True)({"state": np.array([1.0, 0.0, 2.0])})
    # (x - q01) / (q99 - q01 + 1e-6) * 2 - 1; the third dim has q99 == q01.
    np.testing.assert_allclose(out["state"], [2 / (4 + 1e-6) * 2 - 1, -1.0, -1.0])


@pytest.mark.parametrize("quantile", [False, True])
def test_unnormalize_inverts_normalize(quantile):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4, 3)).astype(np.float32)
    normalized = T.Normalize(STATS, use_quantiles=quantile)({"state": x})
    back = T.Unnormalize(STATS, use_quantiles=quantile)(normalized)
    assert back["state"].dtype == np.float32
    np.testing.assert_allclose(back["state"], x, atol=1e-5)


def test_normalize_batch_equals_per_sample():
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(6, 3))
    normalize = T.Normalize(STATS)
    stacked = np.stack([normalize({"state": row})["state"] for row in batch])
    np.testing.assert_allclose(normalize({"state": batch})["state"], stacked)


@pytest.mark.parametrize("quantile", [False, True])
def test_stats_wider_than_data_use_first_entries(quantile):
    x = np.array([3.0, -1.0])
    short = {"state": NormStats(*(np.asarray(getattr(STATS["state"], f))[:2]
                                  for f in ("mean", "std", "q01", "q99")))}
    wide = T.Normalize(STATS, use_quantiles=quantile)({"state": x})["state"]
    exact = T.Normalize(short, use_quantiles=quantile)({"state": x})["state"]
    np.testing.assert_allclose(wide, exact)
    back = T.Unnormalize(STATS, use_quantiles=quantile)({"state": wide})["state"]
    np.testing.assert_allclose(back, x, atol=1e-6)


def test_data_wider_than_stats_is_an_error_for_normalize():
    with pytest.raises(ValueError, match=r"'state' has 4 dims but its norm stats have 3"):
        T.Normalize(STATS)({"state": np.zeros(4)})
    with pytest.raises(ValueError, match="'state'"):
        T.Normalize(STATS, use_quantiles=True)({"state": np.zeros((2, 5))})


@pytest.mark.parametrize("quantile", [False, True])
def test_unnormalize_passes_padding_dims_through(quantile):
    x = np.array([[0.5, -0.5, 0.0, 7.0, -7.0]])  # 3 real dims + 2 model padding dims
    out = T.Unnormalize(STATS, use_quantiles=quantile)({"state": x})["state"]
    head = T.Unnormalize(STATS, use_quantiles=quantile)({"state": x[:, :3]})["state"]
    np.testing.assert_allclose(out[:, :3], head)
    np.testing.assert_array_equal(out[:, 3:], x[:, 3:])


def test_strict_normalize_names_missing_key():
    T.Normalize(STATS)({"actions": np.zeros(2)})  # not strict: skipped
    with pytest.raises(KeyError, match="'state'"):
        T.Normalize(STATS, strict=True)({"actions": np.zeros(2)})
    with pytest.raises(KeyError, match="'state'"):
        T.Unnormalize(STATS)({"actions": np.zeros(2)})  # always strict


def test_quantile_mode_needs_quantiles():
    no_q = {"actions": NormStats(mean=np.zeros(2), std=np.ones(2))}
    with pytest.raises(ValueError, match="'actions'.*q01"):
        T.Normalize(no_q, use_quantiles=True)
    assert T.Normalize(no_q)({"actions": np.ones(2)})["actions"].shape == (2,)


def test_nested_stats_keys():
    stats = {"obs/pos": NormStats(mean=np.array([1.0]), std=np.array([1.0]))}
    out = T.Normalize(stats)({"obs": {"pos": np.array([3.0]), "vel": np.array([3.0])}})
    np.testing.assert_allclose(out["obs"]["pos"], [2.0 / (1 + 1e-6)])
    assert out["obs"]["vel"][0] == 3.0


def test_pad_to_dim_and_slice():
    data = {"state": np.ones((2, 3), np.float32), "actions": np.ones((2, 4, 2))}
    out = T.PadToDim(5)(data)
    assert out["state"].shape == (2, 5) and out["actions"].shape == (2, 4, 5)
    np.testing.assert_array_equal(out["state"][:, 3:], 0)
    assert out["state"].dtype == np.float32
    assert T.PadToDim(5)({"state": np.ones(3)})["state"].shape == (5,)  # no actions: skipped
    assert T.SliceDim(2)(out)["actions"].shape == (2, 4, 2)
    with pytest.raises(ValueError, match="'state' has 3 dims, more than the model's 2"):
        T.PadToDim(2)(data)


def test_resize_with_pad_uint8_keeps_aspect_and_pads_with_zeros():
    image = np.full((4, 8, 3), 200, np.uint8)  # wide: scaled to 8x16 inside 16x16
    out = T.resize_with_pad(image, 16, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:4], 0)
    np.testing.assert_array_equal(out[12:], 0)
    np.testing.assert_array_equal(out[4:12], 200)


def test_resize_with_pad_float_batch_and_identity():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 3, 10, 5, 1)).astype(np.float32)  # tall, one channel
    out = T.resize_with_pad(images, 4, 4)
    assert out.shape == (2, 3, 4, 4, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., :, :1, :], 0)  # 10x5 -> 4x2, centred: cols 1..2
    np.testing.assert_array_equal(out[..., :, 3:, :], 0)
    assert np.all(out[..., :, 1:3, :] > 0)
    same = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    assert T.resize_with_pad(same, 4, 4) is same


def test_resize_with_pad_matches_pil_for_rgb():
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((12, 12), Image.BILINEAR))
    np.testing.assert_array_equal(T.resize_with_pad(image, 12, 12), expected)


def test_resize_images_transform():
    data = {"images": {"top": np.zeros((4, 8, 3), np.uint8), "wrist": np.zeros((8, 8, 3), np.uint8)},
            "state": np.zeros(2)}
    out = T.ResizeImages(16, 16)(data)
    assert {k: v.shape for k, v in out["images"].items()} == {"top": (16, 16, 3), "wrist": (16, 16, 3)}
    with pytest.raises(ValueError, match="H, W, C"):
        T.resize_with_pad(np.zeros((4, 4)), 2, 2)


def test_stats_as_plain_mappings():
    """The Policy loader hands stats over as {"mean": array, ...} dicts; both forms work."""
    as_dicts = {"state": {f: getattr(STATS["state"], f) for f in ("mean", "std", "q01", "q99")}}
    x = {"state": np.array([3.0, -1.0, 3.0])}
    for quantile in (False, True):
        np.testing.assert_array_equal(T.Normalize(as_dicts, use_quantiles=quantile)(dict(x))["state"],
                                      T.Normalize(STATS, use_quantiles=quantile)(dict(x))["state"])
        np.testing.assert_array_equal(T.Unnormalize(as_dicts, use_quantiles=quantile)(dict(x))["state"],
                                      T.Unnormalize(STATS, use_quantiles=quantile)(dict(x))["state"])
    with pytest.raises(ValueError, match="'state' have no 'std'"):
        T.Normalize({"state": {"mean": np.zeros(3)}})(dict(x))
