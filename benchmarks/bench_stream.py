"""Freshness of ``finfeat stream`` on Prism or Flink: produce -> online store and -> Delta commit,
at steady rates, capacity, and (Flink) recovery after a TaskManager kill.

    python benchmarks/bench_stream.py [--rates 1000,5000] [--seconds 20] [--bound-seconds 1]
                                      [--emit-every-ms 200] [--commit-every-seconds 1] [--backlog 60000]
                                      [--batch-wait-ms 100] [--online-store redis|none] [--sample-every 10]
                                      [--feature-spec spec.yaml]
                                      [--engine beam|flink|beam,flink [--parallelism 1,2] [--recovery-rate 1000]
                                       [--recovery-seconds S]]

Engine: Prism (Beam's portable local runner), or with ``--engine flink`` the Flink job on a local
standalone cluster the script starts (``make flink``; free ports, one TaskManager with
``--parallelism`` slots, checkpoints every ``--checkpoint-interval-ms``); ``--engine beam,flink``
runs both back to back on the same broker and Redis, and ``--parallelism 1,2`` each parallelism
on a cluster of its own.

For each rate: a throwaway Kafka broker topic (one partition per unit of ``--parallelism``: a
source subtask without a partition would hold the watermark back), a database of a ``redis-server`` on 127.0.0.1
(no persistence), the stream job (``finfeat stream --online-store redis://...`` on Prism,
``--stop-after-idle``) started first and warmed up, then synthetic transactions published at
that steady rate for ``--seconds``, each stamped with its wall-clock send time as event time
(so the watermark moves with the clock). For Flink the schedule starts once the job reads its
topic (probe messages are in the online store; without a store: every task runs), so its start-up
(20-70 s here) is not measured; ``--warmup-seconds`` at the rate follow, not measured either.

* Online visibility of a transaction = the first time a poller (its own process, so that it
  does not share the publisher's interpreter) reads the card's state and finds the txn id
  among its events, minus the time it was handed to the Kafka producer. The poller follows
  every ``--sample-every``-th transaction sent after the warm-up, from its scheduled send time
  on, reading the cards of all followed, not yet visible transactions in one round trip per
  loop (at most one loop every 5 ms, so it does not starve the job of CPU); the time is taken
  when the read returns.
  The stream writes events to the store as soon as they are parsed (in the stage that reads
  Kafka), so
  this does not include the bound on out-of-orderness or the commit interval.
* Delta freshness = the commit timestamp of the Delta commit that made its feature row visible
  (``commitInfo.timestamp``) minus the send time. It includes the bound (the watermark lags the
  newest event by it), the emit tick, the commit interval and the Delta write. Transactions of
  the last ``bound + 2`` seconds are left out: at the end of a run the watermark only moves
  again at the idle stop.

"lag" compares the median freshness of the first and the last fifth of the run: a job that
keeps up has flat freshness; one that falls behind has freshness growing with time.

Then the capacity: ``--backlog`` transactions published before the job starts, and the rate at
which the job commits them (rows / time from the first message's arrival in the online store, when
the job starts reading, to its last commit; without a store, rows after the first commit / time
between its first and last commit): the sustained throughput before lag would grow, on this
machine (with the online store writes, unless ``--online-store none``).

Recovery (Flink, ``--recovery-rate``): a steady run whose TaskManager is killed (SIGKILL) a
quarter into the measured seconds and replaced by a new one at once, as a supervisor would;
recovery = the time from the kill to the first Delta commit after it whose rows' median freshness
is back under the p99 of the rows committed before the kill (at least 1 s): output current again;
and for the online store, to the first transaction sent after the kill that became visible within
the pre-kill online p99 (at least 0.5 s).

Everything runs on 127.0.0.1 and is stopped at the end. Nothing is asserted; it prints a table.
"""
from __future__ import annotations

import argparse
from contextlib import ExitStack
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
from finfeat.jobs.kafka.source import DEFAULT_BATCH_WAIT_S  # noqa: E402
from finfeat.jobs.produce import send  # noqa: E402
from finfeat.jobs.online.local_redis import RedisServerMissing, running_redis  # noqa: E402

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


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    """The topic with ``partitions`` partitions (one per source subtask of the job)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})  # held until the topic exists
    for future in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
        future.result(30)


def producer(bootstrap: str):  # noqa: ANN201
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": 1,
                     "queue.buffering.max.messages": 1_000_000})


def publish(bootstrap: str, topic: str, data: Synthetic, rate: float, *, start: int = 0,
            count: int | None = None, event_time_of=None, t0: float | None = None) -> np.ndarray:  # noqa: ANN001
    """Send ``count`` messages at ``rate``/s (0: as fast as possible), message ``j`` due at
    ``t0 + j / rate`` (``t0``: now unless given); returns the send times."""
    p = producer(bootstrap)
    count = len(data.prefixes) - start if count is None else count
    sent = np.zeros(count)
    if t0 is None:
        t0 = time.time()
    elif t0 > time.time():
        time.sleep(t0 - time.time())
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
        send(p, topic, key, value, backoff_s=0.01)
        sent[j] = now
        if j % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    return sent


def poll_visibility(url: str, spec_path: str | None, samples: list[tuple[float, str, str]], out: str,
                    stop, period_s: float = 0.005) -> None:  # noqa: ANN001
    """In its own process: for each ``(due time, txn id, card token)``, from its due time on,
    read the card's state until the txn id is in it; writes ``{txn id: first time seen}`` to
    ``out`` (JSON) when ``stop`` is set or everything was seen."""
    from finfeat.jobs.online.base import EntityState
    from finfeat.jobs.online.redis_store import RedisOnlineStore
    from finfeat.transforms.spec import FeatureSpec

    store = RedisOnlineStore(url, FeatureSpec.from_yaml(spec_path) if spec_path else FeatureSpec.default())
    seen: dict[str, float] = {}
    following: dict[str, str] = {}  # txn id -> card, due and not yet seen
    nxt = 0
    try:
        while not stop.is_set() and len(seen) < len(samples):
            started = time.time()
            while nxt < len(samples) and samples[nxt][0] <= started:
                following[samples[nxt][1]] = samples[nxt][2]
                nxt += 1
            if following:
                cards = sorted(set(following.values()))
                states = store.read_states([("card", c) for c in cards])
                now = time.time()
                held = {s.key: {e.txn_id for e in s.events} for s in states if isinstance(s, EntityState)}
                for txn, card in list(following.items()):
                    if txn in held.get(card, ()):
                        seen[txn] = now
                        del following[txn]
            rest = period_s - (time.time() - started)
            if rest > 0:
                time.sleep(rest)
    finally:
        store.close()
        Path(out).write_text(json.dumps(seen))


def start_job(bootstrap: str, topic: str, warehouse: Path, log: Path, args: argparse.Namespace,
              online_store: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finfeat.jobs.cli", "stream", "--bootstrap", bootstrap, "--topic", topic,
           "--warehouse", str(warehouse), "--bound-seconds", str(args.bound_seconds),
           "--emit-every-ms", str(args.emit_every_ms), "--commit-every-seconds", str(args.commit_every_seconds),
           "--stop-after-idle", str(args.idle_seconds), "--batch-wait-ms", str(args.batch_wait_ms),
           *(["--online-store", online_store] if online_store else []),
           *(["--feature-spec", args.feature_spec] if args.feature_spec else [])]
    if args.engine == "flink":
        p = str(args.parallelism)
        cmd += ["--engine", "flink", "--flink-master", args.cluster.master, "--parallelism", p, "--buckets", p,
                "--checkpoint-interval-ms", str(args.checkpoint_interval_ms), "--checkpoint-dir",
                str(warehouse / "_checkpoints")]
    else:
        cmd.append(f"--prism_location={PRISM}")
    env = {**os.environ, "FINFEAT_TOKEN_KEY": TOKEN_KEY}
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_ready(proc: subprocess.Popen, args: argparse.Namespace, redis_url: str | None, bootstrap: str,
               topic: str, timeout_s: float = 300) -> float:
    """Flink: wait until the job reads its topic: one of the probe transactions published every
    0.25 s meanwhile (which also keep ``--stop-after-idle`` from ending a job that has read
    everything before the schedule starts) is in the online store (with Redis), or (without a
    store) every task of the job runs. Returns the seconds waited. Prism: at once (its job starts
    in seconds and the warm-up covers it; its idle stop counts time caught up with the topic, which
    a trickle of probes does not interrupt)."""
    from finfeat.jobs.online.base import EntityState
    from finfeat.jobs.online.redis_store import RedisOnlineStore
    from finfeat.transforms.spec import FeatureSpec

    started = time.monotonic()
    deadline = started + timeout_s
    if args.engine != "flink":
        return 0.0
    probes = Synthetic(int(timeout_s * 4) + 1, prefix=f"w-{topic}-", seed=1)
    store = (RedisOnlineStore(redis_url, FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec
                              else FeatureSpec.default()) if redis_url else None)
    p = producer(bootstrap)
    sent: list[tuple[str, str]] = []  # (txn id, card) of the probes sent
    try:
        while True:
            key, prefix = probes.prefixes[len(sent)]
            send(p, topic, key, Synthetic.message(prefix, time.time()), backoff_s=0.01)
            p.flush(5)
            sent.append((f"w-{topic}-{len(sent):08d}", key.decode()))
            if store is not None:
                states = store.read_states([("card", c) for c in sorted({c for _, c in sent})])
                held = {t.txn_id for s in states if isinstance(s, EntityState) for t in s.events}
                if any(txn in held for txn, _ in sent):
                    break
            else:
                jobs = args.cluster.get("/jobs/overview").get("jobs", [])
                if any(j["state"] == "RUNNING" and j["tasks"]["running"] == j["tasks"]["total"] for j in jobs):
                    break
            _not_yet(proc, deadline)
            time.sleep(0.25)
    finally:
        if store is not None:
            store.close()
    return time.monotonic() - started


def _not_yet(proc: subprocess.Popen, deadline: float) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"the job ended (exit {proc.returncode}) before it read its topic; see its log")
    if time.monotonic() > deadline:
        raise RuntimeError("the job did not read its topic in time; see its log")


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


def _stats(fresh: np.ndarray) -> dict:
    """p50 / p99 / max and the lag (median of the last fifth minus median of the first) of
    freshness values in send order."""
    fifth = max(1, len(fresh) // 5)
    return {"p50": float(np.percentile(fresh, 50)), "p99": float(np.percentile(fresh, 99)),
            "max": float(fresh.max()), "lag": float(np.median(fresh[-fifth:]) - np.median(fresh[:fifth]))}


def steady(kafka: LocalKafka, rate: int, args: argparse.Namespace, work: Path, redis_url: str | None,
           *, kill: bool = False) -> dict:
    name = f"{args.label}-{'recovery' if kill else 'steady'}-{rate}"
    topic, wh, log = name, work / f"wh-{name}", work / f"stream-{name}.log"
    seconds = (args.recovery_seconds or args.seconds) if kill else args.seconds
    n = int(rate * (args.warmup_seconds + seconds))
    prefix = f"s{rate}-"
    data = Synthetic(n, prefix=prefix, seed=rate)
    ids = [f"{prefix}{i:08d}" for i in range(n)]
    # the topic exists before the job lists its partitions
    create_topic(kafka.bootstrap, topic, args.parallelism)
    publish(kafka.bootstrap, topic, Synthetic(1, prefix=f"w{rate}-"), 0, event_time_of=lambda j: time.time() - 60)
    proc = start_job(kafka.bootstrap, topic, wh, log, args, online_store=redis_url)
    poller = stop = None
    seen_file = work / f"online-{name}.json"
    # followed in the store: every n-th transaction due after the warm-up
    followed = np.arange(int(np.ceil(rate * args.warmup_seconds)), n, args.sample_every)
    try:
        startup_s = wait_ready(proc, args, redis_url, kafka.bootstrap, topic)
        t0 = time.time() + (0.5 if args.engine == "flink" else 1.0)  # the poller follows t0 + j / rate
        if redis_url:
            ctx = multiprocessing.get_context("spawn")
            stop = ctx.Event()
            samples = [(t0 + j / rate, ids[j], data.prefixes[j][0].decode()) for j in followed]
            poller = ctx.Process(target=poll_visibility, daemon=True,
                                 args=(redis_url, args.feature_spec, samples, str(seen_file), stop))
            poller.start()
        killed: list[float] = []
        if kill:  # a quarter into the measured seconds: SIGKILL the TaskManager, start a new one
            def crash() -> None:
                killed.append(time.time())
                args.cluster.kill_taskmanager()
                args.cluster.start_taskmanager()

            timer = threading.Timer(t0 + args.warmup_seconds + seconds / 4 - time.time(), crash)
            timer.start()
        sent = publish(kafka.bootstrap, topic, data, rate, t0=t0)
        produce_s = time.time() - t0
        if kill:
            timer.join()
        if poller is not None:  # the events still in flight become visible within the idle stop
            poller.join(args.idle_seconds + 30)
            stop.set()
            poller.join(30)
        rc = stop_job(proc, seconds * 10 + 120)
    finally:
        if stop is not None:
            stop.set()
        if poller is not None and poller.is_alive():
            poller.join(30)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    visible: dict[str, float] = {}
    for ts, committed in commits(wh / "features"):
        for txn in committed:
            visible.setdefault(txn, ts)
    missing = sum(1 for txn in ids if txn not in visible)
    after_warmup = sent >= t0 + args.warmup_seconds
    # Delta: before the end's watermark stall
    keep = after_warmup & (sent < sent[-1] - args.bound_seconds - 2)
    fresh = np.array([visible.get(txn, np.nan) for txn in ids]) - sent
    measured = fresh[keep & ~np.isnan(fresh)]
    out = {"engine": args.label, "case": f"{'recovery' if kill else 'steady'} {rate:,}/s", "events": n,
           "produced/s": n / produce_s, "startup_s": startup_s, "missing": missing, "rc": rc, "log": str(log)}
    if measured.size == 0:
        out["error"] = "nothing committed"
        return out
    out.update({"measured": int(measured.size), **_stats(measured)})
    if kill and killed:
        sent_at = dict(zip(ids, sent))
        # before the kill: the rows committed before it
        before = fresh[after_warmup & ~np.isnan(fresh) & (fresh + sent < killed[0])]
        current = max(1.0, float(np.percentile(before, 99))) if before.size else 1.0
        back = next((ts for ts, got in commits(wh / "features") if ts > killed[0] and got and np.median(
            [ts - sent_at[t] for t in got if t in sent_at] or [np.inf]) <= current), None)
        out["recovery_s"] = (back - killed[0]) if back is not None else float("nan")
        out["pre_kill_p99"] = current
        out["after_kill_s"] = float(sent[-1] - killed[0])
    if redis_url:
        online = json.loads(seen_file.read_text()) if seen_file.exists() else {}
        seen_at = np.array([online.get(ids[j], np.nan) for j in followed])
        on = seen_at - sent[followed]
        measured_on = on[~np.isnan(on)]
        out["online_followed"] = int(followed.size)
        out["online_missing"] = int(np.isnan(on).sum())
        if measured_on.size:
            out["online"] = _stats(measured_on)
        if kill and killed:  # the store current again: a transaction sent after the kill seen in time
            pre = on[~np.isnan(on) & (seen_at < killed[0])]
            limit = max(0.5, float(np.percentile(pre, 99))) if pre.size else 0.5
            ok = ~np.isnan(on) & (sent[followed] > killed[0]) & (on <= limit)
            out["online_recovery_s"] = float(seen_at[ok].min() - killed[0]) if ok.any() else float("nan")
            out["online_pre_kill_p99"] = limit
    return out


def backlog(kafka: LocalKafka, n: int, args: argparse.Namespace, work: Path, redis_url: str | None) -> dict:
    topic = f"{args.label}-backlog"
    wh, log = work / f"wh-{topic}", work / f"stream-{topic}.log"
    data = Synthetic(n, prefix="k", seed=99)
    now = time.time()
    step = 1 / 5000  # event times 5,000/s apart, ending now
    create_topic(kafka.bootstrap, topic, args.parallelism)
    publish(kafka.bootstrap, topic, data, 0, event_time_of=lambda j: now - (n - j) * step)
    t0 = time.time()
    proc = start_job(kafka.bootstrap, topic, wh, log, args, online_store=redis_url)
    reading = _first_seen(redis_url, args, data.prefixes[0][0].decode(), "k00000000", proc) if redis_url else None
    rc = stop_job(proc, 600)
    wall = time.time() - t0
    done = commits(wh / "features")
    rows = sum(len(ids) for _, ids in done)
    first_ts, first_ids = done[0] if done else (t0, [])
    last_ts = done[-1][0] if done else t0
    if reading is not None and done:  # from the first message in the store to the last commit
        rate = rows / (last_ts - reading)
    else:  # between the first and the last commit
        rate = (rows - len(first_ids)) / (last_ts - first_ts) if len(done) > 1 else float("nan")
    return {"engine": args.label, "case": f"backlog {n:,}", "events": n, "rows": rows, "commits": len(done), "wall": wall,
            "throughput": rate, "from": "first store write" if reading is not None else "first commit",
            "rc": rc, "log": str(log)}


def _first_seen(redis_url: str, args: argparse.Namespace, card: str, txn: str, proc: subprocess.Popen) -> float | None:
    """When the job's first message (``txn`` of ``card``) is in the online store: the job reads."""
    from finfeat.jobs.online.base import EntityState
    from finfeat.jobs.online.redis_store import RedisOnlineStore
    from finfeat.transforms.spec import FeatureSpec

    store = RedisOnlineStore(redis_url, FeatureSpec.from_yaml(args.feature_spec) if args.feature_spec
                             else FeatureSpec.default())
    try:
        while proc.poll() is None:
            state = store.read_states([("card", card)])[0]
            if isinstance(state, EntityState) and any(e.txn_id == txn for e in state.events):
                return time.time()
            time.sleep(0.05)
    finally:
        store.close()
    return None


def run_engine(kafka: LocalKafka, args: argparse.Namespace, work: Path, redis_url: str | None,
               stack: ExitStack) -> list[dict]:
    """Every case of one engine (``args.engine``, ``args.parallelism``), each in a clean Redis database."""
    def store() -> str | None:
        if not redis_url:
            return None
        import redis

        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        client.close()
        return redis_url

    results = []
    if args.engine == "flink":
        from finfeat.jobs.flink.cluster import LocalFlinkCluster

        # one TaskManager with as many slots as the job's parallelism
        args.cluster = stack.enter_context(LocalFlinkCluster(workdir=work / f"flink-{args.parallelism}",
                                                             slots=args.parallelism))
    for rate in [int(r) for r in args.rates.split(",") if r]:
        results.append(steady(kafka, rate, args, work, store()))
        print(json.dumps(results[-1]), flush=True)
    if args.backlog:
        results.append(backlog(kafka, args.backlog, args, work, store()))
        print(json.dumps(results[-1]), flush=True)
    if args.engine == "flink" and args.recovery_rate:
        results.append(steady(kafka, args.recovery_rate, args, work, store(), kill=True))
        print(json.dumps(results[-1]), flush=True)
    return results


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(f"\nfinfeat stream, {os.cpu_count()} cores; bound {args.bound_seconds:g} s, "
          f"emit tick {args.emit_every_ms} ms, commit every {args.commit_every_seconds:g} s, "
          f"batch wait {args.batch_wait_ms} ms, {args.seconds:g} s measured after {args.warmup_seconds:g} s of warm-up"
          + (f"; online store Redis on 127.0.0.1, every {args.sample_every}th transaction followed"
             if args.online_store == "redis" else "; no online store"))
    print(f"{'engine':<9}{'case':<18}{'events':>9}{'sent/s':>9}  {'to':<8}{'p50 s':>8}{'p99 s':>8}{'max s':>8}"
          f"{'lag s':>8}{'missing':>9}")
    for r in results:
        if not r["case"].startswith(("steady", "recovery")):
            continue
        head = f"{r['engine']:<9}{r['case']:<18}{r['events']:>9,}"
        if "error" in r:
            print(f"{head}  {r['error']} (see {r['log']})")
            continue
        head += f"{r['produced/s']:>9,.0f}"
        if "online" in r:
            o = r["online"]
            print(f"{head}  {'online':<8}{o['p50']:>8.3f}{o['p99']:>8.3f}{o['max']:>8.3f}{o['lag']:>8.3f}"
                  f"{r['online_missing']:>9,} of {r['online_followed']:,} followed")
            head = " " * 45
        elif "online_followed" in r:
            print(f"{head}  {'online':<8}  none of {r['online_followed']:,} followed transactions seen")
            head = " " * 45
        print(f"{head}  {'Delta':<8}{r['p50']:>8.2f}{r['p99']:>8.2f}{r['max']:>8.2f}{r['lag']:>8.2f}"
              f"{r['missing']:>9,}")
    for r in results:
        if "recovery_s" in r:
            def took(s: float) -> str:
                return f"{s:.1f} s after the kill" if s == s else f"not within the {r['after_kill_s']:.0f} s sent after it"

            print(f"{r['engine']}: recovery after a TaskManager killed at {r['case'].split()[1]}: Delta current "
                  f"again (a commit's median freshness under {r['pre_kill_p99']:.2f} s) {took(r['recovery_s'])}"
                  + (f"; online store current again (a transaction sent after the kill seen within "
                     f"{r['online_pre_kill_p99']:.2f} s) {took(r['online_recovery_s'])}"
                     if "online_recovery_s" in r else ""))
        if r["case"].startswith("backlog"):
            print(f"{r['engine']}: capacity: {r['rows']:,} of {r['events']:,} backlog events in {r['commits']} "
                  f"commits, {r['throughput']:,.0f} events/s from the {r['from']} to the last commit "
                  f"({r['wall']:.1f} s wall "
                  f"incl. start-up and idle stop)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--seconds", type=float, default=20, help="measured seconds per rate")
    ap.add_argument("--warmup-seconds", type=float, default=8,
                    help="published at the rate once the job reads its topic, not measured")
    ap.add_argument("--bound-seconds", type=float, default=1.0)
    ap.add_argument("--emit-every-ms", type=int, default=200)
    ap.add_argument("--commit-every-seconds", type=float, default=1.0)
    ap.add_argument("--batch-wait-ms", type=int, default=round(DEFAULT_BATCH_WAIT_S * 1000),
                    help="the job's --batch-wait-ms: how long a Kafka poll waits for more after its first message")
    ap.add_argument("--idle-seconds", type=float, default=4.0)
    ap.add_argument("--backlog", type=int, default=60_000, help="0 skips the capacity run")
    ap.add_argument("--online-store", choices=["redis", "none"], default="redis",
                    help="run the job with --online-store on a local redis-server and measure visibility there")
    ap.add_argument("--sample-every", type=int, default=10, help="follow every n-th transaction in the store")
    ap.add_argument("--feature-spec", help="the job's feature spec YAML (default: the built-in v1 set)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, tables)")
    ap.add_argument("--engine", default="beam",
                    help="beam (Prism), flink, or both in one run, back to back: beam,flink")
    ap.add_argument("--parallelism", default="1",
                    help="Flink: parallelism and task slots of its TaskManager; a list (1,2) runs each")
    ap.add_argument("--checkpoint-interval-ms", type=int, default=2000, help="Flink checkpoints")
    ap.add_argument("--recovery-rate", type=int, default=1000, help="Flink: the TaskManager-kill run's rate (0 skips)")
    ap.add_argument("--recovery-seconds", type=float, help="Flink: measured seconds of the kill run (default --seconds)")
    args = ap.parse_args()
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not engines or set(engines) - {"beam", "flink"}:
        ap.error("--engine takes beam, flink or beam,flink")
    try:
        slots = [int(p) for p in args.parallelism.split(",") if p]
    except ValueError:
        ap.error("--parallelism takes a number or a list such as 1,2")
    if not slots or min(slots) < 1:
        ap.error("--parallelism takes numbers of at least 1")
    if "beam" in engines and not PRISM.exists():
        print(f"no Prism binary at {PRISM}: make prism", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="finfeat-bench-stream-"))
    results: list[dict] = []
    try:
        with ExitStack() as stack:
            redis_url = None
            if args.online_store == "redis":
                try:
                    server = stack.enter_context(running_redis(work / "redis"))
                except RedisServerMissing as exc:
                    raise SystemExit(f"{exc}, or pass --online-store none") from None
                redis_url = f"redis://127.0.0.1:{server.port}/0"
            kafka = stack.enter_context(LocalKafka())
            for engine in engines:
                for p in slots if engine == "flink" else [1]:
                    args.engine, args.parallelism = engine, p
                    args.label = "prism" if engine == "beam" else f"flink-p{p}"
                    with ExitStack() as cluster:  # a Flink cluster per parallelism, stopped after its cases
                        results += run_engine(kafka, args, work, redis_url, cluster)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
