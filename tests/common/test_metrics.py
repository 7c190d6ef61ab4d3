"""Console format and TensorBoard writer."""

import logging
import math
import re

from common import metrics


def test_console_formatter_openpi_style():
    record = logging.LogRecord("x", logging.WARNING, "/a/b/train.py", 42, "hello %s", ("you",), None)
    line = metrics.ConsoleFormatter().format(record)
    assert re.fullmatch(r"W \d\d:\d\d:\d\d\.\d{3} \[train\.py:42\] hello you", line), line


def test_progress_line():
    line = metrics.format_progress(50, 200, 12345.6, 99.5)
    assert "25.0%" in line and "50/200" in line and "12,346 steps/s" in line and "99.5" in line
    assert "n/a" in metrics.format_progress(1, 2, 1.0, math.nan)


def test_writer_writes_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = metrics.MetricWriter(tmp_path, progress=False)
    writer.write(3, {metrics.EPISODE_RETURN: 1.5, metrics.loss_tag("total"): 0.25,
                     metrics.SPS: math.nan})
    writer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/episode_return", "train/loss/total"}
    assert acc.Scalars("train/episode_return")[0].step == 3


def test_progress_line_for_imitation_runs():
    line = metrics.format_progress(10, 40, 5000.0, 0.01234, step_name="step",
                                   rate_unit="samples/s", value_name="loss")
    assert "step 10/40" in line and "5,000 samples/s" in line and "loss 0.01234" in line
