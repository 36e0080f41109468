"""``make stream-demo``: the stream job end to end on a local Kafka broker and Prism (or Flink).

    python -m finfeat.jobs.stream_demo [--warehouse warehouse] [--disorder-seconds 60] [--engine flink]

1. Reads the public Sparkov transactions (``data/sparkov``) as ``make demo`` does (same mapping,
   same public demo key) and publishes them to a fresh topic of a broker it starts on 127.0.0.1
   (Apache Kafka in KRaft mode, jars from ``.cache/kafka``), shuffled within ``--disorder-seconds``
   of event time.
2. Runs ``finfeat stream`` on Prism (``.cache/prism``) into ``<warehouse>-stream`` with an online
   store (SQLite, ``<warehouse>-stream/online.db``) until the topic has been idle for a few seconds;
   with ``--engine flink`` (``make flink-demo``) on a local Flink cluster it starts and stops (free
   ports, parallelism 2) into ``<warehouse>-flink``.
3. Checks the stream's feature rows against the backfill's in ``<warehouse>/features`` (``make
   demo`` writes them), field by field, reconciles messages = feature rows + dead letters, and looks
   a card up in the online store the stream kept current.

Exit code 0 when the rows are identical and everything reconciles, 1 otherwise, 2 when a part is
missing (the message says which ``make`` target provides it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRISM = REPO / ".cache" / "prism" / "bin" / "prism"
APP_ID = "finfeat-stream-demo"


def _events(inputs: list[str]):  # noqa: ANN202
    from finfeat.jobs.options import DEMO_TOKEN_KEY
    from finfeat.jobs.sources import parse_files
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.dedup import deduplicate
    from finfeat.transforms.parse import SOURCE, SOURCE_ROW, CardTokenizer

    events, _ = parse_files(inputs, Mapping.load("sparkov"), CardTokenizer(DEMO_TOKEN_KEY.encode()),
                            run_id="stream-demo", keep_source=True)
    unique, _ = deduplicate(events, run_id="stream-demo", recorded_at_us=0)
    return unique.drop_columns([SOURCE, SOURCE_ROW])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", default="warehouse", help="where `make demo` wrote its tables")
    parser.add_argument("--input", action="append", help="inputs of the demo (default data/sparkov)")
    parser.add_argument("--disorder-seconds", type=float, default=60.0,
                        help="publish each event up to this much event time late (within the job's bound)")
    parser.add_argument("--bound-seconds", type=float, default=120.0, help="the stream job's bound on disorder")
    parser.add_argument("--engine", choices=["beam", "flink"], default="beam",
                        help="beam: Prism (make stream-demo); flink: a local Flink cluster (make flink-demo)")
    args = parser.parse_args(argv)
    flink = args.engine == "flink"
    warehouse = Path(args.warehouse)
    features = warehouse / "features"
    if not (features / "_delta_log").is_dir():
        print(f"stream-demo: no backfill output in {features}: run `make demo` first", file=sys.stderr)
        return 2
    if not flink and not PRISM.exists():
        print(f"stream-demo: no Prism binary at {PRISM}: run `make prism`", file=sys.stderr)
        return 2
    if flink:
        from finfeat.jobs.flink import env as flink_env

        try:
            flink_env.require()
        except flink_env.FlinkUnavailable as exc:
            print(f"stream-demo: {exc}", file=sys.stderr)
            return 2
    try:
        import confluent_kafka  # noqa: F401

        from finfeat.jobs.kafka.broker import KafkaUnavailable, LocalKafka
    except ImportError:
        print("stream-demo: the stream extra is not installed: run `make setup-full`", file=sys.stderr)
        return 2

    import pyarrow.compute as pc

    from finfeat.jobs.delta import read_table
    from finfeat.jobs.flink.env import FlinkUnavailable
    from finfeat.jobs.online import Candidate, lookup, open_store
    from finfeat.jobs.produce import produce
    from finfeat.transforms.spec import FeatureSpec

    spec = FeatureSpec.default()
    events = _events(args.input or [str(REPO / "data" / "sparkov")])
    out = Path(f"{warehouse}-flink" if flink else f"{warehouse}-stream")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    store_url = f"sqlite:{(out / 'online.db').resolve()}"
    topic = f"stream-demo-{uuid.uuid4().hex[:8]}"
    log = out / "stream.log"
    try:
        with LocalKafka() as kafka, contextlib.ExitStack() as stack:
            print(f"stream-demo: Kafka on {kafka.bootstrap}; publishing {events.num_rows:,} Sparkov transactions to "
                  f"{topic}, shuffled within {args.disorder_seconds:g} s of event time", file=sys.stderr)
            sent = produce(events, bootstrap=kafka.bootstrap, topic=topic,
                           disorder_us=int(args.disorder_seconds * 1_000_000), seed=7)
            cmd = [sys.executable, "-m", "finfeat.jobs.cli", "stream", "--bootstrap", kafka.bootstrap,
                   "--topic", topic, "--warehouse", str(out), "--app-id", APP_ID, "--demo-key",
                   "--bound-seconds", str(args.bound_seconds), "--commit-every-seconds", "5",
                   "--stop-after-idle", "8", "--online-store", store_url]
            if flink:
                from finfeat.jobs.flink.cluster import LocalFlinkCluster

                cluster = stack.enter_context(LocalFlinkCluster(workdir=(out / "flink-cluster").resolve()))
                print(f"stream-demo: a local Flink cluster, web UI {cluster.rest}", file=sys.stderr)
                cmd += ["--engine", "flink", "--flink-master", cluster.master, "--parallelism", "2",
                        "--buckets", "2", "--checkpoint-interval-ms", "2000"]
            else:
                cmd.append(f"--prism_location={PRISM}")
            print(f"stream-demo: finfeat stream on {'Flink' if flink else 'Prism'} -> {out}/ (log: {log})",
                  file=sys.stderr)
            started = time.monotonic()
            with log.open("wb") as sink:
                rc = subprocess.run(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=900).returncode
            took = time.monotonic() - started
    except KafkaUnavailable as exc:
        print(f"stream-demo: {exc} (the broker's jars come from `make jars`)", file=sys.stderr)
        return 2
    except FlinkUnavailable as exc:
        print(f"stream-demo: {exc}", file=sys.stderr)
        return 2
    if rc != 0:
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        print(f"stream-demo: the stream job exited {rc}", file=sys.stderr)
        return 1

    streamed = read_table(out / "features", columns=["txn_id", *spec.names]).sort_by("txn_id")
    dead = read_table(out / "dead_letters", columns=["reason"]) if (out / "dead_letters" / "_delta_log").is_dir() \
        else None
    n_dead = 0 if dead is None else dead.num_rows
    batch = read_table(features, columns=["txn_id", *spec.names],
                       filters=pc.field("txn_id").isin(events.column("txn_id"))).sort_by("txn_id")
    same = streamed.equals(batch.cast(streamed.schema))
    reconciled = sent == streamed.num_rows + n_dead
    print(f"stream: {sent:,} messages -> {streamed.num_rows:,} feature rows + {n_dead:,} dead letters in {took:.0f} s "
          f"(start-up and the idle stop included): {'reconciled' if reconciled else 'NOT RECONCILED'}")
    print(f"stream vs backfill: {streamed.num_rows:,} rows, "
          f"{'identical to' if same else 'DIFFERENT FROM'} the backfill's rows in {features}")

    last = events.sort_by([("event_time", "descending")]).slice(0, 1).to_pylist()[0]
    at_us = int(last["event_time"].timestamp() * 1_000_000) + 60_000_000
    candidate = Candidate(card_token=last["card_token"], merchant_id=last["merchant_id"], amount_minor=12_500,
                          at_us=at_us, currency="USD", merchant_lat=last["merchant_lat"],
                          merchant_lon=last["merchant_lon"])
    with open_store(store_url, spec, create=False) as store:
        got = lookup(store, spec, candidate)
    shown = ("card_count_24h", "card_sum_amount_24h", "card_amount_zscore_30d", "card_seconds_since_last",
             "merchant_count_24h")
    print(f"online lookup (a 125.00 candidate on the newest card, one minute after its last transaction; state "
          f"age {got.age_s:.0f} s): " + ", ".join(f"{k}={got.features[k]}" for k in shown))
    return 0 if same and reconciled else 1


if __name__ == "__main__":
    sys.exit(main())
