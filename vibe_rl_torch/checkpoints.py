"""Torch checkpoints in the shared run-directory layout (DESIGN.md, contract 2).

    <run_dir>/<step>/params/model.safetensors   canonical names (+ obs_normalizer/{mean,var})
    <run_dir>/<step>/train_state/trainer.pt     optimizer, LR scheduler, update step, world size
                                                (DQN/SAC: + target networks, critics, log_alpha)
    <run_dir>/<step>/train_state/rank_<r>.pkl   per rank: envs (pickled gymnasium state),
                                                current obs, episode counters, obs statistics,
                                                action/shuffle generators, torch/numpy/python RNG
                                                (DQN/SAC: + replay cursor, sampling generator)
    <run_dir>/<step>/train_state/replay_rank_<r>/   DQN/SAC: rank r's replay buffer, one .npy per
                                                field (vibe_rl_torch.replay)
    <run_dir>/<step>/assets/config.json         the resolved config

A step is written under `<step>.tmp-<uuid>`, every file fsynced, then renamed
to `<step>` in one `os.rename`: a kill at any moment leaves either the complete
step or a temp dir that `common.run_dir.complete_steps` ignores and
`remove_stale_temp_dirs` deletes. Retention is `common.run_dir.steps_to_keep`,
the rule orbax applies on the JAX side.

The caller serialises everything to bytes before `CheckpointWriter.save`
returns, so the background write never races the training loop; a failed
background write is re-raised at the next save (or at `wait`), stopping
training loudly. A file may instead be given as a writer (a function that
writes into the open file): that is how a large replay buffer goes to disk
straight from its tensors, without a serialised second copy. Writers read live
state, so a step that has one is written before `save` returns.

`rank_<r>.pkl` holds pickled Python objects (the gymnasium envs): load
checkpoints only from run directories you trust, as with any pickle.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import pathlib
import pickle
import shutil
import uuid
from typing import Any, Callable, Mapping, Union

import numpy as np
import safetensors.numpy
import torch

from common import run_dir as run_dir_lib

MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"


# A file's content: bytes, or a writer that streams it into the open (binary) file.
FileContent = Union[bytes, Callable[[Any], None]]


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pkl"


# ------------------------------------------------------------------ serialisation
def step_files(*, params: Mapping[str, np.ndarray], trainer_state: Mapping[str, Any],
               rank_states: list[bytes], config: Mapping[str, Any]) -> dict[str, bytes]:
    """The files of one step directory, `{relative path: content}`."""
    buffer = io.BytesIO()
    torch.save(dict(trainer_state), buffer)
    files = {
        f"{run_dir_lib.PARAMS_DIR}/{MODEL_FILE}": safetensors.numpy.save(
            {k: np.ascontiguousarray(v) for k, v in params.items()},
            metadata={"format": "vibe-rl canonical", "writer": "vibe_rl_torch"}),
        f"{run_dir_lib.TRAIN_STATE_DIR}/{TRAINER_FILE}": buffer.getvalue(),
        f"{run_dir_lib.ASSETS_DIR}/{run_dir_lib.CONFIG_FILE}": json.dumps(config, indent=2).encode(),
    }
    for rank, blob in enumerate(rank_states):
        files[f"{run_dir_lib.TRAIN_STATE_DIR}/{rank_file(rank)}"] = blob
    return files


def load_params(step_dir: pathlib.Path | str) -> dict[str, np.ndarray]:
    """Canonical inference params of a step directory (numpy)."""
    path = pathlib.Path(step_dir) / run_dir_lib.PARAMS_DIR / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"No Torch-backend params in {step_dir}: expected {path}.")
    return safetensors.numpy.load_file(str(path))


def load_trainer_state(step_dir: pathlib.Path | str) -> dict[str, Any]:
    path = pathlib.Path(step_dir) / run_dir_lib.TRAIN_STATE_DIR / TRAINER_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No Torch-backend train state in {step_dir}: expected {path}. Was this run trained "
            f"with --backend jax? Resume it with the backend that wrote it.")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_rank_state(step_dir: pathlib.Path | str, rank: int) -> dict[str, Any] | None:
    """Rank `rank`'s env/RNG state, or None when the saving run had fewer ranks."""
    path = pathlib.Path(step_dir) / run_dir_lib.TRAIN_STATE_DIR / rank_file(rank)
    if not path.is_file():
        return None
    return pickle.loads(path.read_bytes())


def load_config(step_dir: pathlib.Path | str) -> dict[str, Any]:
    path = pathlib.Path(step_dir) / run_dir_lib.ASSETS_DIR / run_dir_lib.CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------ atomic write
def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_step(run_dir: pathlib.Path | str, step: int,
               files: Mapping[str, FileContent]) -> pathlib.Path:
    """Write one step directory atomically; returns its path."""
    run_dir = pathlib.Path(run_dir)
    final = run_dir_lib.step_dir(run_dir, step)
    tmp = run_dir / f"{step}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    for rel, data in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    for sub in sorted({p.parent for p in tmp.rglob("*") if p.is_file()} - {tmp}, reverse=True):
        _fsync_dir(sub)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. a resumed run that re-reaches it): swap it out
        stale = run_dir / f"{step}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(run_dir)
    return final


def prune(run_dir: pathlib.Path | str, max_to_keep: int, keep_period: int | None) -> list[int]:
    """Delete complete steps the retention rule does not keep; returns the deleted steps."""
    steps = run_dir_lib.complete_steps(run_dir)
    keep = run_dir_lib.steps_to_keep(steps, max_to_keep, keep_period)
    deleted = [s for s in steps if s not in keep]
    for step in deleted:
        # Rename first so a half-deleted step never looks complete.
        doomed = pathlib.Path(run_dir) / f"{step}.del-{uuid.uuid4().hex[:8]}"
        os.rename(run_dir_lib.step_dir(run_dir, step), doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return deleted


class CheckpointWriter:
    """Writes step directories (in a background thread when `async_save`) and applies retention."""

    def __init__(self, run_dir: pathlib.Path | str, *, max_to_keep: int, keep_period: int | None,
                 async_save: bool = True):
        self.run_dir = pathlib.Path(run_dir)
        self.max_to_keep = max_to_keep
        self.keep_period = keep_period
        self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
                      if async_save else None)
        self._pending: concurrent.futures.Future | None = None

    def _write(self, step: int, files: Mapping[str, FileContent]) -> None:
        write_step(self.run_dir, step, files)
        prune(self.run_dir, self.max_to_keep, self.keep_period)

    def save(self, step: int, files: Mapping[str, FileContent]) -> None:
        """Start writing `step`; first re-raises the error of an earlier background save.

        With a writer among the files the step is written now, in this thread.
        """
        self.check_for_errors()
        if self._pool is None or any(callable(data) for data in files.values()):
            self._write(step, files)
        else:
            self._pending = self._pool.submit(self._write, step, dict(files))

    def check_for_errors(self) -> None:
        """Wait for the previous save and raise its error, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def wait(self) -> None:
        self.check_for_errors()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
