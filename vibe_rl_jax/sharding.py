"""The (batch, fsdp) device mesh and the sharding rule for every array.

openpi's pattern: data is split over both mesh axes; parameters and optimizer
state are replicated unless they are large enough to be worth splitting along
the fsdp axis, in which case their largest divisible dimension is sharded.
With fsdp_devices=1 everything is replicated and this is plain data
parallelism. Shardings are decided from `jax.eval_shape` output, never by
materialising the state first.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXIS = "batch"
FSDP_AXIS = "fsdp"
DATA_AXES = (BATCH_AXIS, FSDP_AXIS)

logger = logging.getLogger(__name__)


def make_mesh(fsdp_devices: int = 1) -> jax.sharding.Mesh:
    count = jax.device_count()
    if count % fsdp_devices:
        raise ValueError(f"--fsdp-devices={fsdp_devices} must divide the number of devices ({count}).")
    # Auto axes: we place arrays with explicit NamedShardings and let GSPMD propagate.
    return jax.make_mesh((count // fsdp_devices, fsdp_devices), DATA_AXES,
                         axis_types=(AxisType.Auto, AxisType.Auto))


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (env / example) axis split over every device."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_sharding(tree, mesh: jax.sharding.Mesh, *, min_size_mbytes: float = 4.0, log: bool = False):
    """Per-leaf sharding for params/optimizer state (leaves may be ShapeDtypeStructs)."""
    fsdp = mesh.shape[FSDP_AXIS]
    min_size = min_size_mbytes * 2**20

    def rule(path, leaf):
        if not hasattr(leaf, "shape"):
            return replicated(mesh)
        shape = tuple(leaf.shape)
        nbytes = int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize if shape else 0
        if fsdp == 1 or len(shape) < 2 or nbytes < min_size:
            return replicated(mesh)
        # Shard the largest dimension that fsdp divides.
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % fsdp == 0:
                spec = [None] * len(shape)
                spec[axis] = FSDP_AXIS
                if log:
                    logger.info("fsdp: sharding %s %s along axis %d", jax.tree_util.keystr(path),
                                shape, axis)
                return NamedSharding(mesh, P(*spec))
        if log:
            logger.warning("fsdp: replicating %s %s (no dim divisible by %d)",
                           jax.tree_util.keystr(path), shape, fsdp)
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(rule, tree)


def check_divisible(name: str, size: int, mesh: jax.sharding.Mesh) -> None:
    if size % mesh.size:
        raise ValueError(f"{name} ({size}) must be divisible by the number of devices "
                         f"({mesh.size}) to split it over the data axes.")
