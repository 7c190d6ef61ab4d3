"""The JAX backend.

Importing it joins a multi-process JAX job when the environment names one
(JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, see
`vibe_rl_jax.distributed`): that has to happen before any JAX device is used,
and importing gymnax already uses one.
"""

from vibe_rl_jax import distributed as _distributed

_distributed.initialize_from_env()
