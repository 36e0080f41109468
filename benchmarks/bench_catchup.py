"""Catch-up speed of ``finfeat stream`` on Prism: weeks of backlog with realistic history.

    python benchmarks/bench_catchup.py [--events 430000 --days 45 --cards 5000 --merchants 10000]
                                       [--disorder-seconds 5] [--bound-seconds 5] [--commit-every-seconds 5]
                                       [--no-backfill] [--keep]

1. ``finfeat generate`` events (seed 7) over ``--days`` for ``--cards`` cards and ``--merchants``
   merchants, parsed once into canonical events (card numbers tokenized), untimed.
2. All of them published to a local broker (one partition, shuffled within ``--disorder-seconds``)
   before the job starts.
3. ``finfeat stream --stop-after-idle`` on Prism drains the topic into a Delta feature table.
   Printed: events/s until caught up (rows / seconds from the job's start to its last commit, and
   rows / seconds between its first and last commit), and the peak RSS of the job's processes (the
   driver with its in-process SDK worker, and Prism), sampled every 0.5 s.
4. ``finfeat backfill`` of the same canonical events into another warehouse (timed too), and the
   two feature tables compared row by row: they must be identical.

Everything runs on 127.0.0.1 and is removed at the end (``--keep`` keeps the work folder).
Nothing is asserted; it prints a table (and exits 1 when the tables differ).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finfeat.jobs.kafka.broker import LocalKafka  # noqa: E402

PRISM = REPO / ".cache" / "prism" / "bin" / "prism"
TOKEN_KEY = "bench-key-0123456789abcdef"


def canonical_events(folder: Path, *, events: int, days: int, cards: int, merchants: int) -> Path:
    from finfeat.jobs.generate import generate
    from finfeat.jobs.sources import parse_files
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.parse import CardTokenizer

    raw = folder / f"generated_{events}_{days}d_{cards}c_{merchants}m.parquet"
    out = folder / f"canonical_{raw.stem}.parquet"
    if not out.exists():
        print(f"generating {events:,} events over {days} days for {cards:,} cards -> {raw}", file=sys.stderr)
        generate(out=raw, events=events, seed=7, days=days, cards=cards, merchants=merchants)
        table, rejected = parse_files([raw], Mapping.load("generated"), CardTokenizer(TOKEN_KEY.encode()),
                                      run_id="bench")
        if rejected:
            print(f"{rejected} generated records were rejected by the parser", file=sys.stderr)
        pq.write_table(table, out)
    return out


def _tree_rss_kib(pid: int) -> int:
    """RSS of ``pid`` and its descendants, KiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[int(entry.name)] = int(line.split()[1])
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


class PeakRss(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak_kib, self._done = pid, every_s, 0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.peak_kib = max(self.peak_kib, _tree_rss_kib(self.pid))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_kib


def commit_times(table: Path) -> list[tuple[float, int]]:
    """(commit time s, rows added) per Delta commit, in version order."""
    from deltalake import DeltaTable

    history = sorted(DeltaTable(str(table)).history(), key=lambda h: h["version"])
    return [(h["timestamp"] / 1000, int((h.get("operationMetrics") or {}).get("num_added_rows", 0)))
            for h in history]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=430_000)
    ap.add_argument("--days", type=int, default=45)
    ap.add_argument("--cards", type=int, default=5000)
    ap.add_argument("--merchants", type=int, default=10_000)
    ap.add_argument("--disorder-seconds", type=float, default=5.0)
    ap.add_argument("--bound-seconds", type=float, default=5.0)
    ap.add_argument("--commit-every-seconds", type=float, default=5.0)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--cache", default=str(REPO / "out" / "bench_catchup"), help="generated data is kept here")
    ap.add_argument("--no-backfill", action="store_true", help="skip the backfill and the comparison")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, tables)")
    args = ap.parse_args()
    if not PRISM.exists():
        print(f"no Prism binary at {PRISM}: make prism", file=sys.stderr)
        return 2
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    events_path = canonical_events(cache, events=args.events, days=args.days, cards=args.cards,
                                   merchants=args.merchants)
    events = pq.read_table(events_path)
    n = events.num_rows
    work = Path(tempfile.mkdtemp(prefix="finfeat-bench-catchup-"))
    env = {**os.environ, "FINFEAT_TOKEN_KEY": TOKEN_KEY}
    result: dict[str, object] = {}
    try:
        with LocalKafka() as kafka:
            from finfeat.jobs.produce import produce

            started = time.monotonic()
            produce(events, bootstrap=kafka.bootstrap, topic="backlog", disorder_us=int(args.disorder_seconds * 1e6))
            print(f"published {n:,} events in {time.monotonic() - started:.1f} s", file=sys.stderr)
            wh, log = work / "wh-stream", work / "stream.log"
            cmd = [sys.executable, "-m", "finfeat.jobs.cli", "stream", "--bootstrap", kafka.bootstrap,
                   "--topic", "backlog", "--warehouse", str(wh), "--bound-seconds", str(args.bound_seconds),
                   "--commit-every-seconds", str(args.commit_every_seconds),
                   "--stop-after-idle", str(args.idle_seconds), f"--prism_location={PRISM}"]
            t0 = time.time()
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            rss = PeakRss(proc.pid)
            rss.start()
            rc = proc.wait()
            peak = rss.stop()
            if rc != 0:
                print(log.read_text()[-4000:], file=sys.stderr)
                print(f"the stream job exited {rc}", file=sys.stderr)
                return 1
            done = commit_times(wh / "features")
            rows = sum(r for _, r in done)
            last = done[-1][0]
            result.update(stream_rows=rows, commits=len(done), to_last_commit_s=last - t0,
                          rate_from_start=rows / (last - t0),
                          rate_first_to_last=(rows - done[0][1]) / (last - done[0][0]) if len(done) > 1 else
                          float("nan"), peak_rss_mib=peak / 1024)
        if not args.no_backfill:
            t = events.column("event_time")
            lo, hi = pc.min(t).as_py().date().isoformat(), pc.max(t).as_py().date().isoformat()
            bwh = work / "wh-backfill"
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "finfeat.jobs.cli", "backfill", "--input", str(events_path),
                            "--mapping", "canonical", "--start", lo, "--end", hi, "--warehouse", str(bwh),
                            "--no-validate"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
            result["backfill_s"] = time.monotonic() - started
            from finfeat.jobs.delta import read_table

            ours = read_table(wh / "features").sort_by("txn_id")
            theirs = read_table(bwh / "features").sort_by("txn_id")
            ours = ours.select(theirs.column_names).cast(theirs.schema)
            result["identical"] = ours.equals(theirs)
            if not result["identical"]:
                same_ids = ours.column("txn_id").equals(theirs.column("txn_id"))
                differing = [c for c in theirs.column_names if same_ids and not ours.column(c).equals(theirs.column(c))]
                result["difference"] = (f"stream {ours.num_rows:,} rows, backfill {theirs.num_rows:,}; "
                                        f"columns differing: {differing if same_ids else 'txn ids differ'}")
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nfinfeat stream catch-up on Prism, {os.cpu_count()} cores, load average at the end "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"backlog: {n:,} events, {args.days} days, {args.cards:,} cards, {args.merchants:,} merchants, "
          f"disorder {args.disorder_seconds:g} s; job: bound {args.bound_seconds:g} s, "
          f"commit every {args.commit_every_seconds:g} s")
    print(f"{'rows':>10}{'commits':>9}{'s to last commit':>18}{'events/s':>10}{'first→last ev/s':>17}"
          f"{'peak RSS MiB':>14}{'backfill s':>12}  identical to backfill")
    print(f"{result['stream_rows']:>10,}{result['commits']:>9}{result['to_last_commit_s']:>18.1f}"
          f"{result['rate_from_start']:>10,.0f}{result['rate_first_to_last']:>17,.0f}{result['peak_rss_mib']:>14,.0f}"
          f"{result.get('backfill_s', float('nan')):>12.1f}  {result.get('identical', 'not compared')}")
    if "difference" in result:
        print(result["difference"])
    return 0 if result.get("identical", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
