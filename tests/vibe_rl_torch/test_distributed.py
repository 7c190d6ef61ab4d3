"""vibe_rl_torch.distributed's reductions over a real 2-process gloo group."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from vibe_rl_torch import distributed


def _reduce_worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        values = [float(rank), 10.0 - rank, 0.5]
        result = (distributed.all_reduce_sum(values).tolist(),
                  distributed.all_reduce_max(values).tolist())
        pathlib.Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_sum_and_max_over_ranks(tmp_path):
    mp.spawn(_reduce_worker, args=(str(tmp_path),), nprocs=2, join=True)  # fresh interpreters
    for rank in (0, 1):
        total, biggest = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert total == [1.0, 19.0, 1.0]
        assert biggest == [1.0, 10.0, 0.5]


def test_without_a_process_group_values_pass_through():
    values = np.array([3.0, -1.0])
    assert distributed.all_reduce_sum(values).tolist() == [3.0, -1.0]
    assert distributed.all_reduce_max(values).tolist() == [3.0, -1.0]
