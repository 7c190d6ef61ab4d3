"""The Torch replay buffer: a ring of preallocated tensors, and its checkpoint files.

Why not a library: torchrl (0.14 on the registry) has replay buffers, but it
pulls in tensordict and two more packages with compiled extensions pinned to
particular torch releases, and its storages checkpoint through tensordict's
own memmap layout; the buffer DQN/SAC need is a ring of five tensors (~40
lines below), and what takes care is the checkpoint (no second copy of a large
buffer, one file set per DDP rank), which we would have to write anyway.

Each transition stores obs, action, reward (already scaled), next_obs = the
TRUE observation reached by the step (gymnasium's `final_obs` when the episode
ended there, before the auto-reset) and `terminated` only: a truncated step
bootstraps from next_obs like any other, as on the JAX side. n-step
transitions (DQN's --algo.n-step > 1) also store their `discount`. Sampling is
uniform with replacement over the filled part and uses the generator it is
given (the training generator, checkpointed), never the global RNG.

Checkpoint layout, per rank r: `train_state/replay_rank_<r>/<field>.npy`
(full capacity, so the file set has a fixed size), and the cursor (`pos`,
`size`) in that rank's state. A `.npy` is written as a header then rows in
chunks of about 16 MB, from the live tensors (or received chunk by chunk from
another rank over the process group), and read back chunk by chunk through a
memory map: neither saving nor restoring holds a second copy of the buffer.
"""

from __future__ import annotations

import io
import pathlib
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from common.config import ConfigError

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")  # + "discount" for n-step
CHUNK_BYTES = 16 * 2**20
# A buffer larger than this is written synchronously, straight from the live tensors, like the
# JAX backend's `background_max_bytes` (a background save would have to copy it first).
BACKGROUND_MAX_BYTES = 256 * 2**20


def replay_dir(rank: int) -> str:
    return f"replay_rank_{rank}"


class ReplayBuffer:
    """Fixed-capacity FIFO of transitions; `add` takes a batch (one row per env)."""

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], action_shape: tuple[int, ...],
                 action_dtype: torch.dtype, device: torch.device | str = "cpu",
                 discount: bool = False):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        shapes = {"obs": (obs_shape, torch.float32), "action": (action_shape, action_dtype),
                  "reward": ((), torch.float32), "next_obs": (obs_shape, torch.float32),
                  "terminated": ((), torch.float32)}
        if discount:
            shapes["discount"] = ((), torch.float32)
        self.data = {name: torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device)
                     for name, (shape, dtype) in shapes.items()}
        # On the CPU, numpy views of the same memory: `add` writes a step's few rows through
        # them, a fraction of the cost of five torch indexing calls on these tiny batches.
        self._views = ({name: t.numpy() for name, t in self.data.items()}
                       if self.device.type == "cpu" else None)
        self.pos = 0  # next row to write
        self.size = 0  # rows filled

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def add(self, **batch: torch.Tensor | np.ndarray) -> None:
        """Append one row per env (in env order), overwriting the oldest rows when full.

        Fields are tensors or numpy arrays (a CPU buffer takes either without a conversion);
        values are cast to the field's dtype (e.g. a bool `terminated` becomes 0./1.).
        """
        n = batch["obs"].shape[0]
        if n > self.capacity:
            raise ValueError(f"cannot add {n} transitions to a buffer of {self.capacity}")
        first = min(n, self.capacity - self.pos)
        for name in self.data:
            if self._views is not None:
                dst, src = self._views[name], np.asarray(batch[name])
            else:
                dst, src = self.data[name], torch.as_tensor(batch[name], device=self.device)
            dst[self.pos:self.pos + first] = src[:first]
            if first < n:  # wrap around
                dst[:n - first] = src[first:]
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """`batch_size` rows drawn uniformly with replacement from the filled part."""
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer")
        idx = torch.randint(0, self.size, (batch_size,), generator=generator, device=self.device)
        return {name: t.index_select(0, idx) for name, t in self.data.items()}

    def cursor(self) -> dict[str, int]:
        return {"pos": self.pos, "size": self.size, "capacity": self.capacity}

    def set_cursor(self, cursor: Mapping[str, int]) -> None:
        if int(cursor["capacity"]) != self.capacity:
            raise ConfigError(
                f"The checkpoint's replay buffer holds {cursor['capacity']} transitions per "
                f"process, this run's {self.capacity}: resume with the --algo.buffer-size (and "
                f"the number of processes) the run was trained with.")
        self.pos, self.size = int(cursor["pos"]), int(cursor["size"])


# ------------------------------------------------------------------ .npy streaming
def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _row_chunks(tensor: torch.Tensor) -> Iterator[slice]:
    row_bytes = max(1, tensor[0].numel() * tensor.element_size()) if len(tensor) else 1
    rows = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, tensor.shape[0], rows):
        yield slice(start, min(start + rows, tensor.shape[0]))


def _write_header(f, tensor: torch.Tensor) -> None:
    np.lib.format.write_array_header_2_0(f, {
        "descr": np.lib.format.dtype_to_descr(_np_dtype(tensor.dtype)), "fortran_order": False,
        "shape": tuple(tensor.shape)})


def write_npy(f, tensor: torch.Tensor) -> None:
    """`tensor` as a .npy file, written chunk by chunk (a GPU tensor is copied a chunk at a time)."""
    _write_header(f, tensor)
    for rows in _row_chunks(tensor):
        f.write(tensor[rows].contiguous().cpu().numpy().data)


def read_npy_into(path: pathlib.Path, tensor: torch.Tensor) -> None:
    """Fill `tensor` from a .npy file through a memory map, chunk by chunk."""
    array = np.load(path, mmap_mode="r")
    _check_file(path, array, tensor)
    for rows in _row_chunks(tensor):
        tensor[rows] = torch.from_numpy(np.array(array[rows])).to(tensor.device)


def _check_file(path, array: np.ndarray, tensor: torch.Tensor) -> None:
    if array.shape != tuple(tensor.shape) or array.dtype != _np_dtype(tensor.dtype):
        raise ConfigError(
            f"{path}: a replay buffer field of shape {array.shape} ({array.dtype}) does not fit "
            f"this run's {tuple(tensor.shape)} ({_np_dtype(tensor.dtype)}): resume with the "
            f"--algo.buffer-size, --env.id and number of processes the run was trained with.")


# ------------------------------------------------------------------ checkpoint files
Writer = Callable[[Any], None]  # writes one file's content into an open binary file


def buffer_files(buffer: ReplayBuffer, rank: int, *, stream: bool) -> dict[str, bytes | Writer]:
    """`{path under train_state/: content}` for this rank's buffer.

    `stream=False` serialises now (bytes: safe to write in the background);
    `stream=True` returns writers that read the live tensors when the step is
    written, which must then happen before training continues.
    """
    files: dict[str, bytes | Writer] = {}
    for name, tensor in buffer.data.items():
        rel = f"{replay_dir(rank)}/{name}.npy"
        if stream:
            files[rel] = (lambda t: lambda f: write_npy(f, t))(tensor)
        else:
            out = io.BytesIO()
            write_npy(out, tensor)
            files[rel] = out.getvalue()
    return files


def _comm_device() -> torch.device:
    return (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
            else torch.device("cpu"))


def receiving_files(like: ReplayBuffer, rank: int) -> dict[str, Writer]:
    """Writers (on rank 0) for rank `rank`'s buffer, received chunk by chunk as it is written.

    Rank `rank` must run `send_buffer(its buffer)` at the same time. Every rank's buffer has
    `like`'s shapes (one config).
    """
    def writer(template: torch.Tensor):
        def write(f) -> None:
            _write_header(f, template)
            for rows in _row_chunks(template):
                chunk = torch.empty_like(template[rows], device=_comm_device())
                dist.recv(chunk, src=rank)
                f.write(chunk.cpu().numpy().data)
        return write

    return {f"{replay_dir(rank)}/{name}.npy": writer(t) for name, t in like.data.items()}


def send_buffer(buffer: ReplayBuffer, dst: int = 0) -> None:
    """The sending side of `receiving_files` / `send_files`' receiving side: every field, by chunk."""
    for tensor in buffer.data.values():
        for rows in _row_chunks(tensor):
            dist.send(tensor[rows].contiguous().to(_comm_device()), dst=dst)


def recv_buffer(buffer: ReplayBuffer, src: int = 0) -> None:
    """Fill `buffer` from chunks sent by `send_files` on rank `src`."""
    for tensor in buffer.data.values():
        for rows in _row_chunks(tensor):
            chunk = torch.empty_like(tensor[rows], device=_comm_device())
            dist.recv(chunk, src=src)
            tensor[rows] = chunk.to(tensor.device)


def check_files(train_state_dir: pathlib.Path, like: ReplayBuffer, ranks: int) -> None:
    """Every rank's files exist and fit `like`'s shapes (read headers only)."""
    for rank in range(ranks):
        for name, tensor in like.data.items():
            path = train_state_dir / replay_dir(rank) / f"{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"Replay buffer file missing: {path}.")
            _check_file(path, np.load(path, mmap_mode="r"), tensor)


def load_files(train_state_dir: pathlib.Path, buffer: ReplayBuffer, rank: int) -> None:
    """Fill `buffer` (contents only; the cursor comes with the rank's state) from rank `rank`'s files."""
    for name, tensor in buffer.data.items():
        read_npy_into(train_state_dir / replay_dir(rank) / f"{name}.npy", tensor)


def send_files(train_state_dir: pathlib.Path, like: ReplayBuffer, rank: int) -> None:
    """Rank 0 streams rank `rank`'s saved buffer to it (memory-mapped, chunk by chunk)."""
    for name, tensor in like.data.items():
        array = np.load(train_state_dir / replay_dir(rank) / f"{name}.npy", mmap_mode="r")
        for rows in _row_chunks(tensor):
            dist.send(torch.from_numpy(np.array(array[rows])).to(_comm_device()), dst=rank)
