"""Metric names, the TensorBoard/wandb writer and the console progress line.

Both backends log through `MetricWriter` with the tags below, so one
TensorBoard over `checkpoints/` compares a JAX and a Torch run of the same
preset. TensorBoard files are written with tensorboardX, which needs neither
framework (this package must import neither).
"""

from __future__ import annotations

import logging
import math
import pathlib
import sys
import time
from typing import Any, Mapping

from common import run_dir as run_dir_lib

EPISODE_RETURN = "train/episode_return"
EPISODE_LENGTH = "train/episode_length"
LEARNING_RATE = "train/learning_rate"
SPS = "perf/sps"
DATA_WAIT_FRAC = "perf/data_wait_frac"
"""Share of the training loop's wall time spent waiting for the next batch (imitation)."""
EVAL_RETURN = "eval/episode_return"
EVAL_SUCCESS_RATE = "eval/success_rate"
LOSS_PREFIX = "train/loss/"


def loss_tag(name: str) -> str:
    return LOSS_PREFIX + name


class ConsoleFormatter(logging.Formatter):
    """openpi-style lines: `I 12:03:04.123 [train.py:42] message`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return (f"{record.levelname[:1]} {stamp}.{int(record.msecs):03d} "
                f"[{record.filename}:{record.lineno}] {record.getMessage()}"
                + (("\n" + self.formatException(record.exc_info)) if record.exc_info else ""))


def init_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # absl (orbax, jax) logs through its own handler otherwise.
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def format_progress(step: int, total: int, sps: float, episode_return: float | None, *,
                    step_name: str = "update", rate_unit: str = "steps/s",
                    value_name: str = "return") -> str:
    """`[####    ]  40.0% update 400/1000 | 12,345 steps/s | return 99.5` (RL);
    imitation runs say `step ... samples/s | loss ...`."""
    done = step / max(total, 1)
    bar = "#" * int(done * 20)
    value = ("n/a" if episode_return is None or math.isnan(episode_return)
             else f"{episode_return:.4g}" if value_name == "loss" else f"{episode_return:.1f}")
    return (f"[{bar:<20}] {100 * done:5.1f}% {step_name} {step}/{total} | {sps:,.0f} {rate_unit} | "
            f"{value_name} {value}")


class MetricWriter:
    """Writes scalars to TensorBoard (and wandb), prints a progress line.

    Only the process that owns the run directory (rank 0) should create one
    with `active=True`; other ranks get a writer that does nothing.
    """

    def __init__(self, run_dir: pathlib.Path | str, *, config: Mapping[str, Any] | None = None,
                 resuming: bool = False, wandb_enabled: bool = False, progress: bool = True,
                 active: bool = True):
        self._active = active
        self._progress = progress and active
        self._tb = None
        self._wandb = None
        if not active:
            return
        from tensorboardX import SummaryWriter

        run_dir = pathlib.Path(run_dir)
        self._tb = SummaryWriter(str(run_dir / run_dir_lib.TB_DIR), flush_secs=10)
        if wandb_enabled:
            self._wandb = _init_wandb(run_dir, config or {}, resuming)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._active:
            return
        for tag, value in scalars.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            self._tb.add_scalar(tag, float(value), step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in scalars.items() if v is not None}, step=step)

    def progress(self, step: int, total: int, sps: float, episode_return: float | None,
                 **labels: str) -> None:
        if self._progress:
            logging.getLogger("vibe_rl").info(
                format_progress(step, total, sps, episode_return, **labels))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _init_wandb(run_dir: pathlib.Path, config: Mapping[str, Any], resuming: bool):
    try:
        import wandb
    except ImportError as error:
        raise RuntimeError("--wandb-enabled needs wandb: pip install 'vibe-rl[wandb]'.") from error
    id_file = run_dir / run_dir_lib.WANDB_ID_FILE
    if resuming and id_file.exists():
        run = wandb.init(id=id_file.read_text().strip(), resume="must", dir=str(run_dir),
                         config=dict(config))
    else:
        run = wandb.init(name=run_dir.name, project=run_dir.parent.name, dir=str(run_dir),
                         config=dict(config))
        id_file.write_text(run.id)
    return run
