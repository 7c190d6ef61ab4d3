"""PPO entry point over the same presets as train.py.

    python scripts/train_ppo.py --help                               # every PPO field (cartpole_ppo)
    python scripts/train_ppo.py --exp-name r1 --algo.lr 1e-3 --algo.num-steps 256
    python scripts/train_ppo.py pendulum_ppo --exp-name r1           # another PPO preset
"""

from common import entrypoint, presets

PPO_PRESETS = [name for name, (_, cfg) in presets.PRESETS.items() if cfg.algo.kind == "ppo"]


def main() -> None:
    entrypoint.run(presets.cli(presets=PPO_PRESETS, default="cartpole_ppo", prog="train_ppo.py"))


if __name__ == "__main__":
    main()
