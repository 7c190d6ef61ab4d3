"""The run-directory contract shared by both backends (DESIGN.md, contract 2).

    checkpoints/<preset>/<exp_name>/
        <step>/params/        inference weights only
        <step>/train_state/   everything resume needs
        <step>/assets/        config.json (resolved config), norm_stats.json
        tb/                   TensorBoard event files
        wandb_id.txt          when wandb is on

A step directory exists only once complete: writers build it under a temporary
name and rename it into place, so a crash mid-save leaves either the finished
step or a temp dir that `complete_steps` ignores and `remove_stale_temp_dirs`
deletes.
"""

from __future__ import annotations

import pathlib
import shutil

TB_DIR = "tb"
WANDB_ID_FILE = "wandb_id.txt"
PARAMS_DIR = "params"
TRAIN_STATE_DIR = "train_state"
ASSETS_DIR = "assets"
CONFIG_FILE = "config.json"
NORM_STATS_FILE = "norm_stats.json"
PROVENANCE_FILE = "provenance.json"
"""In a converted checkpoint's assets/: source path, backend, step, time, params digest."""


class RunDirError(RuntimeError):
    """The run directory is not in the state the flags ask for."""


def complete_steps(run_dir: pathlib.Path | str) -> list[int]:
    """Steps whose directory is complete (named by the bare step number), ascending."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(int(p.name) for p in run_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step(run_dir: pathlib.Path | str) -> int | None:
    steps = complete_steps(run_dir)
    return steps[-1] if steps else None


def remove_stale_temp_dirs(run_dir: pathlib.Path | str) -> list[pathlib.Path]:
    """Delete leftovers of interrupted saves (anything step-like that is not a bare number)."""
    run_dir = pathlib.Path(run_dir)
    removed = []
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.is_dir() and path.name[:1].isdigit() and not path.name.isdigit():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def steps_to_keep(steps: list[int], max_to_keep: int, keep_period: int | None) -> set[int]:
    """Retention rule (the one orbax's CheckpointManager applies; tests hold both to it).

    The `max_to_keep` newest steps are kept, and so is every step that is a
    multiple of `keep_period`.
    """
    keep = set(sorted(steps)[-max_to_keep:]) if max_to_keep else set(steps)
    if keep_period:
        keep |= {s for s in steps if s % keep_period == 0}
    return keep


def initialize_run_dir(run_dir: pathlib.Path | str, *, resume: bool, overwrite: bool) -> bool:
    """Prepare the run directory for a fresh, resumed or overwritten run.

    Returns True when training should resume from the latest checkpoint.
    An existing directory with neither flag is an error that says which flag to pass.
    """
    run_dir = pathlib.Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite are exclusive: pass one of them, not both.")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if overwrite:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        return False
    if resume:
        remove_stale_temp_dirs(run_dir)
        if latest_step(run_dir) is None:
            raise RunDirError(
                f"--resume: no complete checkpoint in {run_dir}. Drop --resume to start a new run "
                f"there (or pass --overwrite if the directory holds leftovers).")
        return True
    if exists:
        raise RunDirError(
            f"Run directory {run_dir} already exists. Pass --resume to continue its latest "
            f"checkpoint, or --overwrite to delete it and start over (or pick another --exp-name).")
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def step_dir(run_dir: pathlib.Path | str, step: int) -> pathlib.Path:
    return pathlib.Path(run_dir) / str(step)
