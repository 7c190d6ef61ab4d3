"""Compute the norm stats a preset trains with, streaming over its LeRobot dataset.

    python scripts/compute_norm_stats.py <preset>
    python scripts/compute_norm_stats.py --config-name <preset>        # openpi's spelling
    python scripts/compute_norm_stats.py --data.root data/two_goal --output assets/two_goal/norm_stats.json

The dataset goes through the same repack transforms as training; `state` and
`actions` (padded chunk steps excluded) are accumulated by
`common.normalize.RunningStats`, which never holds the dataset in memory and
whose q01/q99 are quantiles of the whole dataset. The file lands where
training reads it (`<assets_dir>/<preset>/norm_stats.json` unless the preset's
`data.norm_stats_path` says otherwise).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import time

import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import lerobot_data, normalize  # noqa: E402
from common.config import ConfigError  # noqa: E402

logger = logging.getLogger("vibe_rl")


@dataclasses.dataclass(frozen=True)
class Args:
    """Compute norm_stats.json for a dataset."""

    data: lerobot_data.DataConfig = dataclasses.field(default_factory=lerobot_data.DataConfig)
    """The dataset and how it is repacked (a preset fills these in)."""
    output: str | None = None
    """Where to write norm_stats.json (default: where the preset's training reads it)."""
    max_frames: int | None = None
    """Use a seeded random subset of this many frames (default: all)."""
    batch_size: int = 256
    """Frames read per batch."""


def split_preset(argv: list[str]) -> tuple[str | None, list[str]]:
    """`<preset> ...` or `--config-name <preset> ...` -> (preset, remaining args)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config-name":
            if i + 1 >= len(argv):
                raise ConfigError("--config-name needs a preset name.")
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def preset_data_config(name: str) -> lerobot_data.DataConfig:
    """The DataConfig of preset `name` (imitation presets carry one as `config.data`)."""
    from common import presets

    config = presets.get_preset(name)
    data = getattr(config, "data", None)
    if not isinstance(data, lerobot_data.DataConfig):
        raise ConfigError(f"Preset {name!r} trains without a dataset (no data config), so it has "
                          f"no norm stats to compute.")
    return data


def main(argv: list[str] | None = None) -> pathlib.Path:
    from common.metrics import init_logging

    init_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        preset, rest = split_preset(argv)
        default = Args(data=preset_data_config(preset)) if preset else Args()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    args = tyro.cli(Args, default=default, args=rest,
                    description=f"Compute norm_stats.json{f' for preset {preset!r}' if preset else ''}.")
    if args.output:
        output = pathlib.Path(args.output)
    elif preset:
        output = lerobot_data.norm_stats_path(args.data, preset)
    else:
        print("error: name a preset, or pass --output with --data.root.", file=sys.stderr)
        raise SystemExit(2)
    start = time.perf_counter()
    try:
        source = lerobot_data.open_dataset(args.data)
    except lerobot_data.DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    stats = lerobot_data.compute_norm_stats(args.data, source=source, max_frames=args.max_frames,
                                            batch_size=args.batch_size)
    normalize.save(output, stats)
    frames = min(len(source), args.max_frames or len(source))
    logger.info("Norm stats of %s over %d frames in %.1f s -> %s", sorted(stats), frames,
                time.perf_counter() - start, output)
    for key, value in stats.items():
        logger.info("  %s: mean %s std %s q01 %s q99 %s", key, value.mean.round(3),
                    value.std.round(3), value.q01.round(3), value.q99.round(3))
    return output


if __name__ == "__main__":
    main()
