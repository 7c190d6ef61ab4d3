"""Train any preset on either backend.

    python scripts/train.py cartpole_ppo --backend jax --exp-name run1 --algo.lr 1e-3
    python scripts/train.py --help              # lists the presets
    python scripts/train.py cartpole_ppo --help # lists every field of that preset
"""

from common import entrypoint, presets


def main() -> None:
    entrypoint.run(presets.cli(prog="train.py"))


if __name__ == "__main__":
    main()
