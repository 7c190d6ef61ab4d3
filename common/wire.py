"""The policy server's wire format: msgpack with numpy arrays, never pickle (DESIGN.md, contract 5).

It is openpi's format, byte for byte, so `openpi_client` talks to our server
and our client talks to openpi's:

    array  -> {b"__ndarray__": True, b"data": <raw bytes>, b"dtype": "<f4", b"shape": [2, 3]}
    scalar -> {b"__npgeneric__": True, b"data": <python value>, b"dtype": "<i8"}

The marker keys are msgpack *bin* (Python bytes) as openpi writes them; the
decoder accepts str keys too. Everything else is plain msgpack (dicts, lists,
str, bytes, numbers). Decoding is the server's first line of defence against
whatever a client sends, so it refuses rather than guesses: object, void
(structured/record) and complex dtypes, a byte count that does not match
shape x itemsize, and msgpack extension types are errors (`WireError`), and
nothing here ever unpickles. Decoded arrays are read-only views of the
received message (no copy); copy one before writing into it.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

# dtype kinds refused in both directions: object arrays can hold arbitrary Python objects
# (and unpacking them is how msgpack-numpy falls back to pickle), void covers structured
# and sub-array dtypes, and complex scalars have no msgpack representation (openpi refuses
# the same three on the way out).
_REFUSED_KINDS = {"O": "object", "V": "void/structured", "c": "complex"}

_NDARRAY = "__ndarray__"
_NPGENERIC = "__npgeneric__"


class WireError(ValueError):
    """A message is not valid msgpack-numpy; the text says what was wrong."""


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind in _REFUSED_KINDS:
        raise WireError(
            f"{where}: dtype {dtype.str!r} ({_REFUSED_KINDS[dtype.kind]}) is not allowed on the "
            f"wire; send numeric, bool or fixed-width string arrays.")


def _encode(obj: Any) -> Any:
    """msgpack `default` hook: called for every value msgpack cannot pack by itself."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype, "encode")
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype, "encode")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot encode {type(obj).__name__} {obj!r:.80}: the wire carries dicts, "
                    f"lists, str, bytes, numbers, bool, None and numpy arrays/scalars.")


def _field(obj: dict, name: str) -> Any:
    for key in (name.encode(), name):
        if key in obj:
            return obj[key]
    raise WireError(f"array message lacks the {name!r} field (keys: {sorted(map(str, obj))}).")


def _parse_dtype(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        raise WireError(f"array dtype must be a string such as '<f4', got {type(raw).__name__}.")
    try:
        dtype = np.dtype(raw)
    except (TypeError, ValueError, SyntaxError) as error:
        raise WireError(f"unknown array dtype {raw!r}: {error}") from None
    _check_dtype(dtype, "decode")
    if dtype.itemsize == 0:
        raise WireError(f"array dtype {raw!r} has no size; give a width, e.g. '<U8'.")
    return dtype


def _decode_ndarray(obj: dict) -> np.ndarray:
    dtype = _parse_dtype(_field(obj, "dtype"))
    data = _field(obj, "data")
    shape = _field(obj, "shape")
    if not isinstance(data, bytes):
        raise WireError(f"array data must be msgpack bin (bytes), got {type(data).__name__}.")
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise WireError(f"array shape must be a list of non-negative ints, got {shape!r:.80}.")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise WireError(f"array of shape {list(shape)} and dtype {dtype.str} needs {expected} "
                        f"bytes, the message carries {len(data)}.")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decode_npgeneric(obj: dict) -> np.generic:
    dtype = _parse_dtype(_field(obj, "dtype"))
    data = _field(obj, "data")
    if not isinstance(data, (bool, int, float, str, bytes)):
        raise WireError(f"numpy scalar data must be a plain scalar, got {type(data).__name__}.")
    try:
        return dtype.type(data)
    except Exception as error:  # numpy raises several types for values that do not fit
        raise WireError(f"numpy scalar {data!r:.40} does not fit dtype {dtype.str}: {error}") from None


def _decode_map(obj: dict) -> Any:
    """msgpack `object_hook`: turns array/scalar maps back into numpy, leaves other maps alone."""
    if b"__ndarray__" in obj or _NDARRAY in obj:
        return _decode_ndarray(obj)
    if b"__npgeneric__" in obj or _NPGENERIC in obj:
        return _decode_npgeneric(obj)
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not part of the protocol.")


def packb(obj: Any) -> bytes:
    """Encode `obj` (nested dicts/lists of numpy arrays and plain values) to msgpack bytes."""
    try:
        return msgpack.packb(obj, default=_encode, use_bin_type=True)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError(f"cannot encode message: {error}") from None


def _looks_like_pickle(data: bytes) -> bool:
    # Pickle protocol 2+ starts with PROTO (0x80) and the protocol number.
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode one message. Raises `WireError` (never anything else) for invalid input."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a message is bytes (a binary frame), got {type(data).__name__}.")
    data = bytes(data)
    if _looks_like_pickle(data):
        raise WireError("the message is a Python pickle; this protocol never unpickles. Encode "
                        "requests with msgpack-numpy (common.wire.packb or openpi_client).")
    try:
        # Map keys must be str or bytes (strict_map_key); openpi's marker keys are bytes.
        return msgpack.unpackb(data, object_hook=_decode_map, ext_hook=_refuse_ext, raw=False)
    except WireError:
        raise
    except msgpack.ExtraData:
        raise WireError("not a single msgpack message (extra bytes after the first object).") \
            from None
    except Exception as error:  # msgpack raises ValueError, StackError, FormatError, TypeError...
        detail = str(error) or "invalid byte sequence"
        raise WireError(f"malformed msgpack ({type(error).__name__}: {detail}).") from None
