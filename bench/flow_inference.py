"""Flow-policy inference latency per backend: one H-step action chunk by Euler integration.

    python bench/flow_inference.py                         # two_goal_flow's network, JAX (+ Torch if present)
    python bench/flow_inference.py --preset pendulum_flow --batch-sizes 1,32 --calls 2000
    python bench/flow_inference.py --checkpoint-dir checkpoints/two_goal_flow/f1   # + Policy.infer

For each backend and batch size: p50/p99 of (a) the compiled sampler alone
(encoder once, then `num_integration_steps` velocity evaluations; numpy in,
numpy out) and (b) the chunk function the served policy runs (Normalize ->
sampler -> Unnormalize, numpy dicts). With --checkpoint-dir, also
`Policy.infer` of `create_trained_policy` on that checkpoint (the server's
in-process path). Weights are random (latency does not depend on them); the
network is the preset's. JAX runs with inline CPU execution, as the policy
server does. GC is off while timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import lerobot_data, presets  # noqa: E402
from common.normalize import NormStats  # noqa: E402


def percentiles(fn, calls: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = np.empty(calls)
    gc.disable()
    try:
        for i in range(calls):
            start = time.perf_counter()
            fn()
            times[i] = time.perf_counter() - start
    finally:
        gc.enable()
    return {"p50_ms": float(np.percentile(times, 50) * 1e3),
            "p99_ms": float(np.percentile(times, 99) * 1e3)}


def dummy_stats(state_dim: int, action_dim: int) -> dict[str, NormStats]:
    def stats(d):
        return NormStats(mean=np.zeros(d), std=np.ones(d), q01=-np.ones(d), q99=np.ones(d))
    return {"state": stats(state_dim), "actions": stats(action_dim)}


def bench_jax(config, state_dim: int, action_dim: int, batch_sizes, calls: int) -> list[dict]:
    from vibe_rl_jax.policy import use_inline_cpu_execution

    use_inline_cpu_execution()
    import jax
    import jax.numpy as jnp

    from vibe_rl_jax import flow

    algo, data = config.algo, config.data
    model = flow.make_model(algo, action_dim=action_dim, horizon=data.action_horizon)
    params = flow.init_params(model, jax.random.PRNGKey(0), state_dim)
    sample = jax.jit(lambda p, s, k: flow.sample_chunk(p, model, {"state": s}, k,
                                                       algo.num_integration_steps))
    group = lerobot_data.norm_transforms(data, dummy_stats(state_dim, action_dim))
    chunk_fn = flow.make_chunk_fn(model, params, num_steps=algo.num_integration_steps,
                                  input_transform=group.input_fn(),
                                  output_transform=group.output_fn())
    key = jax.random.PRNGKey(1)
    rows = []
    for batch in batch_sizes:
        states = np.random.default_rng(0).normal(size=(batch, state_dim)).astype(np.float32)
        raw = percentiles(lambda: np.asarray(sample(params, jnp.asarray(states), key)), calls)
        full = percentiles(lambda: chunk_fn(states), calls)
        rows.append({"backend": "jax", "batch": batch, "sampler": raw, "with_transforms": full})
    return rows


def bench_torch(config, state_dim: int, action_dim: int, batch_sizes, calls: int) -> list[dict]:
    try:
        from vibe_rl_torch import flow as torch_flow
    except ImportError:
        return []
    import torch

    torch.set_num_threads(1)
    algo, data = config.algo, config.data
    model = torch_flow.make_model(algo, state_dim=state_dim, action_dim=action_dim,
                                  horizon=data.action_horizon).eval()
    group = lerobot_data.norm_transforms(data, dummy_stats(state_dim, action_dim))
    chunk_fn = torch_flow.make_chunk_fn(model, num_steps=algo.num_integration_steps,
                                        input_transform=group.input_fn(),
                                        output_transform=group.output_fn())
    generator = torch.Generator().manual_seed(1)
    rows = []
    for batch in batch_sizes:
        states = np.random.default_rng(0).normal(size=(batch, state_dim)).astype(np.float32)

        def raw():
            with torch.inference_mode():
                return torch_flow.sample_chunk(model, {"state": torch.from_numpy(states)},
                                               algo.num_integration_steps,
                                               generator=generator).numpy()

        rows.append({"backend": "torch", "batch": batch, "sampler": percentiles(raw, calls),
                     "with_transforms": percentiles(lambda: chunk_fn(states), calls)})
    return rows


def bench_policy(checkpoint_dir: str, calls: int) -> dict:
    from common.policy import create_trained_policy, detect_backend, resolve_step_dir

    if detect_backend(resolve_step_dir(checkpoint_dir)) == "torch":
        from vibe_rl_torch.policy import use_few_threads
        use_few_threads()  # as the policy server does
    else:
        from vibe_rl_jax.policy import use_inline_cpu_execution
        use_inline_cpu_execution()
    policy = create_trained_policy(checkpoint_dir)
    shape = policy.input_spec["observation"].shape
    obs = {"observation": np.zeros(shape, np.float32)}
    return {"backend": policy.metadata["backend"], "checkpoint": checkpoint_dir, "batch": 1,
            "policy_infer": percentiles(lambda: policy.infer(obs), calls)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="two_goal_flow")
    parser.add_argument("--state-dim", type=int, default=None,
                        help="default: 2 for two_goal presets, 3 for pendulum")
    parser.add_argument("--action-dim", type=int, default=None)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON line per row")
    args = parser.parse_args(argv)
    config = presets.get_preset(args.preset)
    pendulum = "pendulum" in args.preset
    state_dim = args.state_dim or (3 if pendulum else 2)
    action_dim = args.action_dim or (1 if pendulum else 2)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    backends = args.backends.split(",")
    rows = []
    if "jax" in backends:
        rows += bench_jax(config, state_dim, action_dim, batch_sizes, args.calls)
    if "torch" in backends:
        rows += bench_torch(config, state_dim, action_dim, batch_sizes, args.calls)
    if args.checkpoint_dir:
        rows.append(bench_policy(args.checkpoint_dir, args.calls))
    algo = config.algo
    print(f"{args.preset}: chunk H={config.data.action_horizon} x A={action_dim}, state {state_dim}, "
          f"{algo.num_integration_steps} Euler steps, expert {algo.hidden_sizes}, "
          f"encoder {algo.encoder_sizes}")
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        parts = [f"{k} p50 {v['p50_ms']:.3f} ms p99 {v['p99_ms']:.3f} ms"
                 for k, v in row.items() if isinstance(v, dict)]
        print(f"  {row['backend']:<6} batch {row['batch']:>4}: " + " | ".join(parts))
    return rows


if __name__ == "__main__":
    main()
