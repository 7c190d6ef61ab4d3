"""The policy server over real WebSocket connections on 127.0.0.1.

A numpy model stands in for a trained one (no jax or torch here); the served
JAX checkpoint end to end is in tests/vibe_rl_jax/test_jax_policy.py. Every test
starts its server on a free port in a thread and stops it on exit
(`serving.serve_in_thread`); loops are bounded and every wait has a timeout.
"""

import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
import websockets
from websockets.sync.client import connect

from common import client as client_lib
from common import serving, wire
from common.policy import ArraySpec, Policy

WEIGHTS = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0], [2.0, 0.0]], np.float32)
SPEC = {"observation": ArraySpec((4,), "float32")}


class Model:
    """Batched linear model; records batch sizes; can be slowed, blocked or made to fail."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __call__(self, batch):
        obs = batch["observation"]
        self.batch_sizes.append(obs.shape[0])
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.delay_s:
            time.sleep(self.delay_s)
        if np.any(obs == 666.0):
            raise RuntimeError("model exploded")
        return {"actions": obs @ WEIGHTS}


def make_policy(model=None) -> Policy:
    return Policy(model or Model(), input_spec=SPEC,
                  metadata={"env_id": "Test-v0", "observation_spec": {"observation": {
                      "shape": [4], "dtype": "float32"}}})


def obs_of(i: float) -> dict:
    return {"observation": np.arange(4, dtype=np.float32) + i}


def expected(i: float) -> np.ndarray:
    return obs_of(i)["observation"] @ WEIGHTS


def uri(server) -> str:
    return f"ws://127.0.0.1:{server.port}"


def assert_served(server, i: float = 1.0, **kwargs) -> None:
    with client_lib.PolicyClient("127.0.0.1", server.port, connect_timeout_s=5, **kwargs) as c:
        np.testing.assert_allclose(c.infer(obs_of(i))["actions"], expected(i), rtol=1e-6)


# ----------------------------------------------------------------- protocol


def test_metadata_first_then_request_reply_with_timings():
    with serving.serve_in_thread(make_policy()) as server, \
            connect(uri(server), compression=None) as ws:
        first = ws.recv(timeout=5)
        assert isinstance(first, bytes)
        metadata = wire.unpackb(first)
        assert metadata["env_id"] == "Test-v0"
        assert metadata["server"]["max_message_bytes"] == serving.DEFAULT_MAX_MESSAGE_BYTES
        replies = []
        for i in range(3):
            ws.send(wire.packb(obs_of(i)))
            replies.append(wire.unpackb(ws.recv(timeout=5)))
        for i, reply in enumerate(replies):
            np.testing.assert_allclose(reply["actions"], expected(i), rtol=1e-6)
            assert reply["actions"].dtype == np.float32
            assert reply["server_timing"]["infer_ms"] > 0
            assert reply["policy_timing"]["infer_ms"] > 0
        assert "prev_total_ms" not in replies[0]["server_timing"]
        assert all(r["server_timing"]["prev_total_ms"] > 0 for r in replies[1:])


def test_healthz_answers_200_without_a_handshake_even_with_an_api_key():
    with serving.serve_in_thread(make_policy(), api_key="k") as server:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as reply:
            assert reply.status == 200
            assert reply.read() == b"OK\n"


def test_client_retries_until_the_server_is_up():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = {}

    def connect_later():
        with client_lib.PolicyClient("127.0.0.1", port, connect_timeout_s=20,
                                     retry_interval_s=0.05) as c:
            result["actions"] = c.infer(obs_of(2))["actions"]

    thread = threading.Thread(target=connect_later)
    thread.start()
    time.sleep(0.3)  # the client is retrying against a closed port meanwhile
    with serving.serve_in_thread(make_policy(), port=port):
        thread.join(timeout=20)
    np.testing.assert_allclose(result["actions"], expected(2), rtol=1e-6)


def test_client_gives_up_after_its_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="No policy server"):
        client_lib.PolicyClient("127.0.0.1", port, connect_timeout_s=0.5, retry_interval_s=0.1)
    assert time.monotonic() - start < 5


# ----------------------------------------------------------------- API key


def test_api_key_accepted_and_others_refused_with_401_before_metadata(caplog):
    caplog.set_level(logging.DEBUG)
    key = "s3cret-key-value"
    with serving.serve_in_thread(make_policy(), api_key=key) as server:
        assert_served(server, api_key=key)
        for headers in (None, {"Authorization": "Api-Key wrong"},
                        {"Authorization": f"Bearer {key}"}, {"Authorization": f"Api-Key {key}x"}):
            with pytest.raises(websockets.InvalidStatus) as refused:
                connect(uri(server), additional_headers=headers, open_timeout=5)
            assert refused.value.response.status_code == 401
        with pytest.raises(client_lib.ServerError, match="401"):
            client_lib.PolicyClient("127.0.0.1", server.port, api_key="wrong", connect_timeout_s=5)
    # Everything the server and our client log (websockets' header dumps included, at DEBUG);
    # the raw test connections above log through websockets' own client logger.
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("vibe_rl"))
    assert "missing or wrong API key" in ours
    assert "Authorization: <redacted>" in ours
    assert key not in ours


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv(serving.API_KEY_ENV, "from-env")
    assert serving.api_key_from_env(None) == "from-env"
    assert serving.api_key_from_env("explicit") == "explicit"
    monkeypatch.delenv(serving.API_KEY_ENV)
    assert serving.api_key_from_env(None) is None


# ----------------------------------------------------------------- bad input


def _raw_array(dtype, data, shape):
    return msgpack.packb({"observation": {b"__ndarray__": True, b"data": data, b"dtype": dtype,
                                          b"shape": shape}}, use_bin_type=True)


BAD_REQUESTS = {
    "malformed msgpack": (b"\xc1\xc1\xc1", "malformed msgpack"),
    "pickle": (pickle.dumps({"observation": np.zeros(4, np.float32)}), "pickle"),
    "object dtype": (_raw_array("|O", b"\0" * 32, [4]), "object"),
    "bytes do not match shape": (_raw_array("<f4", b"\0" * 12, [4]), "needs 16 bytes"),
    "text frame": ('{"observation": [1, 2, 3, 4]}', "text frame"),
    "not a map": (wire.packb([1, 2, 3]), "dict"),
    "missing key": (wire.packb({"state": np.zeros(4, np.float32)}), "lacks key"),
    "wrong shape": (wire.packb({"observation": np.zeros(3, np.float32)}), r"shape \[3\]"),
    "batched shape": (wire.packb({"observation": np.zeros((2, 4), np.float32)}), "unbatched"),
    "wrong dtype": (wire.packb({"observation": np.array(["a", "b", "c", "d"])}), "cannot be cast"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_error_text_frame_and_the_connection_is_kept(case):
    payload, match = BAD_REQUESTS[case]
    with serving.serve_in_thread(make_policy()) as server, \
            connect(uri(server), compression=None) as bad, \
            client_lib.PolicyClient("127.0.0.1", server.port, connect_timeout_s=5) as other:
        bad.recv(timeout=5)  # metadata
        bad.send(payload)
        error = bad.recv(timeout=5)
        assert isinstance(error, str) and error.startswith("Bad request: ")
        assert pytest.importorskip("re").search(match, error), error
        # The same connection still serves a good request, and so does everyone else.
        bad.send(wire.packb(obs_of(3)))
        np.testing.assert_allclose(wire.unpackb(bad.recv(timeout=5))["actions"], expected(3),
                                   rtol=1e-6)
        np.testing.assert_allclose(other.infer(obs_of(4))["actions"], expected(4), rtol=1e-6)


def test_client_raises_the_servers_error_text():
    with serving.serve_in_thread(make_policy()) as server, \
            client_lib.PolicyClient("127.0.0.1", server.port, connect_timeout_s=5) as c:
        with pytest.raises(client_lib.ServerError, match="lacks key"):
            c.infer({"state": np.zeros(4)})
        np.testing.assert_allclose(c.infer(obs_of(1))["actions"], expected(1), rtol=1e-6)


def test_oversized_message_closes_that_connection_with_1009_and_others_are_served():
    with serving.serve_in_thread(make_policy(), max_message_bytes=1024) as server, \
            connect(uri(server), compression=None) as big:
        big.recv(timeout=5)
        big.send(wire.packb({"observation": np.zeros(1024, np.float32)}))
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            big.recv(timeout=5)
        assert closed.value.rcvd.code == 1009
        assert "exceeds limit of 1024 bytes" in closed.value.rcvd.reason
        assert_served(server)
        # Our client knows the limit from the metadata and refuses before sending.
        with client_lib.PolicyClient("127.0.0.1", server.port, connect_timeout_s=5) as c:
            with pytest.raises(ValueError, match="limit of 1024"):
                c.infer({"observation": np.zeros(1024, np.float32)})
            np.testing.assert_allclose(c.infer(obs_of(0))["actions"], expected(0), rtol=1e-6)


def test_client_disconnecting_mid_request_does_not_disturb_the_server():
    model = Model(delay_s=0.2)
    with serving.serve_in_thread(make_policy(model)) as server:
        ws = connect(uri(server), compression=None)
        ws.recv(timeout=5)
        ws.send(wire.packb(obs_of(1)))
        assert model.entered.wait(5)
        ws.close()  # gone while its request runs
        # A half-sent frame on a raw socket, then the socket closes.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
                        b"\r\n\r\n")
            raw.recv(4096)  # handshake response (and maybe the metadata)
            raw.sendall(b"\x82\xfe\x10\x00" + b"\0" * 100)  # masked-bit missing, 4096-byte frame cut
        assert_served(server, 5)


def test_model_failure_sends_an_internal_error_then_closes_with_1011():
    with serving.serve_in_thread(make_policy()) as server, \
            connect(uri(server), compression=None) as ws:
        ws.recv(timeout=5)
        ws.send(wire.packb({"observation": np.full(4, 666.0, np.float32)}))
        error = ws.recv(timeout=5)
        assert isinstance(error, str) and "Internal server error" in error and "exploded" in error
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1011
        assert_served(server)


# ----------------------------------------------------------------- concurrency


def test_concurrent_clients_each_get_their_own_actions_and_requests_are_batched():
    model = Model(delay_s=0.005)
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            with client_lib.PolicyClient("127.0.0.1", server.port, connect_timeout_s=10) as c:
                for step in range(15):
                    value = index * 100 + step
                    out = c.infer(obs_of(value))
                    np.testing.assert_allclose(out["actions"], expected(value), rtol=1e-6)
        except BaseException as error:  # reported below
            errors.append(error)

    with serving.serve_in_thread(make_policy(model), max_batch=8) as server:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert sum(model.batch_sizes) == 8 * 15
    assert max(model.batch_sizes) > 1  # requests that arrived together shared a model call
    assert max(model.batch_sizes) <= 8


def test_running_inference_does_not_stall_handshakes_pings_or_health_checks():
    model = Model()
    model.gate = threading.Event()
    with serving.serve_in_thread(make_policy(model)) as server:
        busy = connect(uri(server), compression=None)
        busy.recv(timeout=5)
        busy.send(wire.packb(obs_of(1)))
        assert model.entered.wait(5)  # the model is now blocked on the worker thread
        start = time.monotonic()
        with connect(uri(server), compression=None, open_timeout=2) as other:
            assert "env_id" in wire.unpackb(other.recv(timeout=2))
            assert other.ping().wait(timeout=2)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=2) as r:
            assert r.status == 200
        assert time.monotonic() - start < 5  # a blocked event loop would wait for the gate (10 s)
        model.gate.set()
        np.testing.assert_allclose(wire.unpackb(busy.recv(timeout=5))["actions"], expected(1),
                                   rtol=1e-6)
        busy.close()


def test_stop_closes_open_connections_with_going_away():
    with serving.serve_in_thread(make_policy()) as server:
        ws = connect(uri(server), compression=None)
        ws.recv(timeout=5)
    with pytest.raises(websockets.ConnectionClosedOK) as closed:
        ws.recv(timeout=5)
    assert closed.value.rcvd.code == 1001
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=2)


# ----------------------------------------------------------------- openpi's client


def _openpi_pack_array(obj):
    """What openpi_client.msgpack_numpy does on the way out (bin keys, dtype.str, shape)."""
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str,
                b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _openpi_unpack_array(obj):
    """openpi_client's decoder: it only looks for the bin keys."""
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def test_openpi_websocket_client_protocol_works_unchanged():
    """The connect flow of openpi_client.WebsocketClientPolicy, byte for byte."""
    key = "openpi-key"
    packer = msgpack.Packer(default=_openpi_pack_array)
    with serving.serve_in_thread(make_policy(), api_key=key) as server:
        conn = connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None,
                       additional_headers={"Authorization": f"Api-Key {key}"})
        metadata = msgpack.unpackb(conn.recv(timeout=5), object_hook=_openpi_unpack_array)
        assert metadata["observation_spec"]["observation"]["shape"] == [4]
        for i in range(3):
            conn.send(packer.pack(obs_of(i)))
            response = conn.recv(timeout=5)
            assert not isinstance(response, str), response
            reply = msgpack.unpackb(response, object_hook=_openpi_unpack_array)
            np.testing.assert_allclose(reply["actions"], expected(i), rtol=1e-6)
            assert "infer_ms" in reply["server_timing"]
        conn.close()


# ----------------------------------------------------------------- misc


def test_server_refuses_nonsense_limits():
    with pytest.raises(ValueError):
        serving.PolicyServer(make_policy(), max_batch=0)
    with pytest.raises(ValueError):
        serving.PolicyServer(make_policy(), max_message_bytes=0)


def test_serving_and_client_import_neither_jax_nor_torch():
    code = ("import sys, common.serving, common.client, common.policy, common.wire; "
            "bad = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _load_script(name: str):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"scripts_{name}"] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_serve_policy_parses_our_spelling_and_openpis():
    serve_policy = _load_script("serve_policy")
    ours = serve_policy.parse(["--policy.dir", "ck/run/10", "--backend", "jax", "--port", "9000"])
    openpi = serve_policy.parse(["policy:checkpoint", "--policy.config", "cartpole_ppo",
                                 "--policy.dir", "ck/run/10", "--port", "9000"])
    assert ours.policy.dir == openpi.policy.dir == "ck/run/10"
    assert ours.port == openpi.port == 9000 and ours.backend == "jax" and openpi.backend is None
    assert openpi.policy.config == "cartpole_ppo" and ours.policy.config is None
    assert ours.host == "127.0.0.1"  # localhost unless asked otherwise
    with pytest.raises(SystemExit):
        serve_policy.parse(["--port", "9000"])  # --policy.dir is required


def test_per_request_debug_lines_and_periodic_summary(caplog):
    caplog.set_level(logging.DEBUG, logger="vibe_rl.serving")
    with serving.serve_in_thread(make_policy(), summary_interval_s=0.2) as server:
        with client_lib.PolicyClient("127.0.0.1", server.port, connect_timeout_s=5) as c:
            for i in range(5):
                c.infer(obs_of(i))
            with pytest.raises(client_lib.ServerError):
                c.infer({"state": np.zeros(4)})
        deadline = time.monotonic() + 5
        while "Served 5 requests" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert caplog.text.count("Request from") == 5
    assert "Served 5 requests" in caplog.text and "1 bad request(s)" in caplog.text
