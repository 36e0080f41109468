"""Load test of `finfeat serve`: concurrent HTTP clients against a real uvicorn process.

    python benchmarks/bench_serve.py [--backend sqlite|redis] [--concurrency 1,4,16,64] [--seconds 10]
                                     [--workers 1] [--batch 1] [--route features|score --model DIR]

1. Materializes the demo's events (data/sparkov, sparkov mapping, demo key, deduplicated) into a
   fresh SQLite file or a redis-server it starts on a free loopback port.
2. Starts `finfeat serve` on a free loopback port (bearer token on, as in production).
3. For each concurrency C: C keep-alive connections from one asyncio client process, each sending
   POST /features (or /score) with `--batch` random candidates (a card and a merchant of the
   data, a time within a day after it) back to back for `--seconds` after a 2 s warm-up, then
   prints requests/s and the latency p50 / p99 / p99.9 as the client saw it (connection wait
   included), and checks every answer was 200.

Nothing here is asserted; it prints.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_online import demo_events  # noqa: E402
from finfeat.jobs.online import materialize, open_store  # noqa: E402
from finfeat.jobs.online.local_redis import free_port, running_redis  # noqa: E402
from finfeat.transforms.spec import FeatureSpec  # noqa: E402

TOKEN_ENV = "FINFEAT_BENCH_TOKEN"
TOKEN = "bench-token"
DAY_US = 86_400_000_000


def candidates(events, n: int, seed: int = 3) -> list[dict]:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    cards = events.column("card_token").to_pylist()
    merchants = events.column("merchant_id").to_pylist()
    t_max = int(events.column("event_time").cast("int64").to_numpy().max())
    out = []
    for _ in range(n):
        i, j = int(rng.integers(len(cards))), int(rng.integers(len(merchants)))
        out.append({"card_token": cards[i], "merchant_id": merchants[j], "amount_minor": int(rng.integers(100, 50_000)),
                    "at_us": t_max + int(rng.integers(1, DAY_US))})
    return out


def start_server(store: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finfeat.jobs.cli", "serve", "--store", store, "--port", str(port),
           "--token-env", TOKEN_ENV, "--workers", str(args.workers), "--allow-missing"]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, env={**os.environ, TOKEN_ENV: TOKEN}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("finfeat serve did not become ready")


async def one_connection(port: int, bodies: list[bytes], path: str, stop_at: float, record_from: float,
                         lat: list[float], bad: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    k = 0
    try:
        while True:
            now = time.perf_counter()
            if now >= stop_at:
                break
            body = bodies[k % len(bodies)]
            k += 1
            head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            t0 = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            t1 = time.perf_counter()
            if t0 >= record_from:
                lat.append(t1 - t0)
                if not status_line.startswith(b"HTTP/1.1 200"):
                    bad.append(int(status_line.split()[1]))
    finally:
        writer.close()


async def load(port: int, bodies: list[bytes], path: str, concurrency: int, seconds: float) -> tuple[list[float], list[int], float]:
    lat: list[float] = []
    bad: list[int] = []
    start = time.perf_counter()
    record_from, stop_at = start + 2.0, start + 2.0 + seconds
    await asyncio.gather(*(one_connection(port, bodies[i::concurrency] or bodies, path, stop_at, record_from, lat, bad)
                           for i in range(concurrency)))
    return lat, bad, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["sqlite", "redis"], default="sqlite")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated numbers of connections")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per concurrency")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes")
    ap.add_argument("--batch", type=int, default=1, help="candidates per request")
    ap.add_argument("--route", choices=["features", "score"], default="features")
    ap.add_argument("--model", help="model folder (needed for --route score)")
    args = ap.parse_args()
    if args.route == "score" and not args.model:
        ap.error("--route score needs --model")
    events = demo_events()
    spec = FeatureSpec.default()
    cands = candidates(events, 4000)
    bodies = [json.dumps(cands[i] if args.batch == 1 else cands[i:i + args.batch]).encode()
              for i in range(0, len(cands) - args.batch + 1, args.batch)]
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if args.backend == "redis":
            store = stack.enter_context(running_redis(tmp)).url
        else:
            store = f"sqlite:{tmp / 'online.db'}"
        with open_store(store, spec) as s:
            materialize(s, events, spec)
        port = free_port()
        proc = start_server(store, port, args)
        stack.callback(proc.wait)
        stack.callback(proc.terminate)
        print(f"finfeat serve, {args.backend} store ({events.num_rows:,} demo events), {args.workers} worker(s), "
              f"POST /{args.route}, {args.batch} candidate(s) per request, {args.seconds:g} s per row; "
              f"load {os.getloadavg()[0]:.1f}")
        print("| connections | requests/s | candidates/s | p50 ms | p99 ms | p99.9 ms | errors |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in (int(x) for x in args.concurrency.split(",")):
            lat, bad, secs = asyncio.run(load(port, bodies, f"/{args.route}", c, args.seconds))
            ms = np.array(lat) * 1000
            rate = len(lat) / secs
            print(f"| {c} | {rate:,.0f} | {rate * args.batch:,.0f} | {np.percentile(ms, 50):.2f} | "
                  f"{np.percentile(ms, 99):.2f} | {np.percentile(ms, 99.9):.2f} | {len(bad)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
