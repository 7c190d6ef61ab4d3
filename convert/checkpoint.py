"""Convert a checkpoint step to the other backend: native params, copied assets, provenance.

    <output>/<step>/params/        orbax (to jax) or model.safetensors (to torch), canonical names
    <output>/<step>/assets/        every file of the source's assets/ (norm_stats.json, ...),
                                   config.json with `backend` switched, provenance.json
    (no train_state/: optimizer and env state do not convert; the result serves, it does not resume)

The source params are read in their native format, checked strictly against
the layout `convert.families` declares for the checkpoint's config and env
(one error lists every missing, unexpected or mis-shaped key), and written
unchanged: the conversion is lossless, so the canonical digest recorded in
provenance.json is the same for source and result, and JAX -> Torch -> JAX
gives back the same arrays bit for bit. The step is built under a temporary
name and renamed into place, like every other step directory. With `verify`,
both backends load their checkpoint and must pick the same actions for
random observations before the result is moved into place (flow policies:
the same chunks from the same noise, see `verify_flow`). A flow checkpoint's
state and action sizes come from its params (its config names no env).

Backends are imported only here, inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import os
import pathlib
import shutil
import uuid
from typing import Any

import numpy as np

from common import config as config_lib
from common import policy as policy_lib
from common import run_dir as run_dir_lib
from convert import canonical, families
from convert.families import Spaces
from convert.layout import Layout

logger = logging.getLogger("vibe_rl")

BACKENDS = ("jax", "torch")
TORCH_PARAMS_FILE = policy_lib.TORCH_PARAMS_FILE
_ORBAX_MARKERS = {"commit_success.txt"}


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted (or the result would not behave the same)."""


@dataclasses.dataclass(frozen=True)
class Result:
    step_dir: pathlib.Path
    source_backend: str
    target_backend: str
    params_sha256: str
    verified: str | None
    """How the result was checked against the source, or None when not checked."""


# ------------------------------------------------------------------ reading and writing params
def env_spaces(backend: str, config: config_lib.TrainConfig) -> Spaces:
    """The env spaces the network layout depends on, from the backend that trained on the env."""
    return importlib.import_module(f"vibe_rl_{backend}.policy").spaces(config)


def _native_shapes(step_dir: pathlib.Path, backend: str) -> dict[str, tuple[int, ...]]:
    """Canonical `{name: shape}` of a step's model params, before any layout is known."""
    if backend == "jax":
        from vibe_rl_jax import checkpoints

        model = checkpoints.load_params(step_dir).get(canonical.JAX_MODEL_KEY, {})
        return {k: tuple(np.shape(v)) for k, v in canonical.flatten(model).items()}
    flat = canonical.load_safetensors(step_dir / run_dir_lib.PARAMS_DIR / TORCH_PARAMS_FILE)
    return {k: tuple(np.shape(v)) for k, v in flat.items()}


def flow_spaces(step_dir: pathlib.Path, backend: str, config: config_lib.TrainConfig) -> Spaces:
    """State and action sizes of a flow checkpoint: off its params, as the flow loaders read them.

    An imitation config names a dataset, not an env to build, so the sizes are
    read off `obs_encoder/dense_0` and `action_expert/head`, then held to the
    step's assets/norm_stats.json (when the config normalises with it).
    """
    try:
        state_dim, action_dim = families.flow_dims(_native_shapes(step_dir, backend),
                                                   config.data.action_horizon)
    except canonical.CanonicalParamsError as error:
        raise ConversionError(f"The params in {step_dir}: {error}") from None
    if config.data.use_norm_stats:
        stats = policy_lib.load_norm_stats(step_dir, config.name)
        for key, dim in (("state", state_dim), ("actions", action_dim)):
            have = int(np.shape(stats[key].mean)[0]) if key in stats else None
            if have != dim:
                raise ConversionError(f"{step_dir}/assets/norm_stats.json: {key!r} has {have} "
                                      f"dims, the params {dim}.")
    return Spaces((state_dim,), action_dim, True)


def checkpoint_spaces(step_dir: pathlib.Path, backend: str,
                      config: config_lib.TrainConfig) -> Spaces:
    """What the checkpoint's network layout depends on besides its config."""
    if config.algo.kind == "flow":
        return flow_spaces(step_dir, backend, config)
    return env_spaces(backend, config)


def read_params(step_dir: pathlib.Path, backend: str, layout: Layout) -> dict[str, np.ndarray]:
    """A step's params as the canonical dict, checked strictly against `layout`."""
    what = f"The params in {step_dir} do not match the network its assets/config.json describes"
    if backend == "jax":
        from vibe_rl_jax import checkpoints

        return canonical.from_jax_checkpoint(checkpoints.load_params(step_dir), layout, what)
    flat = canonical.load_safetensors(step_dir / run_dir_lib.PARAMS_DIR / TORCH_PARAMS_FILE)
    canonical.check(flat, layout, what)
    return flat


def write_params(params_dir: pathlib.Path, backend: str, flat: dict[str, np.ndarray],
                 layout: Layout, metadata: dict[str, str]) -> None:
    """Write the canonical dict as `backend`'s params/ item."""
    if backend == "jax":
        import orbax.checkpoint as ocp

        # The same handler the JAX CheckpointManager uses for its params item, so
        # vibe_rl_jax.checkpoints.load_params reads it like a trained step.
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(params_dir.absolute(), canonical.to_jax_checkpoint(flat, layout))
        return
    params_dir.mkdir(parents=True)
    canonical.check(flat, layout)
    canonical.save_safetensors(params_dir / TORCH_PARAMS_FILE, flat, metadata)


# ------------------------------------------------------------------ verification
def verify(source: pathlib.Path, source_backend: str, target: pathlib.Path, target_backend: str,
           spaces: Spaces, num_obs: int = 256) -> str:
    """Load both checkpoints with their own backend; actions for random inputs must agree.

    Discrete actions must be equal; Box actions within 1e-5. Returns a summary line.
    """
    rng = np.random.default_rng(0)
    obs = (rng.standard_normal((num_obs, *spaces.obs_shape)) * 2).astype(np.float32)
    actions = {}
    for backend, step_dir in ((source_backend, source), (target_backend, target)):
        policy = policy_lib.create_trained_policy(step_dir, backend, warmup_batch=1)
        actions[backend] = np.asarray(policy.infer_batch({policy_lib.OBSERVATION_KEY: obs})[
            policy_lib.ACTIONS_KEY])
    a, b = actions[source_backend], actions[target_backend]
    if a.shape != b.shape:
        raise ConversionError(f"Converted policy returns actions of shape {b.shape}, the source "
                              f"{a.shape}.")
    if spaces.continuous:
        diff = float(np.max(np.abs(a.astype(np.float64) - b)))
        if not diff <= 1e-5:
            raise ConversionError(f"Converted policy's mean actions differ from the source's by up "
                                  f"to {diff:.3g} (> 1e-5) on random observations.")
        return f"mean actions of {num_obs} random observations agree (max abs diff {diff:.2g})"
    same = int(np.sum(a == b))
    if same != num_obs:
        raise ConversionError(f"Converted policy picks another greedy action than the source for "
                              f"{num_obs - same} of {num_obs} random observations.")
    return f"greedy actions of {num_obs} random observations are identical"


def _flow_chunks(backend: str, flat: dict[str, np.ndarray], config: config_lib.TrainConfig,
                 spaces: Spaces, state: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Normalised chunks of `backend`'s flow model with these params, from the given noise."""
    algo, horizon = config.algo, config.data.action_horizon
    if backend == "jax":
        from vibe_rl_jax import flow

        model = flow.make_model(algo, action_dim=spaces.action_dim, horizon=horizon)
        chunk = flow.sample_chunk(canonical.unflatten(flat), model, {flow.STATE_KEY: state}, None,
                                  algo.num_integration_steps, noise=noise)
        return np.asarray(chunk)
    import torch

    from vibe_rl_torch import flow, networks

    model = flow.make_model(algo, state_dim=spaces.obs_dim, action_dim=spaces.action_dim,
                            horizon=horizon)
    networks.load_canonical(model, flat)
    model.eval()
    with torch.inference_mode():
        return flow.sample_chunk(model, {flow.STATE_KEY: torch.from_numpy(state)},
                                 algo.num_integration_steps,
                                 noise=torch.from_numpy(noise)).numpy()


def verify_flow(source: pathlib.Path, source_backend: str, target: pathlib.Path,
                target_backend: str, config: config_lib.TrainConfig, spaces: Spaces,
                layout: Layout, num_obs: int = 64, atol: float = 1e-4) -> str:
    """Both backends integrate the same noise for the same random states; chunks must agree.

    The two backends draw sampling noise from different generators, so served
    chunks of the same seed differ by design; this check feeds both the same
    noise (regression mode needs none) and compares the normalised chunks
    after all `num_integration_steps` Euler steps. The assets (norm stats) are
    copied byte for byte, so the unnormalised chunks then agree as well.
    """
    rng = np.random.default_rng(0)
    state = rng.standard_normal((num_obs, spaces.obs_dim)).astype(np.float32)
    noise = rng.standard_normal((num_obs, config.data.action_horizon,
                                 spaces.action_dim)).astype(np.float32)
    chunks = {backend: _flow_chunks(backend, read_params(step_dir, backend, layout), config,
                                    spaces, state, noise)
              for backend, step_dir in ((source_backend, source), (target_backend, target))}
    diff = float(np.max(np.abs(chunks[source_backend].astype(np.float64)
                               - chunks[target_backend])))
    what = ("predicted chunks" if config.algo.mode == "regression" else
            f"chunks sampled from the same noise ({config.algo.num_integration_steps} Euler steps)")
    if not diff <= atol:
        raise ConversionError(f"Converted policy's {what} differ from the source's by up to "
                              f"{diff:.3g} (> {atol}) on random states.")
    return f"{what} of {num_obs} random states agree (max abs diff {diff:.2g})"


# ------------------------------------------------------------------ the conversion
def _provenance(step_dir: pathlib.Path, source_backend: str, target_backend: str,
                config: config_lib.TrainConfig, digest: str) -> dict[str, Any]:
    previous = step_dir / run_dir_lib.ASSETS_DIR / run_dir_lib.PROVENANCE_FILE
    return {
        "converted_by": "scripts/convert_checkpoint.py",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "path": str(step_dir.absolute()),
            "backend": source_backend,
            "step": int(step_dir.name) if step_dir.name.isdigit() else None,
            "preset": config.name,
            "exp_name": config.exp_name,
        },
        "target_backend": target_backend,
        "params_sha256": digest,
        "params_sha256_note": "sha256 of the canonical params (names, dtypes, shapes, bytes); "
                              "the same for the source and this conversion",
        "previous": json.loads(previous.read_text()) if previous.is_file() else None,
    }


def _write_assets(source: pathlib.Path, target: pathlib.Path, backend: str,
                  provenance: dict[str, Any]) -> None:
    src, dst = source / run_dir_lib.ASSETS_DIR, target / run_dir_lib.ASSETS_DIR
    # norm_stats.json and anything else training put there, but not orbax's own markers
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in _ORBAX_MARKERS
                                                       or n.startswith("_")])
    config_path = dst / run_dir_lib.CONFIG_FILE
    data = json.loads(config_path.read_text())
    data["backend"] = backend
    config_lib.from_dict(json.loads(json.dumps(data)))  # still a valid config
    config_path.write_text(json.dumps(data, indent=2))
    (dst / run_dir_lib.PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))


def convert_checkpoint(checkpoint_dir: pathlib.Path | str, to: str, output: pathlib.Path | str, *,
                       overwrite: bool = False, check: bool = True) -> Result:
    """Write `checkpoint_dir` (a step, or a run dir's latest step) as `<output>/<step>` for `to`."""
    if to not in BACKENDS:
        raise ConversionError(f"--to must be one of {', '.join(BACKENDS)}, got {to!r}.")
    step_dir = policy_lib.resolve_step_dir(checkpoint_dir)
    source_backend = policy_lib.detect_backend(step_dir)
    if source_backend == to:
        raise ConversionError(f"{step_dir} is already a {to} checkpoint; serve it as it is.")
    config = policy_lib.load_config(step_dir)
    output = pathlib.Path(output)
    final = output / step_dir.name
    if final.resolve() == step_dir.resolve():
        raise ConversionError(f"--output {output} would overwrite the source checkpoint.")
    if final.exists() and not overwrite:
        raise ConversionError(f"{final} exists; pass --overwrite to replace it, or pick another "
                              f"--output.")

    spaces = checkpoint_spaces(step_dir, source_backend, config)
    layout = families.checkpoint_layout(config, spaces)
    flat = read_params(step_dir, source_backend, layout)
    digest = canonical.digest(flat)

    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f"{step_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_params(tmp / run_dir_lib.PARAMS_DIR, to, flat, layout,
                     {"format": "vibe-rl canonical", "writer": "convert", "source_backend":
                      source_backend, "params_sha256": digest})
        _write_assets(step_dir, tmp, to,
                      _provenance(step_dir, source_backend, to, config, digest))
        written = read_params(tmp, to, layout)  # what a loader will see: the same arrays
        if canonical.digest(written) != digest:
            raise ConversionError("The written params differ from the source's (digest mismatch).")
        summary = None
        if check:
            try:
                if config.algo.kind == "flow":
                    summary = verify_flow(step_dir, source_backend, tmp, to, config, spaces,
                                          layout)
                else:
                    summary = verify(step_dir, source_backend, tmp, to, spaces)
            except policy_lib.BackendUnavailableError as error:
                logger.warning("Not verified against the source: %s", error)
        if final.exists():
            stale = output / f"{step_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Result(final, source_backend, to, digest, summary)
