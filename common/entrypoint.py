"""What every `scripts/train*.py` does after parsing: pick the backend, run, report errors.

Errors a user can fix (bad config values, run-directory flags) end the program
with one clear line and exit status 2, not a traceback.
"""

from __future__ import annotations

import logging
import sys

from common.config import ConfigError, TrainConfig
from common.metrics import init_logging
from common.run_dir import RunDirError


def backend_module(config: TrainConfig):
    """The backend's train module, imported only when chosen (a backend never imports the other)."""
    # Imported here, not at the top: only the chosen backend (and its framework) is loaded.
    if config.backend == "jax":
        from vibe_rl_jax import train as module
    elif config.backend == "torch":
        from vibe_rl_torch import train as module
    else:
        raise ConfigError(f"--backend {config.backend!r}: unknown backend; use jax or torch.")
    return module


def run(config: TrainConfig):
    init_logging()
    try:
        module = backend_module(config)
        module.validate(config)
        return module.train(config)
    except (ConfigError, RunDirError) as error:
        logging.getLogger("vibe_rl").error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
