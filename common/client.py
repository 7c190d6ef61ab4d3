"""The robot-side client of the policy server, and an episode loop that drives a gymnasium env.

`PolicyClient` speaks the protocol of `common.serving` (openpi's): connect —
retrying until the server is up or `connect_timeout_s` passes — read the
metadata frame, then one request/reply per `infer(obs)`. A text frame from the
server is raised as `ServerError` with the server's message; a connection the
server closed is raised with its close code and reason. `run_episodes` works
with anything that has `infer(obs) -> {"actions": ...}`: this client, an
in-process `common.policy.Policy`, or openpi's `WebsocketClientPolicy`.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Protocol

import numpy as np
import websockets
from websockets.frames import CloseCode
from websockets.sync.client import ClientConnection, connect

from common import serving, wire
from common.policy import ACTIONS_KEY, OBSERVATION_KEY


class ServerError(RuntimeError):
    """The server refused a request or the connection; the message is the server's reason."""


class _InferPolicy(Protocol):
    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]: ...


class PolicyClient:
    """A synchronous WebSocket client for one policy server (use as a context manager)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, *,
                 api_key: str | None = None, connect_timeout_s: float = 30.0,
                 retry_interval_s: float = 0.5, request_timeout_s: float | None = None):
        uri = host if host.startswith(("ws://", "wss://")) else f"ws://{host}"
        self.uri = f"{uri}:{port}" if port is not None else uri
        self._api_key = api_key
        self._request_timeout_s = request_timeout_s
        self._ws, self.metadata = self._connect(connect_timeout_s, retry_interval_s)
        self.max_message_bytes = self.metadata.get("server", {}).get("max_message_bytes")

    def _connect(self, timeout_s: float, retry_s: float) -> tuple[ClientConnection, dict]:
        headers = {"Authorization": f"Api-Key {self._api_key}"} if self._api_key else None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ws = connect(self.uri, compression=None, max_size=None, additional_headers=headers,
                             open_timeout=max(deadline - time.monotonic(), 0.1),
                             logger=serving.websockets_logger("client"))
            except websockets.InvalidStatus as error:
                status = error.response.status_code
                reason = error.response.body.decode(errors="replace").strip() if error.response.body else ""
                raise ServerError(f"{self.uri} refused the connection: HTTP {status} {reason}") from None
            except (OSError, TimeoutError, websockets.InvalidHandshake) as error:
                if time.monotonic() + retry_s > deadline:
                    raise ConnectionError(f"No policy server at {self.uri} after {timeout_s:.0f} s "
                                          f"({type(error).__name__}: {error}). Is "
                                          f"scripts/serve_policy.py running there?") from None
                time.sleep(retry_s)
                continue
            try:
                first = ws.recv(timeout=max(deadline - time.monotonic(), 1.0))
            except (websockets.ConnectionClosed, TimeoutError) as error:
                ws.close()
                raise ServerError(f"{self.uri} sent no metadata: {error}") from None
            if isinstance(first, str):
                ws.close()
                raise ServerError(f"{self.uri} sent an error instead of metadata: {first}")
            return ws, wire.unpackb(first)

    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """Send one observation, return the server's reply (actions, timings)."""
        payload = wire.packb(obs)
        if self.max_message_bytes is not None and len(payload) > self.max_message_bytes:
            raise ValueError(f"Request of {len(payload)} bytes exceeds the server's limit of "
                             f"{self.max_message_bytes} (serve_policy.py --max-message-bytes).")
        try:
            self._ws.send(payload)
            reply = self._ws.recv(timeout=self._request_timeout_s)
        except websockets.ConnectionClosed as closed:
            raise ServerError(_closed_reason(closed)) from None
        if isinstance(reply, str):
            raise ServerError(reply)
        return wire.unpackb(reply)

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _closed_reason(closed: websockets.ConnectionClosed) -> str:
    frame = closed.rcvd
    if frame is None:
        return "The server closed the connection without a reason (it may have stopped)."
    if frame.code == CloseCode.MESSAGE_TOO_BIG:
        return (f"The server closed the connection: message too big ({frame.reason}); raise "
                f"serve_policy.py --max-message-bytes or send less.")
    return f"The server closed the connection (code {frame.code}): {frame.reason}"


def to_env_action(actions: Any, action_space: Any) -> Any:
    """A policy's action as the gymnasium env wants it (int for Discrete, array for Box)."""
    import gymnasium  # lazily: only the episode loop needs gymnasium

    actions = np.asarray(actions)
    if isinstance(action_space, gymnasium.spaces.Discrete):
        return int(actions)
    return actions.astype(action_space.dtype).reshape(action_space.shape)


class RecedingHorizonActor:
    """One env action per call from any policy, chunk policies included.

    A chunk policy (metadata `action_spec.type == "chunk"`) is queried once per
    `execute_horizon` steps and the first `execute_horizon` actions of its chunk
    are played in order (pi0's receding horizon); any other policy is queried
    every step. The queue is the state, so call `reset()` at each episode start.
    """

    def __init__(self, policy: _InferPolicy):
        metadata = getattr(policy, "metadata", None) or {}
        self.policy = policy
        self.chunked = (metadata.get("action_spec") or {}).get("type") == "chunk"
        self.execute_horizon = int(metadata.get("execute_horizon") or 1) if self.chunked else 1
        self._pending: list[np.ndarray] = []

    def reset(self) -> None:
        self._pending.clear()

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if not self._pending:
            out = self.policy.infer({OBSERVATION_KEY: np.asarray(obs, np.float32)})
            actions = np.asarray(out[ACTIONS_KEY])
            if self.chunked:
                if actions.ndim < 1 or len(actions) < self.execute_horizon:
                    raise ValueError(f"The chunk policy returned actions of shape {actions.shape}, "
                                     f"fewer than its execute_horizon {self.execute_horizon}.")
                self._pending.extend(actions[:self.execute_horizon])
            else:
                self._pending.append(actions)
        return self._pending.pop(0)


def run_episodes(policy: _InferPolicy, env_id: str, num_episodes: int, seed: int = 0,
                 max_steps: int | None = None) -> list[float]:
    """Episode returns of `policy` on gymnasium `env_id`; episode i resets with seed + i.

    Chunk policies run with a receding horizon (see `RecedingHorizonActor`).
    """
    from common import chunk_eval  # lazily: serving and the client need no environment package

    actor = RecedingHorizonActor(policy)
    env = chunk_eval.make_env(env_id)
    returns = []
    try:
        for episode in range(num_episodes):
            obs, _ = env.reset(seed=seed + episode)
            actor.reset()
            total, steps, done = 0.0, 0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(
                    to_env_action(actor(obs), env.action_space))
                total += float(reward)
                steps += 1
                done = terminated or truncated or (max_steps is not None and steps >= max_steps)
            returns.append(total)
    finally:
        env.close()
    return returns
