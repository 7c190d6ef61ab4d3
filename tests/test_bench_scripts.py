"""The SB3 comparison benchmarks still run end to end (tiny budgets: this checks the scripts, not
the speed; the figures come from running them by hand with their defaults, see the README)."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.slow

NUMBER = r"-?[0-9][0-9,]*\.?[0-9]*"
RETURN = rf"(?:nan|{NUMBER})"  # a training return is nan when no episode ended in a tiny run


def _run(args):
    proc = run_script(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _rows(out: str) -> dict[str, tuple[float, float, float]]:
    """name -> (env steps/s, training return, eval return) of every print_row line."""
    rows = {}
    for line in out.splitlines():
        match = re.match(rf"(.+?)\s*\|.* ({NUMBER}) env steps/s \|.*training return ({RETURN}) \| "
                         rf"eval return ({NUMBER})$", line)
        if match:
            rows[match[1]] = tuple(float(g.replace(",", "")) for g in match.groups()[1:])
    return rows


def test_dqn_vs_sb3_runs_and_evaluates_both_sides():
    out = _run(["bench/dqn_vs_sb3.py", "--backends", "jax,torch", "--total-timesteps", "2000",
                "--sb3-steps", "2000"])
    rows = _rows(out)
    assert {"vibe-rl jax", "vibe-rl torch"} <= rows.keys() and len(rows) == 3, out
    for sps, _, eval_return in rows.values():
        assert sps > 0 and 8 <= eval_return <= 500  # CartPole returns: every episode >= 8 steps
    assert re.search(rf"vibe-rl jax / SB3 env steps/s = {NUMBER}x", out)


def test_sac_vs_sb3_runs_and_evaluates_both_sides():
    out = _run(["bench/sac_vs_sb3.py", "--backends", "jax,torch", "--total-timesteps", "1200",
                "--sb3-matched-steps", "1200", "--sb3-steps", "200"])
    rows = _rows(out)
    assert {"vibe-rl jax", "vibe-rl torch"} <= rows.keys() and len(rows) == 4, out
    for _, _, eval_return in rows.values():
        assert -2000 < eval_return <= 0  # Pendulum: 200 steps of reward in [-16.3, 0]
    assert re.search(rf"vibe-rl torch / SB3 matched env steps/s = {NUMBER}x", out)


def test_torch_ppo_vs_sb3_runs_and_evaluates_both_sides():
    out = _run(["bench/torch_ppo_vs_sb3.py", "--total-timesteps", "2048",
                "--sb3-default-steps", "512", "--skip-ddp"])
    assert re.search(rf"Torch backend / SB3 \(1 thread, same budget\): {NUMBER}x steps/s .*"
                     rf"eval returns {NUMBER} vs {NUMBER}", out), out


def test_jax_ppo_cartpole_runs_and_evaluates_both_sides():
    out = _run(["bench/jax_ppo_cartpole.py", "--total-timesteps", "4096", "--sb3-steps", "1024"])
    rows = _rows(out)
    assert len(rows) == 3 and all(8 <= r[2] <= 500 for r in rows.values()), out
    assert re.search(rf"vibe-rl JAX / SB3 env steps/s = {NUMBER}x", out)
