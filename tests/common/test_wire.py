"""The wire format: openpi's msgpack-numpy layout, round trips, and refusal of unsafe payloads."""

import pickle

import msgpack
import numpy as np
import pytest

from common import wire


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.array(3.5, dtype=np.float64),                 # 0-d
    np.zeros((0, 4), dtype=np.uint8),                # empty
    np.array([True, False]),
    np.arange(5, dtype=">i4"),                       # big-endian survives
    np.array([-1, 2], dtype=np.int8),
    np.array([1.5], dtype=np.float16),
    np.array(["ab", "c"]),                           # fixed-width unicode
    np.array([b"xy"], dtype="S2"),
    np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    np.arange(10, dtype=np.float32)[::3],            # non-contiguous view
])
def test_array_round_trip_keeps_values_dtype_and_shape(array):
    out = wire.unpackb(wire.packb({"x": array}))["x"]
    assert out.dtype == array.dtype
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_nested_structures_and_numpy_scalars_round_trip():
    message = {"a": {"b": [np.int64(7), np.float32(0.5), np.bool_(True)], "c": "text"},
               "d": b"raw", "e": None, "f": 3}
    out = wire.unpackb(wire.packb(message))
    assert out["a"]["c"] == "text" and out["d"] == b"raw" and out["e"] is None and out["f"] == 3
    seven, half, true = out["a"]["b"]
    assert type(seven) is np.int64 and seven == 7
    assert type(half) is np.float32 and half == np.float32(0.5)
    assert type(true) is np.bool_ and bool(true)


def test_layout_is_openpis_bin_keys():
    """openpi_client's unpack_array looks up b"__ndarray__" etc.: the keys must be msgpack bin."""
    raw = msgpack.unpackb(wire.packb({"x": np.ones((2,), np.float32), "s": np.int32(4)}),
                          raw=False)
    assert raw["x"] == {b"__ndarray__": True, b"data": np.ones(2, np.float32).tobytes(),
                        b"dtype": "<f4", b"shape": [2]}
    assert raw["s"] == {b"__npgeneric__": True, b"data": 4, b"dtype": "<i4"}


def test_decodes_openpi_style_and_str_key_messages():
    data = np.arange(3, dtype=np.float32)
    for marker, field in ((b"__ndarray__", lambda k: k.encode()), ("__ndarray__", lambda k: k)):
        message = msgpack.packb({"obs": {marker: True, field("data"): data.tobytes(),
                                         field("dtype"): "<f4", field("shape"): (3,)}},
                                use_bin_type=True)
        np.testing.assert_array_equal(wire.unpackb(message)["obs"], data)


def test_decoded_arrays_are_read_only_views():
    out = wire.unpackb(wire.packb(np.zeros(3, np.float32)))
    with pytest.raises(ValueError):
        out[0] = 1.0


def _array_message(dtype, data=b"\0" * 8, shape=(1,)):
    return msgpack.packb({b"__ndarray__": True, b"data": data, b"dtype": dtype,
                          b"shape": list(shape)}, use_bin_type=True)


@pytest.mark.parametrize("dtype, kind", [("|O", "object"), ("O", "object"), ("|V8", "void"),
                                         ("f4,i4", "void"), ("(2,)f4", "void"),
                                         ("<c8", "complex")])
def test_refuses_object_void_and_complex_dtypes_on_decode(dtype, kind):
    with pytest.raises(wire.WireError, match=kind):
        wire.unpackb(_array_message(dtype))


def test_refuses_object_dtype_scalar_and_never_unpickles(monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle must never be used")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    scalar = msgpack.packb({b"__npgeneric__": True, b"data": 1, b"dtype": "|O"}, use_bin_type=True)
    with pytest.raises(wire.WireError, match="object"):
        wire.unpackb(scalar)
    with pytest.raises(wire.WireError, match="object"):
        wire.unpackb(_array_message("|O"))


@pytest.mark.parametrize("value", [np.array([object()], dtype=object), np.zeros(2, "f4,i4"),
                                   np.complex64(1j)])
def test_refuses_unsafe_dtypes_on_encode(value):
    with pytest.raises(wire.WireError):
        wire.packb({"x": value})


def test_refuses_unknown_python_objects_on_encode():
    with pytest.raises(wire.WireError, match="cannot encode"):
        wire.packb({"x": object()})


def test_pickle_payload_is_named():
    with pytest.raises(wire.WireError, match="pickle"):
        wire.unpackb(pickle.dumps({"observation": np.zeros(4)}))


@pytest.mark.parametrize("payload", [b"\xc1", b"\x92\x01", b"\x81\xa1a", b"", b"\x01\x02"])
def test_malformed_msgpack_is_a_wire_error(payload):
    with pytest.raises(wire.WireError, match="msgpack"):
        wire.unpackb(payload)


@pytest.mark.parametrize("message, match", [
    (_array_message("<f4", data=b"\0" * 7, shape=(2,)), "needs 8 bytes"),
    (_array_message("<f4", data=b"\0" * 8, shape=(-2,)), "non-negative"),
    (_array_message("<f4", data=b"\0" * 8, shape=("2",)), "non-negative"),
    (_array_message("not-a-dtype"), "unknown array dtype"),
    (_array_message(7), "dtype must be a string"),
    (_array_message("<U0", data=b""), "no size"),
    (msgpack.packb({b"__ndarray__": True, b"data": "text", b"dtype": "<f4", b"shape": [1]},
                   use_bin_type=True), "bin"),
    (msgpack.packb({b"__ndarray__": True, b"dtype": "<f4", b"shape": [1]}, use_bin_type=True),
     "'data'"),
    (msgpack.packb({b"__npgeneric__": True, b"data": 300, b"dtype": "|i1"}, use_bin_type=True),
     "does not fit"),
    (msgpack.packb({b"__npgeneric__": True, b"data": [1], b"dtype": "<i4"}, use_bin_type=True),
     "plain scalar"),
    (msgpack.packb(msgpack.ExtType(5, b"x")), "extension"),
    (msgpack.packb({1: 2}), "msgpack"),  # int map keys
])
def test_invalid_array_messages_are_refused_with_the_reason(message, match):
    with pytest.raises(wire.WireError, match=match):
        wire.unpackb(message)


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(wire.WireError):
        wire.unpackb(b"\x91" * 100_000 + b"\x00")


def test_non_bytes_input_is_refused():
    with pytest.raises(wire.WireError, match="binary frame"):
        wire.unpackb("text")  # type: ignore[arg-type]
