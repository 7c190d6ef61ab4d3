"""Benchmark: the vibe-rl data path vs lerobot's own, on one generated LeRobot dataset.

(a) Loader throughput (samples/s, batches of action chunks with `*_is_pad`):
    vibe-rl's numpy BatchIterator and its torch DataLoader wrapper vs a plain
    `torch.utils.data.DataLoader(LeRobotDataset(..., delta_timestamps), shuffle=True)`.
    Plus the share of a training step spent waiting for data, with a stand-in
    JAX step (an MLP of the flow policy's size, forward + backward + Adam).
(b) Norm stats throughput (samples/s) of `compute_norm_stats` vs lerobot's own
    computation (`compute_episode_stats` per episode + `aggregate_stats`, what
    `save_episode` / stats.json use), and how far each one's q01/q99 are from
    numpy.quantile over the whole dataset.

    python bench/data_throughput.py                       # 50 episodes x 200 frames, state-only
    python bench/data_throughput.py --images --episodes 20 # with 96x96 PNG camera frames
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_KEY = "observation.images.top"


def make_dataset(root: pathlib.Path, args) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from common import lerobot_data as ld

    features = {
        "observation.state": {"dtype": "float32", "shape": (args.state_dim,), "names": None},
        "action": {"dtype": "float32", "shape": (args.state_dim,), "names": None},
    }
    if args.images:
        features[IMAGE_KEY] = {"dtype": "image", "shape": (args.image_size, args.image_size, 3),
                               "names": ["height", "width", "channel"]}
    dataset = LeRobotDataset.create("bench/data", fps=50, features=features, root=root,
                                    use_videos=False, image_writer_threads=4 if args.images else 0)
    rng = np.random.default_rng(0)
    for episode in range(args.episodes):
        # Smooth trajectories with an episode-specific offset (chunks differ a lot, like real data).
        walk = np.cumsum(rng.normal(0, 0.05, (args.frames, args.state_dim)), axis=0)
        walk += rng.normal(0, 3, args.state_dim)
        walk[rng.uniform(size=args.frames) < 0.002] *= 50  # rare glitches, as logged data has
        for t in range(args.frames):
            frame = {"observation.state": walk[t].astype(np.float32),
                     "action": walk[min(t + 1, args.frames - 1)].astype(np.float32), "task": "bench"}
            if args.images:
                frame[IMAGE_KEY] = rng.integers(0, 255, (args.image_size, args.image_size, 3),
                                                dtype=np.uint8)
            dataset.add_frame(frame)
        ld.save_episode(dataset)
    dataset.finalize()


def timed(iterator, batches: int, warmup: int = 2) -> tuple[float, int]:
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    samples = 0
    for _ in range(batches):
        batch = next(iterator)
        samples += len(batch["actions"] if "actions" in batch else batch["action"])
    return time.perf_counter() - start, samples


def _endless(loader):
    while True:  # epochs back to back, like a step-based training loop
        yield from loader


def loader_throughput(args, config, source) -> dict:
    import torch

    from common import lerobot_data as ld

    results = {}
    transform = ld.repack_transforms(config).input_fn()
    for prefetch in (0, 2):
        iterator = ld.make_batch_iterator(
            ld.DataConfig(**{**config.__dict__, "prefetch": prefetch}), source, transform=transform)
        seconds, samples = timed(iterator, args.batches)
        iterator.close()
        results[f"vibe-rl numpy iterator (prefetch {prefetch})"] = samples / seconds
    for workers in sorted({0, args.workers}):
        loader = ld.make_torch_loader(ld.DataConfig(**{**config.__dict__, "num_workers": workers}),
                                      source, transform=transform)
        seconds, samples = timed(loader, args.batches)
        results[f"vibe-rl torch loader ({workers} workers)"] = samples / seconds
    for workers in sorted({0, args.workers}):
        plain = torch.utils.data.DataLoader(source.dataset, batch_size=config.batch_size,
                                            shuffle=True, num_workers=workers, drop_last=True,
                                            generator=torch.Generator().manual_seed(0))
        seconds, samples = timed(_endless(plain), args.batches)
        results[f"plain DataLoader(LeRobotDataset) ({workers} workers)"] = samples / seconds
    return results


def data_wait_share(args, config, source) -> dict | None:
    """Share of wall time a JAX training loop waits for the iterator, with a flow-sized MLP step."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    from common import lerobot_data as ld

    state_dim = args.state_dim
    in_dim, out_dim, hidden = state_dim + args.horizon * state_dim + 1, args.horizon * state_dim, 256
    key = jax.random.PRNGKey(0)
    sizes = [in_dim, hidden, hidden, hidden, out_dim]
    params = [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
              for k, a, b in zip(jax.random.split(key, 4), sizes[:-1], sizes[1:])]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    def loss_fn(params, state, actions, mask):
        noise = jax.random.normal(jax.random.PRNGKey(1), actions.shape)
        t = jnp.full((actions.shape[0], 1), 0.5)
        x = jnp.concatenate([state, (t[:, :, None] * noise + (1 - t[:, :, None]) * actions)
                             .reshape(actions.shape[0], -1), t], axis=1)
        for w, b in params[:-1]:
            x = jax.nn.gelu(x @ w + b)
        w, b = params[-1]
        err = ((x @ w + b).reshape(actions.shape) - (noise - actions)) ** 2
        return jnp.sum(err * ~mask[..., None]) / jnp.maximum(jnp.sum(~mask), 1)

    @jax.jit
    def train_step(params, opt_state, state, actions, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, state, actions, mask)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    transform = ld.repack_transforms(config).input_fn()
    iterator = ld.make_batch_iterator(config, source, transform=transform,
                                      device_put=lambda b: jax.device_put(
                                          (b["state"], b["actions"], b["actions_is_pad"])))
    batch = next(iterator)
    params, opt_state, loss = train_step(params, opt_state, *batch)  # compile
    loss.block_until_ready()
    iterator.pop_data_wait()
    start = time.perf_counter()
    for _ in range(args.batches):
        params, opt_state, loss = train_step(params, opt_state, *next(iterator))
        loss.block_until_ready()
    wall = time.perf_counter() - start
    wait = iterator.pop_data_wait()
    iterator.close()
    return {"steps": args.batches, "step_ms": 1000 * wall / args.batches,
            "data_wait_ms": 1000 * wait / args.batches, "data_wait_share": wait / wall}


def norm_stats_comparison(args, config, source) -> dict:
    from lerobot.datasets.compute_stats import aggregate_stats, compute_episode_stats

    from common import lerobot_data as ld

    keys = {"state": "observation.state", "actions": "action"}
    n = len(source)
    results = {}
    one_step = ld.DataConfig(**{**config.__dict__, "action_horizon": 1})
    one_step_source = ld.LeRobotSource(source.dataset, {"action": [0.0]}, source.keys)
    # Both sides compute state/action stats only; compute_norm_stats skips the images itself.
    start = time.perf_counter()
    ours = ld.compute_norm_stats(one_step, source=one_step_source, batch_size=1024)
    results["vibe-rl compute_norm_stats (frames)"] = {"samples_per_s": n / (time.perf_counter() - start)}
    start = time.perf_counter()
    ld.compute_norm_stats(config, source=source, batch_size=256)
    results[f"vibe-rl compute_norm_stats (chunks of {config.action_horizon})"] = {
        "samples_per_s": n / (time.perf_counter() - start)}

    columns = source.dataset.hf_dataset.with_format("numpy").select_columns(list(keys.values()))
    features = source.dataset.meta.features
    start = time.perf_counter()
    per_episode = []
    for begin, end in zip(source._episode_starts, source._episode_ends):
        rows = columns[int(begin):int(end)]
        per_episode.append(compute_episode_stats({k: rows[k] for k in keys.values()},
                                                 {k: features[k] for k in keys.values()}))
    theirs = aggregate_stats(per_episode)
    results["lerobot compute_episode_stats + aggregate_stats"] = {
        "samples_per_s": n / (time.perf_counter() - start)}

    data = columns[:]  # the benchmark may hold the data to compute the exact reference
    for name, stats in (("vibe-rl compute_norm_stats (frames)", ours), (
            "lerobot compute_episode_stats + aggregate_stats", theirs)):
        errors = {}
        for short, key in keys.items():
            exact = np.quantile(data[key].astype(np.float64), [0.01, 0.99], axis=0)
            spread = exact[1] - exact[0]
            got = ((stats[short].q01, stats[short].q99) if short in stats and hasattr(
                stats[short], "q01") else (stats[key]["q01"], stats[key]["q99"]))
            errors[short] = float(np.max(np.abs(np.stack(got) - exact) / spread))
        results[name]["max_quantile_error_over_spread"] = errors
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--frames", type=int, default=200, help="frames per episode")
    parser.add_argument("--state-dim", type=int, default=14)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers compared to 0")
    parser.add_argument("--images", action="store_true")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--root", default=None, help="dataset dir to (re)use; default: a temp dir")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="vibe_data_bench_"))
    os.environ.setdefault("HF_HOME", str(tmp / "hf"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    from common import lerobot_data as ld

    root = pathlib.Path(args.root) if args.root else tmp / "dataset"
    try:
        if not (root / "meta" / "info.json").exists():
            start = time.perf_counter()
            make_dataset(root, args)
            print(f"generated {args.episodes} x {args.frames} frames in "
                  f"{time.perf_counter() - start:.1f} s at {root}")
        image_keys = (IMAGE_KEY,) if args.images else ()
        config = ld.DataConfig(repo_id="bench/data", root=str(root), action_horizon=args.horizon,
                               batch_size=args.batch_size, image_keys=image_keys)
        source = ld.open_dataset(config)
        report = {"setup": {k: v for k, v in vars(args).items() if k not in ("root", "json")},
                  "frames": len(source)}
        report["loaders_samples_per_s"] = loader_throughput(args, config, source)
        print(f"\n(a) loader throughput, batch {args.batch_size}, action chunks of {args.horizon}, "
              f"{len(source)} frames{' + images' if args.images else ''}:")
        for name, value in report["loaders_samples_per_s"].items():
            print(f"  {name:<48} {value:>10,.0f} samples/s")
        wait = data_wait_share(args, config, source)
        if wait:
            report["data_wait"] = wait
            print(f"  JAX stand-in flow step {wait['step_ms']:.1f} ms, waiting for data "
                  f"{wait['data_wait_ms']:.2f} ms = {100 * wait['data_wait_share']:.1f}% of step time")
        report["norm_stats"] = norm_stats_comparison(args, config, source)
        print("\n(b) norm stats:")
        for name, value in report["norm_stats"].items():
            error = value.get("max_quantile_error_over_spread")
            extra = (" | max |q - numpy| / (q99 - q01): " +
                     ", ".join(f"{k} {v:.2e}" for k, v in error.items())) if error else ""
            print(f"  {name:<50} {value['samples_per_s']:>10,.0f} samples/s{extra}")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
