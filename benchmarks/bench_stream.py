"""Freshness of ``finfeat stream`` on Prism: produce -> Delta commit, at steady rates, and capacity.

    python benchmarks/bench_stream.py [--rates 1000,5000] [--seconds 20] [--bound-seconds 1]
                                      [--emit-every-ms 200] [--commit-every-seconds 1] [--backlog 60000]

For each rate: a throwaway Kafka broker topic, the stream job (``finfeat stream`` on Prism,
``--stop-after-idle``) started first and warmed up, then synthetic transactions published at
that steady rate for ``--seconds``, each stamped with its wall-clock send time as event time
(so the watermark moves with the clock). Freshness of a transaction = the commit timestamp of
the Delta commit that made its feature row visible (``commitInfo.timestamp``) minus the time
it was handed to the Kafka producer. It includes the bound on out-of-orderness (the watermark
lags the newest event by it), the emit tick, the commit interval and the Delta write.
Transactions of the last ``bound + 2`` seconds are left out: at the end of a run the watermark
only moves again at the idle stop.

"lag" compares the median freshness of the first and the last fifth of the run: a job that
keeps up has flat freshness; one that falls behind has freshness growing with time.

Then the capacity: ``--backlog`` transactions published before the job starts, and the rate at
which the job commits them (rows / time between its first and last commit): the sustained
throughput before lag would grow, on this machine.

Everything runs on 127.0.0.1 and is stopped at the end. Nothing is asserted; it prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finfeat.jobs.kafka.broker import LocalKafka  # noqa: E402
from finfeat.jobs.kafka.messages import SCHEMA  # noqa: E402

PRISM = REPO / ".cache" / "prism" / "bin" / "prism"
TOKEN_KEY = "bench-key-0123456789abcdef"
CATEGORIES = ["grocery_pos", "gas_transport", "shopping_net", "food_dining", "misc_pos", "travel"]


class Synthetic:
    """Canonical transactions over ``cards`` cards and ``merchants`` merchants (Zipf-like
    popularity), as message prefixes to which the event time is appended at send time."""

    def __init__(self, n: int, *, cards: int = 50_000, merchants: int = 5_000, seed: int = 3,
                 prefix: str = "b") -> None:
        rng = np.random.default_rng(seed)
        card = rng.integers(0, cards, n)
        merchant = np.minimum(rng.zipf(1.3, n) - 1, merchants - 1)
        amount = np.maximum(1, rng.lognormal(7.5, 1.0, n)).astype(np.int64)
        mlat, mlon = 25 + (merchant % 97) * 0.2, -120 + (merchant % 89) * 0.5
        self.prefixes = []
        for i in range(n):
            m = int(merchant[i])
            cat = CATEGORIES[m % len(CATEGORIES)]
            rec = {"schema": SCHEMA, "txn_id": f"{prefix}{i:08d}", "card_token": f"tok_{int(card[i]):032x}",
                   "merchant_id": f"m{m:05d}", "merchant_category": cat, "amount_minor": int(amount[i]),
                   "currency": "USD", "channel": "online" if cat.endswith("_net") else "pos",
                   "card_lat": 40.0, "card_lon": -74.0, "merchant_lat": float(mlat[i]),
                   "merchant_lon": float(mlon[i]), "is_fraud": False}
            self.prefixes.append((rec["card_token"].encode(), json.dumps(rec, separators=(",", ":"))[:-1].encode()))

    @staticmethod
    def message(prefix: bytes, t: float) -> bytes:
        stamp = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return prefix + b',"event_time":"' + stamp.encode() + b'"}'


def producer(bootstrap: str):  # noqa: ANN201
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": 1,
                     "queue.buffering.max.messages": 1_000_000})


def publish(bootstrap: str, topic: str, data: Synthetic, rate: float, *, start: int = 0,
            count: int | None = None, event_time_of=None) -> np.ndarray:  # noqa: ANN001
    """Send ``count`` messages at ``rate``/s (0: as fast as possible); returns the send times."""
    p = producer(bootstrap)
    count = len(data.prefixes) - start if count is None else count
    sent = np.zeros(count)
    t0 = time.time()
    for j in range(count):
        if rate:
            due = t0 + j / rate
            now = time.time()
            if due > now + 0.002:
                p.poll(0)
                time.sleep(due - now)
        now = time.time()
        key, prefix = data.prefixes[start + j]
        value = Synthetic.message(prefix, event_time_of(j) if event_time_of else now)
        while True:
            try:
                p.produce(topic, key=key, value=value)
                break
            except BufferError:
                p.poll(0.01)
        sent[j] = now
        if j % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    return sent


def start_job(bootstrap: str, topic: str, warehouse: Path, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finfeat.jobs.cli", "stream", "--bootstrap", bootstrap, "--topic", topic,
           "--warehouse", str(warehouse), "--bound-seconds", str(args.bound_seconds),
           "--emit-every-ms", str(args.emit_every_ms), "--commit-every-seconds", str(args.commit_every_seconds),
           "--stop-after-idle", str(args.idle_seconds), f"--prism_location={PRISM}"]
    env = {**os.environ, "FINFEAT_TOKEN_KEY": TOKEN_KEY}
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_job(proc: subprocess.Popen, timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def commits(table: Path) -> list[tuple[float, list[str]]]:
    """Each commit of the Delta table: (commit time in s, txn ids it added), in version order."""
    out = []
    log = table / "_delta_log"
    if not log.is_dir():
        return out
    for entry in sorted(log.glob("*.json")):
        ts, files = None, []
        for line in entry.read_text().splitlines():
            action = json.loads(line)
            if "commitInfo" in action:
                ts = action["commitInfo"]["timestamp"] / 1000
            elif "add" in action:
                files.append(table / unquote(action["add"]["path"]))
        ids: list[str] = []
        for f in files:
            ids += pq.read_table(f, columns=["txn_id"]).column("txn_id").to_pylist()
        out.append((ts, ids))
    return out


def wait_for_rows(table: Path, n: int, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(ids) for _, ids in commits(table)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the job did not commit {n} warm-up rows; see its log")
        time.sleep(0.2)


def steady(kafka: LocalKafka, rate: int, args: argparse.Namespace, work: Path) -> dict:
    topic, wh, log = f"steady-{rate}", work / f"wh-{rate}", work / f"stream-{rate}.log"
    n = int(rate * (args.warmup_seconds + args.seconds))
    data = Synthetic(n, prefix=f"s{rate}-", seed=rate)
    publish(kafka.bootstrap, topic, Synthetic(1, prefix=f"w{rate}-"), 0,
            event_time_of=lambda j: time.time() - 60)  # the topic exists before the job lists its partitions
    proc = start_job(kafka.bootstrap, topic, wh, log, args)
    try:
        t0 = time.time()
        sent = publish(kafka.bootstrap, topic, data, rate)
        produce_s = time.time() - t0
        rc = stop_job(proc, args.seconds * 10 + 120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    visible: dict[str, float] = {}
    for ts, ids in commits(wh / "features"):
        for txn in ids:
            visible.setdefault(txn, ts)
    ids = [f"s{rate}-{i:08d}" for i in range(n)]
    missing = sum(1 for txn in ids if txn not in visible)
    # measured: sends after the warm-up (Prism start, catching up), before the end's watermark stall
    keep = (sent >= t0 + args.warmup_seconds) & (sent < sent[-1] - args.bound_seconds - 2)
    fresh = np.array([visible.get(txn, np.nan) for txn in ids]) - sent
    measured = fresh[keep & ~np.isnan(fresh)]
    if measured.size == 0:
        return {"case": f"steady {rate:,}/s", "events": n, "error": "nothing committed", "log": str(log), "rc": rc}
    fifth = max(1, len(measured) // 5)
    return {"case": f"steady {rate:,}/s", "events": n, "measured": int(measured.size), "produced/s": n / produce_s,
            "p50": float(np.percentile(measured, 50)), "p99": float(np.percentile(measured, 99)),
            "max": float(measured.max()), "lag": float(np.median(measured[-fifth:]) - np.median(measured[:fifth])),
            "missing": missing, "rc": rc, "log": str(log)}


def backlog(kafka: LocalKafka, n: int, args: argparse.Namespace, work: Path) -> dict:
    topic, wh, log = "backlog", work / "wh-backlog", work / "stream-backlog.log"
    data = Synthetic(n, prefix="k", seed=99)
    now = time.time()
    step = 1 / 5000  # event times 5,000/s apart, ending now
    publish(kafka.bootstrap, topic, data, 0, event_time_of=lambda j: now - (n - j) * step)
    t0 = time.time()
    proc = start_job(kafka.bootstrap, topic, wh, log, args)
    rc = stop_job(proc, 600)
    wall = time.time() - t0
    done = commits(wh / "features")
    rows = sum(len(ids) for _, ids in done)
    first_ts, first_ids = done[0] if done else (t0, [])
    last_ts = done[-1][0] if done else t0
    rate = (rows - len(first_ids)) / (last_ts - first_ts) if len(done) > 1 else float("nan")
    return {"case": f"backlog {n:,}", "events": n, "rows": rows, "commits": len(done), "wall": wall,
            "throughput": rate, "rc": rc, "log": str(log)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--seconds", type=float, default=20, help="measured seconds per rate")
    ap.add_argument("--warmup-seconds", type=float, default=8, help="published first, not measured")
    ap.add_argument("--bound-seconds", type=float, default=1.0)
    ap.add_argument("--emit-every-ms", type=int, default=200)
    ap.add_argument("--commit-every-seconds", type=float, default=1.0)
    ap.add_argument("--idle-seconds", type=float, default=4.0)
    ap.add_argument("--backlog", type=int, default=60_000, help="0 skips the capacity run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, tables)")
    args = ap.parse_args()
    if not PRISM.exists():
        print(f"no Prism binary at {PRISM}: make prism", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="finfeat-bench-stream-"))
    results = []
    try:
        with LocalKafka() as kafka:
            for rate in [int(r) for r in args.rates.split(",") if r]:
                results.append(steady(kafka, rate, args, work))
                print(json.dumps(results[-1]), flush=True)
            if args.backlog:
                results.append(backlog(kafka, args.backlog, args, work))
                print(json.dumps(results[-1]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nfinfeat stream on Prism, {os.cpu_count()} cores; bound {args.bound_seconds:g} s, "
          f"emit tick {args.emit_every_ms} ms, commit every {args.commit_every_seconds:g} s")
    print(f"{'case':<18}{'events':>9}{'sent/s':>9}{'p50 s':>8}{'p99 s':>8}{'max s':>8}{'lag s':>8}{'missing':>9}")
    for r in results:
        if r["case"].startswith("steady") and "error" in r:
            print(f"{r['case']:<18}{r['events']:>9,}  {r['error']} (see {r['log']})")
        elif r["case"].startswith("steady"):
            print(f"{r['case']:<18}{r['events']:>9,}{r['produced/s']:>9,.0f}{r['p50']:>8.2f}{r['p99']:>8.2f}"
                  f"{r['max']:>8.2f}{r['lag']:>8.2f}{r['missing']:>9,}")
    for r in results:
        if r["case"].startswith("backlog"):
            print(f"capacity: {r['rows']:,} of {r['events']:,} backlog events in {r['commits']} commits, "
                  f"{r['throughput']:,.0f} events/s between first and last commit ({r['wall']:.1f} s wall "
                  f"incl. start-up and idle stop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
