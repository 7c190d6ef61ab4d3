"""Orbax checkpoints in the shared run-directory layout.

Each step directory holds three orbax items: `params/` (inference weights),
`train_state/` (the whole runner state: optimizer, update counter, env states,
PRNG key) and `assets/` (plain JSON files such as config.json and
norm_stats.json, written by a small handler so they stay readable without
orbax). Orbax writes a step under a temporary name and renames it when every
item is committed, so a crash mid-save never leaves a step that restores wrong;
async saves run in the background and their errors are re-raised by
`check_for_errors` before the next save.

`CheckpointWriter` is what the training loop uses. orbax's own async mode still
blocks the caller for ~100 ms per save here (directory set-up, waiting for the
previous save), which at CartPole speed stalled training by ~25%. On a single
host the writer instead copies the state to host memory (under a millisecond
for these sizes, and required anyway because the next chunk donates the
device buffers) and runs orbax's synchronous save on one background thread.
A failed background save is re-raised at the next save or at `wait()`, so
training stops loudly instead of running on without checkpoints. With several
hosts it falls back to orbax's async save, which coordinates the processes.
A state larger than `background_max_bytes` (a big replay buffer) is saved
synchronously from the device arrays instead: in the background, the saved
state would have to stay alive beside the next one, doubling peak memory,
while orbax's synchronous write streams it with a few MB of overhead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_args

from common import run_dir as run_dir_lib

PARAMS = run_dir_lib.PARAMS_DIR
TRAIN_STATE = run_dir_lib.TRAIN_STATE_DIR
ASSETS = run_dir_lib.ASSETS_DIR


class AssetsHandler(ocp.AsyncCheckpointHandler):
    """Saves `{filename: json-able}` as one JSON file each in the item directory.

    orbax's JsonCheckpointHandler writes a single file; the assets contract needs
    several named files (config.json, norm_stats.json) in one `assets/` folder.
    """

    async def _write(self, files: Mapping[str, Any], directory: epath.Path) -> None:
        for name, content in files.items():
            (directory / name).write_text(json.dumps(content, indent=2))

    async def async_save(self, directory: epath.Path, args: "AssetsSave"):
        if jax.process_index() != 0:
            return []
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write(dict(args.files), directory), name="assets_save")]

    def save(self, directory: epath.Path, args: "AssetsSave") -> None:
        asyncio.run(self._write(dict(args.files), directory))

    def restore(self, directory: epath.Path, args: "AssetsRestore | None" = None) -> dict[str, Any]:
        return {p.name: json.loads(p.read_text()) for p in directory.iterdir()
                if p.name.endswith(".json")}


@checkpoint_args.register_with_handler(AssetsHandler, for_save=True)
@dataclasses.dataclass
class AssetsSave(ocp.args.CheckpointArgs):
    files: Mapping[str, Any]


@checkpoint_args.register_with_handler(AssetsHandler, for_restore=True)
@dataclasses.dataclass
class AssetsRestore(ocp.args.CheckpointArgs):
    pass


def make_manager(run_dir: pathlib.Path | str, *, max_to_keep: int, keep_period: int | None,
                 async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(
        pathlib.Path(run_dir).absolute(), options=options,
        item_handlers={PARAMS: ocp.StandardCheckpointHandler(),
                       TRAIN_STATE: ocp.StandardCheckpointHandler(),
                       ASSETS: AssetsHandler()})


def save(manager: ocp.CheckpointManager, step: int, *, params: Any, train_state: Any,
         assets: Mapping[str, Any]) -> None:
    """Start saving `step` (in the background when async); raises an earlier save's error."""
    manager.check_for_errors()
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params),
        TRAIN_STATE: ocp.args.StandardSave(train_state),
        ASSETS: AssetsSave(dict(assets)),
    }), force=True)


class CheckpointWriter:
    """Saves steps in order without stalling the training loop (see module docstring)."""

    def __init__(self, run_dir: pathlib.Path | str, *, max_to_keep: int, keep_period: int | None,
                 async_save: bool = True, background_max_bytes: int = 256 * 2**20):
        self._threaded = async_save and jax.process_count() == 1
        self.manager = make_manager(run_dir, max_to_keep=max_to_keep, keep_period=keep_period,
                                    async_save=async_save and not self._threaded)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt") \
            if self._threaded else None
        self._pending: concurrent.futures.Future | None = None
        self._pending_step: int | None = None
        self._background_max_bytes = background_max_bytes

    def _raise_if_failed(self, block: bool) -> None:
        if self._pending is None or not (block or self._pending.done()):
            return
        future, step = self._pending, self._pending_step
        self._pending = None
        error = future.exception()
        if error is not None:
            raise RuntimeError(f"Background save of checkpoint step {step} failed: {error}") from error

    def save(self, step: int, *, params: Any, train_state: Any, assets: Mapping[str, Any]) -> None:
        if not self._threaded:
            save(self.manager, step, params=params, train_state=train_state, assets=assets)
            return
        self._raise_if_failed(block=False)
        nbytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(train_state))
        if nbytes > self._background_max_bytes:
            self._raise_if_failed(block=True)
            save(self.manager, step, params=params, train_state=train_state, assets=assets)
            return
        params, train_state = jax.device_get((params, train_state))
        self._raise_if_failed(block=True)  # one save in flight at most: bounded host memory
        self._pending_step = step
        self._pending = self._pool.submit(save, self.manager, step, params=params,
                                          train_state=train_state, assets=assets)

    def wait(self) -> None:
        """Block until every save is on disk; raise if one failed."""
        self._raise_if_failed(block=True)
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.manager.close()


def restore_train_state(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """Restore the runner state onto `target`'s structure and shardings.

    `target` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` set for the
    current mesh, so a checkpoint written on any device count restores here.
    """
    restored = manager.restore(step, args=ocp.args.Composite(**{
        TRAIN_STATE: ocp.args.StandardRestore(target)}))
    return restored[TRAIN_STATE]


def restore_assets(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return manager.restore(step, args=ocp.args.Composite(**{ASSETS: AssetsRestore()}))[ASSETS]


class _NoItemMetadataWarning(logging.Filter):
    """Drops orbax's "Metadata file does not exist: .../params/_CHECKPOINT_METADATA" warning.

    params/ is one item of a CheckpointManager step; the step's metadata file lives one
    level up, so reading the item on its own (what serving and conversion do) always
    warns, which users read as a broken checkpoint. Real read errors still raise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Metadata file does not exist")
                    and str(record.args and record.args[0]).endswith(
                        f"{PARAMS}/_CHECKPOINT_METADATA"))


_ITEM_METADATA_FILTER = _NoItemMetadataWarning()


def load_params(step_dir: pathlib.Path | str) -> dict[str, Any]:
    """Inference params of a step directory as host numpy arrays, whatever mesh saved them."""
    path = pathlib.Path(step_dir).absolute() / PARAMS
    if not path.is_dir():
        raise FileNotFoundError(f"No params/ in {step_dir}: expected {path}.")
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_ITEM_METADATA_FILTER)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path).item_metadata
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                               sharding=jax.sharding.SingleDeviceSharding(
                                                   jax.local_devices(backend="cpu")[0])),
                metadata)
            restored = checkpointer.restore(path, target)
    except (KeyError, ValueError, OSError, TypeError) as error:  # orbax's own, often cryptic
        from common.policy import CheckpointError

        raise CheckpointError(
            f"Cannot read the JAX params in {path} ({type(error).__name__}: {error}). The "
            f"directory is not a complete orbax checkpoint: pick another step (complete steps "
            f"are listed by common.run_dir.complete_steps) or re-save it.") from None
    finally:
        absl_logger.removeFilter(_ITEM_METADATA_FILTER)
    return jax.tree.map(np.asarray, restored)
