"""Subprocess for the kill-mid-save test: trains, and freezes inside the save of step `freeze_at`.

usage: _torch_kill_worker.py <base_dir> <exp_name> <updates> <freeze_at> <marker_file>

Every file of the step has been written into `<step>.tmp-*` by the real
`write_step` when it freezes (just before the rename that completes the step);
it then writes `marker_file` and sleeps until the test kills it with SIGKILL.
"""

import pathlib
import sys
import time

from common import presets
from vibe_rl_torch import checkpoints
from vibe_rl_torch import train as torch_train


def main() -> None:
    base, exp, updates, freeze_at, marker = sys.argv[1:6]
    original = checkpoints._fsync_dir

    def freezing_fsync_dir(path: pathlib.Path) -> None:
        original(path)
        if path.name.startswith(f"{freeze_at}.tmp-"):
            pathlib.Path(marker).write_text(str(path))
            while True:
                time.sleep(1)

    checkpoints._fsync_dir = freezing_fsync_dir
    cfg = presets.replace(presets.get_preset("cartpole_ppo"), exp_name=exp, backend="torch",
                          checkpoint_base_dir=base, log_interval=1, save_interval=1,
                          progress_bar=False)
    torch_train.train(presets.replace(cfg, total_timesteps=int(updates) * cfg.batch_size))


if __name__ == "__main__":
    main()
