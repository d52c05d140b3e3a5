"""`rematch serve` under load: dynamic batching vs one request at a time, side by side.

Starts the real server (``rematch serve`` in a subprocess, loopback only) twice on the
same model: once with dynamic batching (``--max-batch 32 --max-wait-ms 5``) and once
serving one request per forward (``--max-batch 1 --max-wait-ms 0``). N concurrent
clients each send one-item /v1/embeddings requests (texts and small images, as data:
URLs) back to back for T seconds; the script reports throughput, p50/p99 latency, the
mean number of requests merged per forward (from /metrics) and the errors, which must be
zero. Bounded: every request has a timeout and each run stops after T seconds.

    python benchmarks/bench_serve.py                      # tiny model, CPU, 8 clients, 10 s each
    python benchmarks/bench_serve.py --clients 16 --seconds 30 --model tiny:small
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import date

import httpx
import numpy as np

from rematch.world.scenes import COLOURS, SHAPES, Scene, ShapeObject, caption, render

VARIANTS = (("dynamic batching", ["--max-batch", "32", "--max-wait-ms", "5"]),
            ("one at a time", ["--max-batch", "1", "--max-wait-ms", "0"]))


def make_inputs(count: int, image_size: int, seed: int = 0) -> list[dict | str]:
    """Half captions, half images (PNG data URLs) of the shapes world."""
    rng = random.Random(seed)
    inputs: list[dict | str] = []
    for index in range(count):
        scene = Scene((ShapeObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(["small", "large"]),
                                   rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)),))
        if index % 2 == 0:
            inputs.append(caption(scene))
            continue
        buffer = io.BytesIO()
        render(scene, side=image_size).save(buffer, format="PNG")
        inputs.append({"image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()})
    return inputs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: str, flags: list[str], port: int, threads: int) -> subprocess.Popen:
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "rematch.cli", "serve", "--model", model, "--allow-untrained", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *flags]
    return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL)


def wait_until_ready(url: str, process: subprocess.Popen, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f}s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def load(url: str, inputs: list, clients: int, seconds: float, timeout_s: float) -> dict:
    """``clients`` tasks sending one-item requests back to back until ``seconds`` pass."""
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    async def client(number: int, http: httpx.AsyncClient) -> None:
        position = number
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                answer = await http.post("/v1/embeddings", json={"input": [inputs[position % len(inputs)]]})
                if answer.status_code != 200 or len(answer.json()["data"]) != 1:
                    errors.append(f"status {answer.status_code}: {answer.text[:200]}")
                else:
                    latencies.append(time.perf_counter() - started)
            except httpx.HTTPError as error:
                errors.append(repr(error))
            position += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        began = time.perf_counter()
        await asyncio.gather(*(client(number, http) for number in range(clients)))
        elapsed = time.perf_counter() - began
    return {"latencies": np.array(latencies), "errors": errors, "seconds": elapsed}


def merged_per_forward(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {name: float(value) for name, value in
              re.findall(r"^rematch_batch_requests_(sum|count) ([0-9.e+]+)$", text, flags=re.MULTILINE)}
    return values.get("sum", 0.0) / max(values.get("count", 0.0), 1.0)


def run_variant(model: str, flags: list[str], inputs: list, args: argparse.Namespace) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(model, flags, port, args.threads)
    try:
        wait_until_ready(url, process)
        asyncio.run(load(url, inputs, args.clients, args.warmup, args.request_timeout))  # warm-up, not counted
        result = asyncio.run(load(url, inputs, args.clients, args.seconds, args.request_timeout))
        result["merged"] = merged_per_forward(url)
    finally:
        stop_server(process)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model spec given to rematch serve (default: tiny)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per variant")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server process")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    args = parser.parse_args()
    if not (1 <= args.clients <= 256 and 0 < args.seconds <= 600):
        parser.error("--clients must be 1-256 and --seconds 0-600 (the benchmark is bounded)")

    inputs = make_inputs(64, args.image_size)
    print(f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; model {args.model}, {args.clients} clients x {args.seconds:.0f} s, "
          f"one-item requests (1/2 text, 1/2 {args.image_size} px PNG data URLs), server torch threads "
          f"{args.threads}", flush=True)
    rows = []
    for name, flags in VARIANTS:
        result = run_variant(args.model, flags, inputs, args)
        latencies = result["latencies"] * 1000
        rows.append((name, " ".join(flags), len(latencies), len(latencies) / result["seconds"],
                     np.percentile(latencies, 50) if len(latencies) else float("nan"),
                     np.percentile(latencies, 99) if len(latencies) else float("nan"), result["merged"],
                     len(result["errors"])))
        for error in result["errors"][:5]:
            print(f"  {name}: error: {error}")
    print("\n| variant | flags | requests | throughput | p50 latency | p99 latency | requests per forward | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, flags, count, throughput, p50, p99, merged, errors in rows:
        print(f"| {name} | `{flags}` | {count} | {throughput:.1f} req/s | {p50:.1f} ms | {p99:.1f} ms | "
              f"{merged:.2f} | {errors} |")
    print(f"\ndynamic batching / one at a time: {rows[0][3] / max(rows[1][3], 1e-9):.2f}x throughput, "
          f"p50 {rows[0][4] / max(rows[1][4], 1e-9):.2f}x, p99 {rows[0][5] / max(rows[1][5], 1e-9):.2f}x")
    return 1 if any(row[-1] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
