"""Round-trip latency and throughput of a served MLP policy, next to a bare websocket+msgpack echo.

    python bench/serve_latency.py                                  # trains a tiny cartpole_ppo run first
    python bench/serve_latency.py --checkpoint-dir checkpoints/cartpole_ppo/run1 --requests 5000

Both servers run in their own process (scripts/serve_policy.py, and this script
with --serve-echo), the clients in this one (asyncio websockets clients, one
request in flight per client; no framework imported, GC off while timing). The echo server decodes each request and sends
it back re-encoded: the floor of the protocol (websocket + msgpack-numpy both
ways) with no policy. Reported: p50/p99 round trip and requests/s for 1 and
for N concurrent clients, the served-policy overhead over the echo, and the
Policy load and warm-up times the server logs, for both backends (the
checkpoint is converted to the other backend with scripts/convert_checkpoint.py
and that server started once just for its load times; --backend picks which
backend's server the latency rounds use). Rounds alternate echo and policy
so background load hits both alike; the median round (by p50) is reported.
Targets (issue 5): overhead <= 0.3 ms p50 with one client; N-client throughput
>= 2x one client's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import wire  # noqa: E402


# ----------------------------------------------------------------- echo server (subprocess)


async def _echo_main() -> None:
    from websockets.asyncio.server import serve

    async def handler(ws):
        async for message in ws:
            await ws.send(wire.packb(wire.unpackb(message)))

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


def _start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen, int]:
    """Start a server process and read its port from the first output line matching `pattern`."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        match = re.search(pattern, line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not start")


# ----------------------------------------------------------------- clients


async def _client(port: int, obs: dict, n: int, first_frame: bool, out: list[float]) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None) as ws:
        if first_frame:
            wire.unpackb(await ws.recv())  # metadata
        for _ in range(n):
            start = time.perf_counter()
            await ws.send(wire.packb(obs))
            reply = await ws.recv()
            if isinstance(reply, str):
                raise RuntimeError(f"server error: {reply}")
            wire.unpackb(reply)
            out.append(time.perf_counter() - start)


def measure(port: int, obs: dict, clients: int, requests: int, warmup: int,
            metadata_first: bool) -> dict:

    async def run() -> tuple[list[float], float]:
        await asyncio.gather(*[_client(port, obs, warmup, metadata_first, []) for _ in range(clients)])
        latencies: list[float] = []
        start = time.perf_counter()
        await asyncio.gather(*[_client(port, obs, requests // clients, metadata_first, latencies)
                               for _ in range(clients)])
        return latencies, time.perf_counter() - start

    latencies, seconds = asyncio.run(run())
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_per_s": len(ms) / seconds}


# ----------------------------------------------------------------- main


def _tiny_checkpoint(base: pathlib.Path) -> pathlib.Path:
    """Train a 10-update cartpole_ppo run (a subprocess, so this process never loads JAX)."""
    subprocess.run([sys.executable, "scripts/train.py", "cartpole_ppo", "--exp-name", "bench",
                    "--checkpoint-base-dir", str(base), "--total-timesteps", "5120",
                    "--save-interval", "10", "--no-progress-bar"],
                   cwd=REPO, check=True, capture_output=True)
    return base / "cartpole_ppo" / "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-dir", help="step or run directory (default: train a tiny one)")
    parser.add_argument("--requests", type=int, default=3000, help="timed requests per measurement")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per client first")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the 2nd case")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=("jax", "torch"),
                        help="backend of the measured server (default: the checkpoint's own)")
    parser.add_argument("--output", default=str(REPO / "bench/results/serve_latency.json"))
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(_echo_main())
        return

    # This process only runs clients: no framework is imported here, and the collector is off
    # while measuring, so neither adds pauses the servers did not cause.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint_dir or str(_tiny_checkpoint(pathlib.Path(tmp)))
        # Load and warm-up of both backends, one server at a time (none runs during the rounds).
        by_backend = _checkpoints_for_both_backends(checkpoint, pathlib.Path(tmp))
        backend = args.backend or next(iter(by_backend))
        startup = {}
        for name in sorted(by_backend, key=lambda b: b == backend):  # the measured one last
            served, policy_port, log, ready_s = _start_policy(by_backend[name], args.clients)
            load_s, warmup_s = (float(x) for x in re.search(
                r"Loaded \w+ policy .* in ([\d.]+) s, warm-up ([\d.]+) s", "".join(log)).groups())
            startup[name] = {"load_s": load_s, "warmup_s": warmup_s, "process_start_to_serving_s":
                             ready_s}
            if name != backend:
                served.terminate()
                served.wait(timeout=30)
        echo, echo_port = _start([sys.executable, __file__, "--serve-echo"], r"PORT (\d+)")
        obs = _observation(policy_port)
        rounds: dict[str, list[dict]] = {f"{kind}_{n}": [] for kind in ("echo", "policy")
                                         for n in (1, args.clients)}
        gc.disable()
        try:
            for _ in range(args.rounds):
                for n in (1, args.clients):
                    rounds[f"echo_{n}"].append(
                        measure(echo_port, obs, n, args.requests, args.warmup, False))
                    rounds[f"policy_{n}"].append(
                        measure(policy_port, obs, n, args.requests, args.warmup, True))
        finally:
            gc.enable()
            for proc in (echo, served):
                proc.terminate()
                proc.wait(timeout=30)
            time.sleep(0.5)  # let the log reader take the server's closing summary
    summary_line = next((line.strip() for line in reversed(log) if "mean batch" in line), "")

    result = {name: sorted(rs, key=lambda r: r["p50_ms"])[len(rs) // 2] for name, rs in rounds.items()}
    n = args.clients
    summary = {
        "checkpoint": checkpoint if args.checkpoint_dir else "tiny cartpole_ppo run (5120 steps)",
        "served_backend": backend,
        "policy_load_s": {name: s["load_s"] for name, s in startup.items()},
        "policy_warmup_s": {**{name: s["warmup_s"] for name, s in startup.items()},
                            "batches": f"1..{n}"},
        "process_start_to_serving_s": {name: s["process_start_to_serving_s"]
                                       for name, s in startup.items()},
        "overhead_p50_ms_1_client": result["policy_1"]["p50_ms"] - result["echo_1"]["p50_ms"],
        "throughput_ratio_policy": result[f"policy_{n}"]["req_per_s"] / result["policy_1"]["req_per_s"],
        "load_average": os.getloadavg(),
        "server_summary": summary_line,
        "results": result,
        "all_rounds": rounds,
    }
    print(f"\n{'case':<18}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>10}")
    for name, r in result.items():
        print(f"{name:<18}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['req_per_s']:>10.0f}")
    print(f"served-policy overhead over echo, 1 client, p50: "
          f"{summary['overhead_p50_ms_1_client']:.3f} ms (target <= 0.3)")
    print(f"policy throughput {n} clients / 1 client: {summary['throughput_ratio_policy']:.2f}x "
          f"(target >= 2)")
    print(f"(latency rounds against the {backend} server)")
    for name, s in sorted(startup.items()):
        print(f"Policy load ({name}): {s['load_s']:.2f} s, warm-up (batches 1..{n}): "
              f"{s['warmup_s']:.2f} s; process start to serving: "
              f"{s['process_start_to_serving_s']:.2f} s")
    print(f"server's own summary: {summary_line}")
    print(f"load average during the run: {summary['load_average'][0]:.1f} "
          f"(median of {args.rounds} rounds reported)")
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


def _checkpoints_for_both_backends(checkpoint: str, tmp: pathlib.Path) -> dict[str, str]:
    """{backend: checkpoint}: the given one first, then its conversion to the other backend."""
    from common import policy as policy_lib  # framework-free

    step_dir = policy_lib.resolve_step_dir(checkpoint)
    source = policy_lib.detect_backend(step_dir)
    other = "torch" if source == "jax" else "jax"
    subprocess.run([sys.executable, "scripts/convert_checkpoint.py", "--checkpoint-dir",
                    str(step_dir), "--to", other, "--output", str(tmp / other), "--no-verify"],
                   cwd=REPO, check=True, capture_output=True)
    return {source: str(step_dir), other: str(tmp / other / step_dir.name)}


def _start_policy(checkpoint: str, max_batch: int) -> tuple[subprocess.Popen, int, list[str], float]:
    """scripts/serve_policy.py on a free port; returns it, its port, its log (kept growing) and
    the seconds from process start to serving."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "scripts/serve_policy.py", "--policy.dir", checkpoint, "--port", "0",
         "--max-batch", str(max_batch)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        match = re.search(r"Serving policy on ws://[^:]+:(\d+)", line)
        if match:
            threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
            return proc, int(match.group(1)), log, time.perf_counter() - start
    raise RuntimeError("serve_policy.py did not start:\n" + "".join(log))


def _observation(port: int) -> dict:
    """A random observation of the shape and dtype the server's metadata announces."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
        spec = wire.unpackb(ws.recv(timeout=30))["observation_spec"]
    rng = np.random.default_rng(0)
    return {key: rng.standard_normal(s["shape"]).astype(s["dtype"]) for key, s in spec.items()}


if __name__ == "__main__":
    main()
