"""The Policy wrapper (transforms around a backend's model) and the checkpoint loader that builds one.

A `Policy` is what the server and in-process evaluation both call:
`infer(obs) -> {"actions": ..., "policy_timing": {"infer_ms": ...}}`. It applies
the input transforms to the observation, adds the batch dimension, runs the
backend's batched inference function, removes the batch dimension and applies
the output transforms (openpi's `Policy`). The observation is checked against
the model's input spec after the input transforms, so a missing key or a wrong
shape/dtype is an `ObservationError` that names the key, not a stack trace from
inside a jitted function.

`create_trained_policy(checkpoint_dir)` finds which backend wrote a checkpoint
and loads it through that backend's `policy.load_model` (see `LoadedModel`),
reads the resolved config and norm stats from the checkpoint's own `assets/`,
and compiles the model before returning.

This module imports neither jax nor torch; backends are imported when a
checkpoint of theirs is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from common import config as config_lib
from common import normalize as normalize_lib
from common import run_dir as run_dir_lib

logger = logging.getLogger("vibe_rl")

Transform = Callable[[dict], dict]
InferFn = Callable[[dict], dict]
"""Batched inference: a nested dict of arrays with a leading batch dim -> the same for outputs."""

OBSERVATION_KEY = "observation"
ACTIONS_KEY = "actions"
TORCH_PARAMS_FILE = "model.safetensors"
_ORBAX_METADATA_FILE = "_METADATA"


class ObservationError(ValueError):
    """The observation sent to a policy does not fit its input spec (the caller's fault)."""


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be loaded as a policy; the message says what to do."""


class BackendUnavailableError(NotImplementedError):
    """The backend that wrote (or should serve) a checkpoint cannot load policies here."""


class ArraySpec(NamedTuple):
    """Shape (without the batch dim; None = any size) and dtype of one model input or output."""

    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What a backend's `policy.load_model(step_dir, config, *, deterministic, seed)` returns.

    `infer_fn` maps a batched input dict (keys of `input_spec`, leading batch dim)
    to a batched output dict (at least `"actions"`), both numpy. `metadata` is
    merged into the Policy metadata (action space, backend name, ...).
    """

    infer_fn: InferFn
    input_spec: Mapping[str, ArraySpec]
    metadata: Mapping[str, Any]


def action_spec_metadata(continuous: bool, dim: int, low: Any = None, high: Any = None) -> dict[str, Any]:
    """The `action_spec` entry of a policy's metadata; both backends' loaders describe actions so."""
    if continuous:
        return {"key": ACTIONS_KEY, "type": "box", "shape": [int(dim)], "dtype": "float32",
                "low": np.asarray(low).tolist(), "high": np.asarray(high).tolist()}
    return {"key": ACTIONS_KEY, "type": "discrete", "n": int(dim), "shape": [], "dtype": "int32"}


# ----------------------------------------------------------------- nested dict helpers


def _is_map(tree: Any) -> bool:
    # dict first: the ABC check behind isinstance(x, Mapping) is slow on the request path.
    return type(tree) is dict or isinstance(tree, Mapping)


def _leaves(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if _is_map(tree):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}/")
    else:
        yield prefix[:-1], tree


def _map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if _is_map(tree):
        return {key: _map(fn, value) for key, value in tree.items()}
    return fn(tree)


def _stack(samples: Sequence[Any]) -> Any:
    first = samples[0]
    if _is_map(first):
        return {key: _stack([s[key] for s in samples]) for key in first}
    if len(samples) == 1:
        return np.expand_dims(np.asarray(first), 0)  # a view: no copy for the common case
    return np.stack([np.asarray(s) for s in samples])


def _get(tree: Mapping, path: str) -> Any:
    node: Any = tree
    for part in path.split("/"):
        if not _is_map(node) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def _put(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _signature(tree: Any) -> tuple:
    """Keys, shapes and dtypes: samples with equal signatures can share one batched call."""
    return tuple((path, leaf.shape, leaf.dtype.str) for path, leaf in _leaves(tree))


def _transforms(value: Any, what: str) -> tuple[Transform, ...]:
    if value is None:
        return ()
    if callable(value):
        return (value,)
    transforms = tuple(value)
    for t in transforms:
        if not callable(t):
            raise TypeError(f"{what}: every transform must be callable, got {type(t).__name__}.")
    return transforms


# ----------------------------------------------------------------- Policy


class Policy:
    """A model plus the transforms around it; `infer` takes one unbatched observation.

    `input_transforms` is a sequence of callables on nested dicts of numpy
    arrays, applied in order before the model; `output_transforms` likewise
    after it. A transform group (an object with `.inputs` and `.outputs`, as the
    data pipeline builds) may be passed as `input_transforms` alone. With an
    `input_spec`, the transformed observation is checked against it and only
    its keys reach the model, cast to the model's dtypes (a same-kind cast, so
    float64 -> float32 is fine and float -> int is an error).
    """

    def __init__(self, infer_fn: InferFn, input_transforms: Any = (), output_transforms: Any = (),
                 metadata: Mapping[str, Any] | None = None, *,
                 input_spec: Mapping[str, ArraySpec] | None = None):
        if hasattr(input_transforms, "inputs") and hasattr(input_transforms, "outputs"):
            if _transforms(output_transforms, "output_transforms"):
                raise TypeError("Pass a transform group as input_transforms alone: it holds both "
                                "sides, so output_transforms must be empty.")
            input_transforms, output_transforms = input_transforms.inputs, input_transforms.outputs
        self._infer_fn = infer_fn
        self._inputs = _transforms(input_transforms, "input_transforms")
        self._outputs = _transforms(output_transforms, "output_transforms")
        self._input_spec = {k: ArraySpec(tuple(s.shape), str(np.dtype(s.dtype)))
                            for k, s in (input_spec or {}).items()}
        self._metadata = dict(metadata or {})
        self.norm_stats: dict[str, normalize_lib.NormStats] | None = None
        """Dataset norm stats from the checkpoint's assets/, when its config uses them."""

    @property
    def metadata(self) -> dict[str, Any]:
        """What the server sends each client on connect (observation/action spec, backend, ...)."""
        return self._metadata

    @property
    def input_spec(self) -> dict[str, ArraySpec]:
        return dict(self._input_spec)

    # ------------------------------------------------------------- public entry points
    def infer(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """One unbatched observation -> unbatched outputs plus `policy_timing`."""
        return self._run([self._prepare(obs)])[0]

    def infer_batch(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """Observations with a leading batch dim -> outputs with the same leading dim.

        Transforms see one sample at a time (as in the data pipeline); the model
        sees the whole batch in one call.
        """
        if not isinstance(obs, Mapping):
            raise ObservationError(f"An observation batch is a dict of arrays, got "
                                   f"{type(obs).__name__}.")
        arrays = _map(np.asarray, obs)
        sizes = {path: (a.shape[0] if a.ndim else None) for path, a in _leaves(arrays)}
        if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
            raise ObservationError(f"infer_batch needs every array to share a leading batch dim; "
                                   f"got first-dim sizes {sizes}.")
        n = next(iter(sizes.values()))
        outputs = self._run([self._prepare(_map(lambda a, i=i: a[i], arrays)) for i in range(n)])
        timing = outputs[0].pop("policy_timing") if outputs else {"infer_ms": 0.0}
        for out in outputs[1:]:
            out.pop("policy_timing")
        batched = _stack(outputs) if outputs else {}
        batched["policy_timing"] = timing
        return batched

    def infer_many(self, observations: Sequence[Any]) -> list[dict[str, Any] | Exception]:
        """Independent requests -> one result or exception each, batching compatible ones.

        This is the server's entry point: a bad observation fails alone
        (`ObservationError`), the others still get their actions.
        """
        if len(observations) == 1:  # the common, latency-critical case: no grouping
            try:
                return [self._run([self._prepare(observations[0])])[0]]
            except Exception as error:
                return [error]
        results: list[dict[str, Any] | Exception | None] = [None] * len(observations)
        groups: dict[tuple, list[tuple[int, Any]]] = {}
        for i, obs in enumerate(observations):
            try:
                sample = self._prepare(obs)
            except Exception as error:  # ObservationError; anything else fails this request only
                results[i] = error
                continue
            groups.setdefault(_signature(sample), []).append((i, sample))
        for members in groups.values():
            try:
                outputs = self._run([sample for _, sample in members])
            except Exception as error:  # a model failure fails the requests of its batch only
                outputs = [error] * len(members)
            for (i, _), out in zip(members, outputs):
                results[i] = out
        return results  # type: ignore[return-value]

    def warmup(self, max_batch: int = 1) -> float:
        """Compile the model for batch sizes 1, 2, 4, ... up to `max_batch`; returns seconds.

        Backends that compile per input shape (JAX) pad batches to these sizes,
        so after warm-up no request waits for a compile.
        """
        if not self._input_spec:
            return 0.0
        start = time.perf_counter()
        size = 1
        while True:
            batch: dict = {}
            for path, spec in self._input_spec.items():
                shape = tuple(1 if n is None else n for n in spec.shape)
                _put(batch, path, np.zeros((size, *shape), spec.dtype))
            self._infer_fn(batch)
            if size >= max_batch:
                break
            size = min(size * 2, max_batch)
        return time.perf_counter() - start

    # ------------------------------------------------------------- internals
    def _prepare(self, obs: Any) -> Any:
        """Copy, transform and check one observation; returns the model-side sample."""
        if not _is_map(obs):
            raise ObservationError(f"An observation is a dict of arrays (e.g. "
                                   f"{{{OBSERVATION_KEY!r}: ...}}), got {type(obs).__name__}.")
        data: Any = dict(obs)  # a shallow copy, so transforms never touch the caller's dict
        for transform in self._inputs:
            try:
                data = transform(data)
            except ObservationError:
                raise
            except Exception as error:
                name = getattr(transform, "__name__", type(transform).__name__)
                raise ObservationError(f"Input transform {name} failed on this observation: "
                                       f"{type(error).__name__}: {error}") from error
        if not self._input_spec:
            try:
                return _map(np.asarray, data)
            except Exception as error:  # e.g. ragged nested lists
                raise ObservationError(f"Observation is not a dict of arrays: {error}") from None
        return self._check(data)

    def _check(self, data: Mapping) -> dict:
        model_input: dict = {}
        missing = []
        for path, spec in self._input_spec.items():
            try:
                value = _get(data, path)
            except KeyError:
                missing.append(path)
                continue
            try:
                array = np.asarray(value)
            except Exception as error:  # e.g. ragged nested lists
                raise ObservationError(f"Observation key {path!r}: not an array ({error}).") from None
            want = np.dtype(spec.dtype)
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise ObservationError(
                    f"Observation key {path!r}: dtype {array.dtype} cannot be cast to the model's "
                    f"{want} (expected shape {list(spec.shape)}, dtype {want}).")
            if array.ndim != len(spec.shape) or any(
                    n is not None and n != m for n, m in zip(spec.shape, array.shape)):
                hint = (" (send one unbatched observation per request; use infer_batch for a "
                        "batch)" if array.ndim == len(spec.shape) + 1 else "")
                raise ObservationError(
                    f"Observation key {path!r}: shape {list(array.shape)}, expected "
                    f"{list(spec.shape)}{hint}.")
            _put(model_input, path, array.astype(want, copy=False))
        if missing:
            got = sorted(path for path, _ in _leaves(data)) if isinstance(data, Mapping) else []
            raise ObservationError(f"Observation lacks key(s) {missing}; the model needs "
                                   f"{sorted(self._input_spec)}, got {got}.")
        return model_input

    def _run(self, samples: list) -> list[dict[str, Any]]:
        """One batched model call for samples of equal signature; per-sample outputs."""
        batch = _stack(samples)
        start = time.perf_counter()
        outputs = _map(np.asarray, self._infer_fn(batch))
        infer_ms = (time.perf_counter() - start) * 1000
        results = []
        for i in range(len(samples)):
            out = _map(lambda a, i=i: a[i], outputs)
            for transform in self._outputs:
                out = transform(out)
            out["policy_timing"] = {"infer_ms": infer_ms}
            results.append(out)
        return results


# ----------------------------------------------------------------- loading checkpoints


def resolve_step_dir(checkpoint_dir: pathlib.Path | str) -> pathlib.Path:
    """A step directory as given, or a run directory's latest complete step."""
    path = pathlib.Path(checkpoint_dir)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint directory {path} does not exist. Pass a step directory "
                              f"(<run_dir>/<step>) or a run directory (<base>/<preset>/<exp_name>).")
    if (path / run_dir_lib.PARAMS_DIR).is_dir():
        return path
    step = run_dir_lib.latest_step(path)
    if step is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint step (no {run_dir_lib.PARAMS_DIR}/ inside) nor a run "
            f"directory with a complete step. Train one with `python scripts/train.py <preset> "
            f"--exp-name <name>` and pass checkpoints/<preset>/<name>.")
    return run_dir_lib.step_dir(path, step)


def detect_backend(step_dir: pathlib.Path | str) -> str:
    """"torch" when params/ holds model.safetensors, "jax" when it is an orbax checkpoint."""
    params = pathlib.Path(step_dir) / run_dir_lib.PARAMS_DIR
    is_torch = (params / TORCH_PARAMS_FILE).is_file()
    is_jax = (params / _ORBAX_METADATA_FILE).is_file()
    if is_torch and not is_jax:
        return "torch"
    if is_jax and not is_torch:
        return "jax"
    found = sorted(p.name for p in params.iterdir()) if params.is_dir() else []
    raise CheckpointError(
        f"Cannot tell which backend wrote {params}: expected either {TORCH_PARAMS_FILE} (Torch) "
        f"or an orbax checkpoint with {_ORBAX_METADATA_FILE} (JAX); found {found}.")


def load_config(step_dir: pathlib.Path | str) -> config_lib.TrainConfig:
    """The resolved TrainConfig that training stored in `<step>/assets/config.json`."""
    path = pathlib.Path(step_dir) / run_dir_lib.ASSETS_DIR / run_dir_lib.CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"Missing {path}: every vibe-rl checkpoint stores its resolved config there (written by "
            f"`python scripts/train.py`). Is {step_dir} a vibe-rl checkpoint step?")
    try:
        return config_lib.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(f"Cannot read the config in {path}: {type(error).__name__}: "
                              f"{error}") from None


def uses_norm_stats(config: config_lib.TrainConfig) -> bool:
    """Whether this config's policy normalizes with dataset norm stats (assets/norm_stats.json).

    The RL presets normalize observations with running statistics that travel
    inside params/ (`env.normalize_obs`), so they need no file. Configs with a
    data pipeline (the imitation issue) declare `data.use_norm_stats`.
    """
    return bool(getattr(getattr(config, "data", None), "use_norm_stats", False))


def load_norm_stats(step_dir: pathlib.Path | str, preset: str) -> dict[str, normalize_lib.NormStats]:
    """`<step>/assets/norm_stats.json` (openpi's schema), the stats this checkpoint trained with."""
    path = pathlib.Path(step_dir) / run_dir_lib.ASSETS_DIR / run_dir_lib.NORM_STATS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"Missing norm stats {path}: this policy normalizes its inputs with them. Compute them "
            f"with `{normalize_lib.COMPUTE_COMMAND.format(preset=preset)}` (training copies them "
            f"into every checkpoint's assets/), then copy the file to {path} or retrain.")
    try:
        return normalize_lib.load(path, preset=preset)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def _load_model_fn(backend: str) -> Callable[..., LoadedModel]:
    # Imported here, not at the top: common imports neither jax nor torch, and serving a JAX
    # checkpoint must not need torch installed (nor the reverse).
    if backend not in ("jax", "torch"):
        raise CheckpointError(f"Unknown backend {backend!r}: pass jax or torch.")
    module_name = f"vibe_rl_{backend}.policy"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name in (module_name, f"vibe_rl_{backend}"):
            raise BackendUnavailableError(
                f"The {backend} policy loader ({module_name}) is not installed with this copy of "
                f"vibe-rl: pip install -e '.[{backend},serve]'.") from None
        raise BackendUnavailableError(
            f"Loading a {backend} checkpoint needs {error.name!r}, which is not installed: "
            f"pip install -e '.[{backend},serve]'.") from None
    return module.load_model


def create_trained_policy(checkpoint_dir: pathlib.Path | str, backend: str | None = None, *,
                          input_transforms: Any = (), output_transforms: Any = (),
                          deterministic: bool = True, seed: int = 0,
                          warmup_batch: int = 8) -> Policy:
    """Load a checkpoint step (or a run directory's latest step) as a ready-to-serve Policy.

    The backend is detected from params/ (orbax -> "jax", model.safetensors ->
    "torch"); passing the other one converts the checkpoint first (into a
    temporary directory, with the converter's checks, without writing next to
    the source), so either framework can serve what either trained. `deterministic` picks the greedy/mean action; otherwise
    actions are sampled from a stream seeded with `seed`. The model is compiled
    for batches up to `warmup_batch` before this returns.
    """
    start = time.perf_counter()
    step_dir = resolve_step_dir(checkpoint_dir)
    written_by = detect_backend(step_dir)
    if backend is not None and backend != written_by:
        return _create_converted_policy(step_dir, backend, input_transforms=input_transforms,
                                        output_transforms=output_transforms,
                                        deterministic=deterministic, seed=seed,
                                        warmup_batch=warmup_batch)
    config = load_config(step_dir)
    norm_stats = load_norm_stats(step_dir, config.name) if uses_norm_stats(config) else None
    model = _load_model_fn(written_by)(step_dir, config, deterministic=deterministic, seed=seed)
    metadata = {
        "backend": written_by,
        "preset": config.name,
        "exp_name": config.exp_name,
        "step": int(step_dir.name) if step_dir.name.isdigit() else None,
        "env_id": config.env.id,
        "observation_spec": {k: ArraySpec(*v).to_json() for k, v in model.input_spec.items()},
        "deterministic": deterministic,
        **dict(model.metadata),
    }
    if norm_stats is not None:
        metadata["norm_stats_keys"] = sorted(norm_stats)
    provenance = step_dir / run_dir_lib.ASSETS_DIR / run_dir_lib.PROVENANCE_FILE
    if provenance.is_file():  # a converted checkpoint says where it came from
        source = json.loads(provenance.read_text()).get("source", {})
        metadata["converted_from"] = {k: source.get(k) for k in ("backend", "path", "step")}
    policy = Policy(model.infer_fn, input_transforms, output_transforms, metadata,
                    input_spec=model.input_spec)
    policy.norm_stats = norm_stats  # for the normalize transforms of data-pipeline configs
    loaded = time.perf_counter()
    warm = policy.warmup(warmup_batch)
    logger.info("Loaded %s policy %s (%s, step %s) in %.2f s, warm-up %.2f s", written_by,
                step_dir, config.name, metadata["step"], loaded - start, warm)
    return policy


def _create_converted_policy(step_dir: pathlib.Path, backend: str, **kwargs: Any) -> Policy:
    """Serve `step_dir` with the other backend: convert it to a temporary step, load that.

    The converter (convert/) is the one path between the frameworks, so this
    is the same conversion `scripts/convert_checkpoint.py` writes, checked the
    same way (strict names and shapes, digest of the written params); the
    cross-backend action check is skipped because the served policy's warm-up
    and the converter's tests cover it. The loaded policy holds its params in
    memory, so the temporary copy is removed once loaded.
    """
    import tempfile

    from convert.checkpoint import ConversionError, convert_checkpoint  # lazily: needs both loaders

    with tempfile.TemporaryDirectory(prefix="vibe-rl-serve-") as tmp:
        try:
            converted = convert_checkpoint(step_dir, backend, tmp, check=False)
        except (ConversionError, BackendUnavailableError) as error:
            raise CheckpointError(f"Cannot serve {step_dir} (written by the "
                                  f"{detect_backend(step_dir)} backend) with {backend}: {error}") from None
        policy = create_trained_policy(converted.step_dir, backend, **kwargs)
    policy.metadata["converted_from"]["path"] = str(step_dir)
    logger.info("Converted %s to %s in memory to serve it (convert_checkpoint.py writes the same "
                "checkpoint to disk).", step_dir, backend)
    return policy
