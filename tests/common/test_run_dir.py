"""The run-directory contract: fresh / resume / overwrite and retention."""

import pytest

from common import run_dir as rd


def test_fresh_then_exists_requires_a_flag(tmp_path):
    run = tmp_path / "p" / "e"
    assert rd.initialize_run_dir(run, resume=False, overwrite=False) is False
    (run / "tb").mkdir()
    with pytest.raises(rd.RunDirError, match="--resume.*--overwrite"):
        rd.initialize_run_dir(run, resume=False, overwrite=False)


def test_resume_needs_a_complete_step(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "3.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save
    with pytest.raises(rd.RunDirError, match="no complete checkpoint"):
        rd.initialize_run_dir(run, resume=True, overwrite=False)
    assert not (run / "3.orbax-checkpoint-tmp-123").exists()  # leftovers cleaned
    (run / "5").mkdir()
    (run / "7.tmp-abc").mkdir()
    assert rd.initialize_run_dir(run, resume=True, overwrite=False) is True
    assert rd.complete_steps(run) == [5]


def test_overwrite_clears(tmp_path):
    run = tmp_path / "o"
    (run / "10").mkdir(parents=True)
    assert rd.initialize_run_dir(run, resume=False, overwrite=True) is False
    assert list(run.iterdir()) == []


def test_resume_and_overwrite_exclusive(tmp_path):
    with pytest.raises(rd.RunDirError, match="exclusive"):
        rd.initialize_run_dir(tmp_path, resume=True, overwrite=True)


def test_steps_to_keep():
    steps = [10, 20, 30, 40, 50, 60]
    assert rd.steps_to_keep(steps, 2, None) == {50, 60}
    assert rd.steps_to_keep(steps, 2, 20) == {20, 40, 50, 60}
    assert rd.steps_to_keep(steps, 1, 25) == {50, 60}
