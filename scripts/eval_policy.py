"""Drive a gymnasium environment through a running policy server and report the mean return.

    python scripts/serve_policy.py --policy.dir checkpoints/cartpole_ppo/run1 &
    python scripts/eval_policy.py --num-episodes 10 --seed 0     # env id from the server's metadata

This is the robot-side loop: observation -> server -> action -> env.step. The
env id defaults to the one the policy was trained on (the server's metadata);
gymnasium's CartPole-v1 and Pendulum-v1 observations match gymnax's.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import tyro

from common import client as client_lib
from common import serving


@dataclasses.dataclass(frozen=True)
class Args:
    host: str = "127.0.0.1"
    """Server address (or a ws:// URI)."""
    port: int = serving.DEFAULT_PORT
    """Server port."""
    api_key: str | None = None
    """API key, if the server wants one (default: $VIBE_RL_API_KEY)."""
    env_id: str | None = None
    """gymnasium environment id; default: the env the policy was trained on."""
    num_episodes: int = 10
    """Episodes to run; episode i resets with seed + i."""
    seed: int = 0
    """Seed of the first episode."""
    connect_timeout_s: float = 60.0
    """How long to wait for the server to come up."""
    json: bool = False
    """Print one JSON line (returns, mean) instead of text."""


def main(argv=None) -> None:
    args = tyro.cli(Args, args=argv, prog="eval_policy.py", description=__doc__.split("\n\n")[0])
    with client_lib.PolicyClient(args.host, args.port,
                                 api_key=serving.api_key_from_env(args.api_key),
                                 connect_timeout_s=args.connect_timeout_s) as client:
        env_id = args.env_id or client.metadata.get("env_id")
        if not env_id:
            print("error: the server's metadata names no env_id; pass --env-id.", file=sys.stderr)
            raise SystemExit(2)
        returns = client_lib.run_episodes(client, env_id, args.num_episodes, args.seed)
    mean = float(np.mean(returns))
    if args.json:
        print(json.dumps({"env_id": env_id, "seed": args.seed, "returns": returns,
                          "mean_return": mean}))
    else:
        print(f"{env_id}: mean return {mean:.2f} +- {np.std(returns):.2f} over {len(returns)} "
              f"episodes (seeds {args.seed}..{args.seed + len(returns) - 1}): "
              + ", ".join(f"{r:.1f}" for r in returns))


if __name__ == "__main__":
    main()
