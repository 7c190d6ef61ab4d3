"""Checkpoint retention and memory behaviour of the JAX checkpoint writer."""

import logging

import jax.numpy as jnp
import numpy as np

from common import run_dir as rd
from tests.conftest import run_script
from vibe_rl_jax import checkpoints


def test_orbax_retention_is_the_shared_rule(tmp_path):
    """The Torch backend implements common.run_dir.steps_to_keep; orbax must agree with it."""
    writer = checkpoints.CheckpointWriter(tmp_path, max_to_keep=2, keep_period=4, async_save=True)
    state = {"w": jnp.arange(3.0)}
    for step in range(1, 11):
        writer.save(step, params=state, train_state=state, assets={"config.json": {"s": step}})
    writer.wait()
    writer.close()
    assert set(rd.complete_steps(tmp_path)) == rd.steps_to_keep(list(range(1, 11)), 2, 4) == {
        4, 8, 9, 10}
    restored = checkpoints.load_params(tmp_path / "10")
    np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])


def test_loading_params_does_not_warn_about_the_step_level_metadata(tmp_path, caplog):
    """params/ is read on its own (serving, conversion): orbax would warn that the metadata file
    it keeps one level up is missing, which reads as a broken checkpoint."""
    writer = checkpoints.CheckpointWriter(tmp_path, max_to_keep=1, keep_period=None,
                                          async_save=False)
    writer.save(1, params={"w": jnp.ones(2)}, train_state={"w": jnp.ones(2)}, assets={})
    writer.wait()
    writer.close()
    with caplog.at_level("WARNING", logger="absl"):
        checkpoints.load_params(tmp_path / "1")
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
    assert not logging.getLogger("absl").filters  # removed again: other warnings still show


_BIG_SAVE = r"""
import re, sys, jax, jax.numpy as jnp
from vibe_rl_jax import checkpoints
def rss_mb():
    # Peak RSS of this process image. Not getrusage's ru_maxrss: Linux keeps that across
    # execve, so a child of a big pytest process starts with the parent's peak.
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
# A replay-buffer-sized state: 1e6 transitions x 100 float32 = 400 MB, made in 8 pieces so
# that making it never peaks far above its own size (the peak RSS is what is compared).
make = jax.jit(lambda: jnp.ones((125_000, 100), jnp.float32))
state = {f"buffer_{i}": make() for i in range(8)}
jax.block_until_ready(state)
# The training loop's next chunk: donates the state and writes a new one.
next_chunk = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
next_chunk = next_chunk.lower(state).compile()
before = rss_mb()
if sys.argv[2] == "writer":
    writer = checkpoints.CheckpointWriter(sys.argv[1], max_to_keep=1, keep_period=None)
    writer.save(1, params={"w": jnp.zeros(3)}, train_state=state, assets={})
    state = next_chunk(state)
    jax.block_until_ready(state)
    writer.wait(); writer.close()
else:  # control: a host view held across the next chunk, as a background save would hold it
    held = jax.device_get(state)
    state = next_chunk(state)
    jax.block_until_ready(state)
print("INCREASE_MB", rss_mb() - before)
"""


def test_large_state_saves_without_doubling_memory(tmp_path):
    script = tmp_path / "big_save.py"
    script.write_text(_BIG_SAVE)
    out = run_script([str(script), str(tmp_path / "run"), "writer"], env={"JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    increase = float(out.stdout.split("INCREASE_MB")[1])
    assert increase < 100, f"peak RSS grew by {increase:.0f} MB while saving a 400 MB state"
    assert rd.complete_steps(tmp_path / "run") == [1]
    # Control: the measurement does see a doubling. Holding the state (as a background save
    # would) while the next chunk runs makes XLA skip the donation and allocate a new 400 MB.
    out = run_script([str(script), str(tmp_path / "run2"), "control"], env={"JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("INCREASE_MB")[1]) > 300
