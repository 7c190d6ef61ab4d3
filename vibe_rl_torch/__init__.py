"""Torch backend: the PyTorch Lightning mirror of the JAX core (gymnasium envs, DDP via torchrun).

Imported only when `--backend torch` is chosen; it never imports `vibe_rl_jax`.
"""
