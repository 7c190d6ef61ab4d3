"""Multi-process JAX (jax.distributed): 2 processes x 1 CPU device train like 1 process x 2 devices.

Both processes run on this machine and talk over gloo, as hosts of a cluster
would; they share the run directory as hosts share a file system.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

WORKER = "tests/vibe_rl_jax/_mesh_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, env_per_process):
    procs = []
    for extra in env_per_process:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", **extra,
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        procs.append(subprocess.Popen([sys.executable, *args(extra)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _worker_args(tmp, exp, updates, stop_at, resume):
    def args(extra):
        out = tmp / f"{exp}-{extra.get('JAX_PROCESS_ID', 's')}-{stop_at}.npz"
        return [WORKER, str(tmp / "ck"), exp, str(updates), str(stop_at), "1" if resume else "0",
                str(out)]
    return args


def _two_processes(tmp, exp, updates, stop_at="-", resume=False):
    port = _free_port()
    env = [{"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i)} for i in range(2)]
    outs = _launch(_worker_args(tmp, exp, updates, stop_at, resume), env)
    data = [dict(np.load(tmp / f"{exp}-{i}-{stop_at}.npz")) for i in range(2)]
    for d in data:
        assert int(d.pop("n_devices")) == 2
    return data


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one_process_with_two_devices(tmp_path):
    """~40 s: 2 x 1 device == 1 x 2 devices; a 2-process checkpoint resumes on 2 processes."""
    _launch(_worker_args(tmp_path, "single", 4, "-", False),
            [{"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}])
    single = dict(np.load(tmp_path / "single-s--.npz"))
    assert int(single.pop("n_devices")) == 2 and int(single.pop("n_logged")) == 4

    _two_processes(tmp_path, "multi", 4, stop_at=2)
    proc0, proc1 = _two_processes(tmp_path, "multi", 4, resume=True)
    run = tmp_path / "ck" / "cartpole_ppo" / "multi"
    assert max(int(p.name) for p in run.iterdir() if p.name.isdigit()) == 4
    assert int(proc0.pop("n_logged")) == int(proc1.pop("n_logged")) == 2  # resumed at update 2
    assert proc0.keys() == single.keys()
    for key in single:
        np.testing.assert_array_equal(proc1[key], proc0[key], err_msg=key)  # one replicated state
        np.testing.assert_allclose(proc0[key], single[key], rtol=2e-4, atol=2e-5, err_msg=key)


def test_partial_launcher_variables_are_an_error(tmp_path):
    from tests.conftest import run_script

    proc = run_script(["scripts/train.py", "cartpole_ppo", "--exp-name", "x",
                       "--checkpoint-base-dir", str(tmp_path)],
                      env={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2"})
    assert proc.returncode == 2
    assert "JAX_PROCESS_ID not set" in proc.stderr
    proc = run_script(["scripts/train.py", "cartpole_ppo", "--exp-name", "x",
                       "--checkpoint-base-dir", str(tmp_path)],
                      env={"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2 and "torchrun" in proc.stderr
