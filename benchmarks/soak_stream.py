"""Soak test of ``finfeat stream`` on Prism: a steady rate for a long time, sampled every minute.

    python benchmarks/soak_stream.py [--minutes 30] [--rate 1000] [--bound-seconds 1]
                                     [--emit-every-ms 200] [--commit-every-seconds 1] [--sample-every 10]

A local broker, a throwaway ``redis-server`` as the online store, and the stream job started
once (no idle stop). A publisher process sends synthetic transactions (``bench_stream.Synthetic``:
50k cards, Zipf-like merchants) at ``--rate`` per second, event time = send time, one batch of
data per minute; a poller process follows every ``--sample-every``-th transaction in the online
store (as ``bench_stream.py`` does). Every minute the job's RSS (the driver with its in-process
SDK worker, and Prism) is sampled. When the publisher is done, a table is made from what the
running job committed, one row per minute of sending: produce -> online store visibility and
produce -> Delta commit of the feature row, p50 / p99 in seconds, rows not there yet, and the
RSS; then the job gets SIGTERM (it drains and exits 0) and the time it takes to exit is printed. Flat columns mean
the job keeps up and does not grow. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_catchup import _tree_rss_kib  # noqa: E402
from bench_stream import PRISM, REPO, TOKEN_KEY, Synthetic, commits, publish  # noqa: E402

from finfeat.jobs.kafka.broker import LocalKafka  # noqa: E402
from finfeat.jobs.online.local_redis import RedisServerMissing, running_redis  # noqa: E402

CARDS = 50_000


def _prefix(minute: int) -> str:
    return f"k{minute:04d}-"


def _publisher(bootstrap: str, topic: str, rate: int, minutes: int, t0: float, work: str) -> None:
    """Minute m's ``rate * 60`` messages, message j due at ``t0 + 60 m + j / rate``."""
    for m in range(minutes):
        data = Synthetic(rate * 60, cards=CARDS, prefix=_prefix(m), seed=1000 + m)
        sent = publish(bootstrap, topic, data, rate, t0=t0 + 60 * m)
        np.save(Path(work) / f"sent-{m:04d}.npy", sent)


def _poller(url: str, rate: int, minutes: int, every: int, t0: float, out: str, stop) -> None:  # noqa: ANN001
    """Follows every ``every``-th transaction in the store from its due time on; writes
    ``{txn id: first time seen}`` when stopped."""
    from finfeat.jobs.online import open_store
    from finfeat.jobs.online.base import EntityState
    from finfeat.transforms.spec import FeatureSpec

    store = open_store(url, FeatureSpec.default())
    n = rate * 60
    seen: dict[str, float] = {}
    following: dict[str, str] = {}
    minute, j, cards = 0, 0, None
    try:
        while not stop.is_set():
            started = time.time()
            while minute < minutes:
                if cards is None:  # the same draws as Synthetic(seed=1000 + minute): cards first
                    cards = np.random.default_rng(1000 + minute).integers(0, CARDS, n)
                due = t0 + 60 * minute + j / rate
                if due > started:
                    break
                following[f"{_prefix(minute)}{j:08d}"] = f"tok_{int(cards[j]):032x}"
                j += every
                if j >= n:
                    minute, j, cards = minute + 1, 0, None
            if following:
                states = store.read_states([("card", c) for c in sorted(set(following.values()))])
                now = time.time()
                held = {s.key: {e.txn_id for e in s.events} for s in states if isinstance(s, EntityState)}
                for txn, card in list(following.items()):
                    if txn in held.get(card, ()):
                        seen[txn] = now
                        del following[txn]
            rest = 0.005 - (time.time() - started)
            if rest > 0:
                time.sleep(rest)
    finally:
        store.close()
        Path(out).write_text(json.dumps(seen))


def _table(args: argparse.Namespace, work: Path, wh: Path, rss_mib: list[float]) -> list[tuple]:
    """One row per minute of sending: freshness in the store and in Delta, and the RSS."""
    delta_at: dict[str, float] = {}
    for ts, ids in commits(wh / "features"):
        for txn in ids:
            delta_at.setdefault(txn, ts)
    seen = work / "seen.json"
    online_at = json.loads(seen.read_text()) if seen.exists() else {}
    rows = []
    for m in range(args.minutes):
        path = work / f"sent-{m:04d}.npy"
        if not path.exists():
            break
        sent = np.load(path)
        ids = [f"{_prefix(m)}{j:08d}" for j in range(len(sent))]
        d = np.array([delta_at.get(t, np.nan) for t in ids]) - sent
        followed = list(range(0, len(sent), args.sample_every))
        o = np.array([online_at.get(ids[j], np.nan) for j in followed]) - sent[followed]
        rows.append((m + 1, len(sent), len(sent) / (sent[-1] - sent[0] + 1 / args.rate),
                     *_p50_p99(o), int(np.isnan(o).sum()), *_p50_p99(d), int(np.isnan(d).sum()),
                     rss_mib[m] if m < len(rss_mib) else float("nan")))
    return rows


def _p50_p99(values: np.ndarray) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    return (float(np.percentile(values, 50)), float(np.percentile(values, 99))) if values.size else (np.nan, np.nan)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=int, default=30)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--bound-seconds", type=float, default=1.0)
    ap.add_argument("--emit-every-ms", type=int, default=200)
    ap.add_argument("--commit-every-seconds", type=float, default=1.0)
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--stop-timeout", type=float, default=600.0, help="seconds to wait for the job after SIGTERM")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not PRISM.exists():
        print(f"no Prism binary at {PRISM}: make prism", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="finfeat-soak-"))
    rss_mib: list[float] = []
    try:
        with ExitStack() as stack:
            try:
                redis = stack.enter_context(running_redis(work / "redis"))
            except RedisServerMissing as exc:
                raise SystemExit(str(exc)) from None
            url = f"redis://127.0.0.1:{redis.port}/0"
            kafka = stack.enter_context(LocalKafka())
            topic, wh, log = "soak", work / "wh", work / "stream.log"
            publish(kafka.bootstrap, topic, Synthetic(1, prefix="warm-"), 0,
                    event_time_of=lambda j: time.time() - 60)  # the topic exists before the job starts
            cmd = [sys.executable, "-m", "finfeat.jobs.cli", "stream", "--bootstrap", kafka.bootstrap,
                   "--topic", topic, "--warehouse", str(wh), "--bound-seconds", str(args.bound_seconds),
                   "--emit-every-ms", str(args.emit_every_ms),
                   "--commit-every-seconds", str(args.commit_every_seconds), "--online-store", url,
                   f"--prism_location={PRISM}"]
            with log.open("wb") as out:
                job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "FINFEAT_TOKEN_KEY": TOKEN_KEY},
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            t0 = time.time() + 15  # Prism's start
            pub = ctx.Process(target=_publisher, daemon=True,
                              args=(kafka.bootstrap, topic, args.rate, args.minutes, t0, str(work)))
            poll = ctx.Process(target=_poller, daemon=True,
                               args=(url, args.rate, args.minutes, args.sample_every, t0, str(work / "seen.json"),
                                     stop))
            pub.start()
            poll.start()
            try:
                for m in range(args.minutes):
                    time.sleep(max(0.0, t0 + 60 * (m + 1) - time.time()))
                    if job.poll() is not None:
                        tail = log.read_bytes()[-6000:].decode(errors="replace")
                        raise SystemExit(f"{tail}\nthe job exited ({job.returncode}) in minute {m + 1} (its log ends "
                                         "above; --keep keeps the work folder)")
                    rss_mib.append(_tree_rss_kib(job.pid) / 1024)
                    print(f"minute {m + 1}: job RSS {rss_mib[-1]:,.0f} MiB", file=sys.stderr, flush=True)
                pub.join(120)
                time.sleep(args.bound_seconds + args.commit_every_seconds + 5)
                stop.set()
                poll.join(60)
                rows = _table(args, work, wh, rss_mib)  # before the stop: what the running job committed
                print(json.dumps(rows), file=sys.stderr, flush=True)
                stopped = time.monotonic()
                job.send_signal(signal.SIGTERM)
                try:
                    rc: int | str = job.wait(args.stop_timeout)
                except subprocess.TimeoutExpired:
                    rc = f"none: still running {args.stop_timeout:.0f} s after SIGTERM, killed"
                stop_s = time.monotonic() - stopped
            finally:
                stop.set()
                if job.poll() is None:
                    os.killpg(job.pid, signal.SIGKILL)
                    job.wait()
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nsoak: finfeat stream on Prism, {args.rate:,} events/s for {args.minutes} min, {os.cpu_count()} cores, "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; bound {args.bound_seconds:g} s, "
          f"emit tick {args.emit_every_ms} ms, commit every {args.commit_every_seconds:g} s; the job's exit code "
          f"after SIGTERM: {rc} ({stop_s:.1f} s to exit)")
    print(f"{'minute':>6}{'sent':>8}{'sent/s':>8}{'online p50':>12}{'p99':>8}{'missing':>9}"
          f"{'Delta p50':>11}{'p99':>8}{'missing':>9}{'RSS MiB':>9}")
    for r in rows:
        print(f"{r[0]:>6}{r[1]:>8,}{r[2]:>8,.0f}{r[3]:>12.3f}{r[4]:>8.3f}{r[5]:>9,}{r[6]:>11.3f}{r[7]:>8.3f}"
              f"{r[8]:>9,}{r[9]:>9,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
