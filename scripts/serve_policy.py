"""Serve a trained checkpoint over WebSocket (openpi's protocol; see common/serving.py).

    python scripts/serve_policy.py --policy.dir checkpoints/cartpole_ppo/run1          # latest step
    python scripts/serve_policy.py --policy.dir checkpoints/cartpole_ppo/run1/2440 --port 8000
    # openpi's spelling works too:
    python scripts/serve_policy.py policy:checkpoint --policy.config cartpole_ppo \
        --policy.dir checkpoints/cartpole_ppo/run1/2440

It listens on 127.0.0.1 unless --host names another address. With --api-key (or
$VIBE_RL_API_KEY, which keeps the key out of the process list) clients must
send `Authorization: Api-Key <key>`. SIGINT/SIGTERM stop it cleanly.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
from typing import Literal, Sequence

import tyro

from common import policy as policy_lib
from common import serving
from common.config import ConfigError
from common.metrics import init_logging


@dataclasses.dataclass(frozen=True)
class PolicyArgs:
    dir: str
    """Checkpoint step directory (<run_dir>/<step>), or a run directory to serve its latest step."""
    config: str | None = None
    """Preset the checkpoint was trained with (openpi's --policy.config); checked against the
    checkpoint's assets/config.json, which is what is actually used."""


@dataclasses.dataclass(frozen=True)
class Args:
    policy: PolicyArgs
    """Which checkpoint to serve."""
    backend: Literal["jax", "torch"] | None = None
    """Backend to serve with; default: the one that wrote the checkpoint (the other one converts it
    on the fly with convert/, as scripts/convert_checkpoint.py would)."""
    host: str = serving.DEFAULT_HOST
    """Address to listen on. Only localhost by default; 0.0.0.0 exposes it to the network."""
    port: int = serving.DEFAULT_PORT
    """TCP port (0 picks a free one)."""
    api_key: str | None = None
    """Require `Authorization: Api-Key <key>` from clients (default: $VIBE_RL_API_KEY, if set)."""
    max_message_bytes: int = serving.DEFAULT_MAX_MESSAGE_BYTES
    """Largest request accepted; a larger one closes its connection with code 1009."""
    max_batch: int = serving.DEFAULT_MAX_BATCH
    """Most concurrent requests run as one batched inference call."""
    deterministic: bool = True
    """Greedy (Discrete) / mean (Box) actions; --no-deterministic samples them."""
    seed: int = 0
    """Seed of the action sampling stream (with --no-deterministic)."""
    summary_interval_s: float = 60.0
    """Seconds between latency summary lines in the log."""
    log_level: Literal["debug", "info", "warning"] = "info"
    """debug logs every request's latency."""


def parse(argv: Sequence[str] | None = None) -> Args:
    argv = list(sys.argv[1:] if argv is None else argv)
    # openpi selects the policy source with a subcommand; a checkpoint is the only source here.
    if "policy:default" in argv:
        print("error: policy:default is not supported: vibe-rl serves a checkpoint. Use "
              "policy:checkpoint --policy.dir <checkpoint> (or just --policy.dir).", file=sys.stderr)
        raise SystemExit(2)
    argv = [arg for arg in argv if arg != "policy:checkpoint"]
    return tyro.cli(Args, args=argv, prog="serve_policy.py",
                    description=__doc__.split("\n\n")[0])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    init_logging(getattr(logging, args.log_level.upper()))
    # websockets logs every handshake (health checks included) at INFO; serving.py logs what matters.
    logging.getLogger("vibe_rl.websockets").setLevel(logging.WARNING)
    log = logging.getLogger("vibe_rl")
    try:
        if args.max_message_bytes <= 0 or args.max_batch <= 0:
            raise ConfigError("--max-message-bytes and --max-batch must be positive.")
        step_dir = policy_lib.resolve_step_dir(args.policy.dir)
        if args.policy.config is not None:
            trained = policy_lib.load_config(step_dir).name
            if trained != args.policy.config:
                raise ConfigError(
                    f"--policy.config {args.policy.config!r} but {step_dir} was trained with preset "
                    f"{trained!r} (assets/config.json). Drop --policy.config or pick that checkpoint.")
        if (args.backend or policy_lib.detect_backend(step_dir)) == "jax":
            from vibe_rl_jax.policy import use_inline_cpu_execution

            use_inline_cpu_execution()  # before JAX starts: one small call per request
        policy = policy_lib.create_trained_policy(
            step_dir, args.backend, deterministic=args.deterministic, seed=args.seed,
            warmup_batch=args.max_batch)
        server = serving.PolicyServer(
            policy, host=args.host, port=args.port,
            api_key=serving.api_key_from_env(args.api_key),
            max_message_bytes=args.max_message_bytes, max_batch=args.max_batch,
            summary_interval_s=args.summary_interval_s)
    except (policy_lib.CheckpointError, policy_lib.BackendUnavailableError, ConfigError) as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    # Everything loaded so far (the framework, the model) lives as long as the process. Freezing
    # it keeps the cyclic GC from scanning it: with JAX loaded a full collection otherwise stalls
    # the server ~0.3 s (measured) at random requests.
    gc.collect()
    gc.freeze()
    server.serve_forever()


if __name__ == "__main__":
    main()
