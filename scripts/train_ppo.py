"""PPO entry point over the same presets as train.py.

    python scripts/train_ppo.py --help                          # every PPO field (cartpole_ppo preset)
    python scripts/train_ppo.py --exp-name r1 --seed 1          # any field can be overridden
    python scripts/train_ppo.py pendulum_ppo --exp-name r1 --backend jax
"""

from common import entrypoint, presets


def main() -> None:
    entrypoint.run(presets.algorithm_cli("ppo", default="cartpole_ppo", prog="train_ppo.py"))


if __name__ == "__main__":
    main()
