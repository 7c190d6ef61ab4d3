"""What the benchmark scripts share: run a vibe-rl preset and summarise it."""

from __future__ import annotations

import logging
import time

import numpy as np

from common import presets
from common.metrics import init_logging


def quiet_logging() -> None:
    init_logging()
    logging.getLogger("vibe_rl").setLevel(logging.WARNING)


def run_vibe(preset: str, base_dir: str, name: str, seed: int, backend: str = "jax",
             threshold: float | None = None, last: int = 3, **changes) -> dict:
    """Train `preset` on `backend`; speed excludes compile time (reported apart)."""
    cfg = presets.replace(presets.get_preset(preset), exp_name=name, seed=seed, backend=backend,
                          checkpoint_base_dir=base_dir, progress_bar=False, overwrite=True,
                          **changes)
    if backend == "jax":
        from vibe_rl_jax import train as backend_train
    else:
        from vibe_rl_torch import train as backend_train
    start = time.perf_counter()
    result = backend_train.train(cfg)
    wall = time.perf_counter() - start
    steps = result.final_step * cfg.steps_per_update
    returns = [h["train/episode_return"] for h in result.history]
    train_s = getattr(result, "train_seconds", wall)
    reached = None
    if threshold is not None:
        reached = next((h.get("time") for h in result.history
                        if h["train/episode_return"] >= threshold), None)
    return {"compile_s": getattr(result, "compile_seconds", 0.0), "train_s": train_s,
            "wall_s": wall, "sps": steps / train_s, "steps": steps,
            "final_return": float(np.nanmean(returns[-last:])), "time_to_threshold_s": reached}


def print_row(name: str, r: dict) -> None:
    extra = f" compile {r['compile_s']:.1f} s |" if r.get("compile_s") else ""
    reach = (f" threshold after {r['time_to_threshold_s']:.1f} s |"
             if r.get("time_to_threshold_s") is not None else "")
    print(f"{name:<34}|{extra} train {r['train_s']:.1f} s | {r['sps']:>9,.0f} env steps/s |"
          f"{reach} final return {r['final_return']:.1f}")
