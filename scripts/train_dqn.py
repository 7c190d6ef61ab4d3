"""DQN entry point over the same presets as train.py.

    python scripts/train_dqn.py --help                          # every DQN field (cartpole_dqn preset)
    python scripts/train_dqn.py --exp-name r1 --seed 1          # any field can be overridden
    python scripts/train_dqn.py cartpole_dqn --exp-name r1 --backend jax
"""

from common import entrypoint, presets


def main() -> None:
    entrypoint.run(presets.algorithm_cli("dqn", default="cartpole_dqn", prog="train_dqn.py"))


if __name__ == "__main__":
    main()
