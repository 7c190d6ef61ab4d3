"""SAC entry point over the same presets as train.py.

    python scripts/train_sac.py --help                          # every SAC field (pendulum_sac preset)
    python scripts/train_sac.py --exp-name r1 --seed 1          # any field can be overridden
    python scripts/train_sac.py pendulum_sac --exp-name r1 --backend jax
"""

from common import entrypoint, presets


def main() -> None:
    entrypoint.run(presets.algorithm_cli("sac", default="pendulum_sac", prog="train_sac.py"))


if __name__ == "__main__":
    main()
