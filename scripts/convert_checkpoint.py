"""Convert a checkpoint to the other backend (JAX <-> Torch), ready to serve.

    python scripts/convert_checkpoint.py --checkpoint-dir checkpoints/cartpole_ppo/run1/2440 \
        --to torch --output checkpoints/cartpole_ppo/run1_torch
    python scripts/serve_policy.py --policy.dir checkpoints/cartpole_ppo/run1_torch --backend torch

Writes `<output>/<step>/` with params/ in the target backend's format, the
source's assets/ (config.json with the backend switched, norm_stats.json, ...)
and assets/provenance.json (source path, backend, step, time, params digest).
Loading is strict: params that do not match the network the checkpoint's
config describes are one error listing every missing, unexpected and
mis-shaped key. By default both backends then load their checkpoint and must
agree on the actions for random observations (--no-verify skips this). The
result has no train_state/: it is for serving and evaluation, not for resuming.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Literal, Sequence

import tyro

from common import policy as policy_lib
from common.config import ConfigError
from common.metrics import init_logging


@dataclasses.dataclass(frozen=True)
class Args:
    checkpoint_dir: str
    """Step directory (<run_dir>/<step>) to convert, or a run directory (its latest step)."""
    to: Literal["jax", "torch"]
    """Backend the result is for."""
    output: str
    """Run directory to write into: the result is <output>/<step>."""
    overwrite: bool = False
    """Replace <output>/<step> if it exists."""
    verify: bool = True
    """Load source and result with their backends and compare actions on random observations."""


def main(argv: Sequence[str] | None = None) -> None:
    args = tyro.cli(Args, args=argv, prog="convert_checkpoint.py",
                    description=__doc__.split("\n\n")[0])
    init_logging(logging.INFO)
    from convert.canonical import CanonicalParamsError
    from convert.checkpoint import ConversionError, convert_checkpoint

    try:
        result = convert_checkpoint(args.checkpoint_dir, args.to, args.output,
                                    overwrite=args.overwrite, check=args.verify)
    except (ConversionError, CanonicalParamsError, policy_lib.CheckpointError,
            policy_lib.BackendUnavailableError, ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Wrote {result.step_dir}: a {result.target_backend} checkpoint converted from "
          f"{result.source_backend} (params sha256 {result.params_sha256[:16]}...).")
    if result.verified:
        print(f"Verified: {result.verified}.")
    elif args.verify:
        print("Not verified: the other backend cannot load policies here (see the warning).")
    print(f"Serve it: python scripts/serve_policy.py --policy.dir {result.step_dir}")


if __name__ == "__main__":
    main()
