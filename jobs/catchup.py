"""``finfeat backfill --catch-up``: recompute exactly the UTC days that need it, from the run history.

A day needs (re)computing when

* no backfill ever wrote it (no commit of the features table covers it in ``finfeat.range``);
* the run that last wrote it did not succeed, or left no report;
* it was computed with another spec hash or code version (``finfeat.spec_hash`` /
  ``finfeat.code_version`` of that commit), another mapping or another tokenization key;
* its input changed since: every catch-up run records, in its run report (key ``catch_up``), a
  fingerprint of each input file (path, size, mtime, SHA-256) and, per UTC event day, the number
  of parsed events and an order-free sum of their row hashes. A day C whose events differ now
  (new or changed files, late events, removed rows) changes the features of days C .. C + reach,
  where reach is the spec's longest window plus label delay, rounded up to whole days, and, for
  features without a window (seconds since the last event, geo velocity), the day of the next
  event (and next located event) after C of each card with an event on C, however far;
* labels arrived after it was computed: the same per-day fingerprint of the labels feed, by the
  day of ``label_time``. A label known at time L changes ``merchant_fraud_rate_*`` of transactions
  up to L + delay + window, so a changed label day C makes C .. C + ceil((delay + window) / 1 day)
  stale (only for a spec with label-aware features); and the day of each transaction whose latest
  feed label is not the one in the labels table (its feature row carries ``is_fraud``).

With ``--online-store``, the last day is always in the plan and only its range writes the store,
so the store holds the state as of the end of that day.

A day last written by a plain ``finfeat backfill`` (no fingerprints) counts as current only while
the input files are the ones its report names and none was modified after that run started.

Contiguous stale days are grouped into ranges; each range is a normal backfill (with the spec's
warm-up history), which replaces exactly its partitions, so running the plan twice changes nothing
the second time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy modules load inside the functions that use them (`finfeat --help` stays fast)
    import pyarrow as pa

    from finfeat.jobs.backfill import BackfillConfig
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.spec import FeatureSpec

_LOG = logging.getLogger(__name__)

_US_PER_DAY = 86_400_000_000
_MASK32 = (1 << 32) - 1
#: key of the run report under which a catch-up run records what the next catch-up compares with
REPORT_KEY = "catch_up"
#: bumped when the fingerprint definition changes (an old record then never matches)
FINGERPRINT_VERSION = 1


class CatchUpError(RuntimeError):
    """The catch-up cannot plan or run (the message says why and what to do)."""


# -------------------------------------------------------------------------------- fingerprints


def day_fingerprints(table: pa.Table, time_column: str, *, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """Per UTC day of ``time_column``: ``"<rows>:<sum of 64-bit row hashes mod 2**64, hex>"``.

    The sum does not depend on row order or on how rows are split between files; any change of a
    value, an added or a removed row changes it (up to hash collisions).
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if table.num_rows == 0:
        return {}
    keep = [c for c in table.column_names if c not in drop]
    frame = table.select(keep).to_pandas()
    hashes = pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)
    days = table.column(time_column).cast(pa.int64()).to_numpy() // _US_PER_DAY
    grouped = pd.DataFrame({"day": days, "lo": (hashes & _MASK32).astype(np.int64),
                            "hi": (hashes >> np.uint64(32)).astype(np.int64)}).groupby("day")
    sums = grouped.agg(n=("lo", "size"), lo=("lo", "sum"), hi=("hi", "sum"))
    out: dict[str, str] = {}
    for day, row in sums.iterrows():
        total = (int(row["hi"]) << 32) + int(row["lo"])
        out[(date(1970, 1, 1) + timedelta(days=int(day))).isoformat()] = f"{int(row['n'])}:{total % (1 << 64):016x}"
    return out


def merge_days(files: list[dict[str, Any]]) -> dict[str, str]:
    """Per-day fingerprints of several files combined (rows added, hash sums added mod 2**64)."""
    acc: dict[str, tuple[int, int]] = {}
    for f in files:
        for day, fp in f.get("days", {}).items():
            n, h = fp.split(":")
            prev = acc.get(day, (0, 0))
            acc[day] = (prev[0] + int(n), (prev[1] + int(h, 16)) % (1 << 64))
    return {day: f"{n}:{h:016x}" for day, (n, h) in sorted(acc.items())}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mapping_hash(mapping: Mapping) -> str:
    return hashlib.sha256(mapping.model_dump_json().encode()).hexdigest()[:16]


def key_id(token_key: bytes) -> str:
    """Names the tokenization key without revealing it (card tokens, hence row hashes, depend on it)."""
    import hmac

    return hmac.new(token_key, b"finfeat catch-up key id", hashlib.sha256).hexdigest()[:16]


@dataclass
class Fingerprints:
    """What the inputs look like now: per file and per day, for events and the labels feed."""

    inputs: list[dict[str, Any]]
    labels: list[dict[str, Any]]
    mapping: str
    key: str

    @property
    def input_days(self) -> dict[str, str]:
        return merge_days(self.inputs)

    @property
    def label_days(self) -> dict[str, str]:
        return merge_days(self.labels)

    def record(self) -> dict[str, Any]:
        return {"fingerprint_version": FINGERPRINT_VERSION, "mapping_hash": self.mapping, "key_id": self.key,
                "inputs": self.inputs, "labels": self.labels}


def _known_files(reports: dict[str, dict[str, Any]], kind: str, mapping: str, key: str
                 ) -> tuple[dict[tuple[str, int, int], dict[str, Any]], dict[str, dict[str, Any]]]:
    """Files recorded by earlier catch-ups with the same mapping and key: by (path, size, mtime)
    and by content hash, so an unchanged file is not parsed again."""
    by_stat: dict[tuple[str, int, int], dict[str, Any]] = {}
    by_sha: dict[str, dict[str, Any]] = {}
    for report in reports.values():
        rec = report.get(REPORT_KEY)
        if not isinstance(rec, dict) or rec.get("fingerprint_version") != FINGERPRINT_VERSION:
            continue
        if rec.get("mapping_hash") != mapping or rec.get("key_id") != key:
            continue
        for f in rec.get(kind, []):
            by_stat[(f["path"], f["size"], f["mtime_ns"])] = f
            by_sha[f["sha256"]] = f
    return by_stat, by_sha


def fingerprint_inputs(*, inputs: list[Path], labels: list[Path], mapping: Mapping, token_key: bytes,
                       reports: dict[str, dict[str, Any]]) -> Fingerprints:
    """Fingerprints of the current inputs; files unchanged since an earlier catch-up reuse its record."""
    import pyarrow as pa

    from finfeat.jobs.sources import read_file, read_labels_file
    from finfeat.transforms.labels import parse_labels
    from finfeat.transforms.parse import CardTokenizer, parse_batch

    m_hash, k_id = mapping_hash(mapping), key_id(token_key)
    tokenizer = CardTokenizer(token_key)

    def one(path: Path, kind: str) -> dict[str, Any]:
        resolved = path.resolve()
        st = resolved.stat()
        by_stat, by_sha = known[kind]
        hit = by_stat.get((str(resolved), st.st_size, st.st_mtime_ns))
        if hit is not None:
            return {**hit, "path": str(resolved)}
        sha = sha256_file(resolved)
        base = {"path": str(resolved), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        if sha in by_sha:
            return {**base, "days": by_sha[sha]["days"]}
        _LOG.info("fingerprinting %s (%s)", resolved, kind)
        parts = []
        if kind == "inputs":
            for raw, _ in read_file(resolved, mapping, tokenizer, run_id="catch-up", recorded_at_us=0):
                events, _ = parse_batch(raw, mapping=mapping, tokenizer=tokenizer, source=resolved.name,
                                        run_id="catch-up", recorded_at_us=0)
                parts.append(events)
            table = pa.concat_tables(parts) if parts else None
            days = day_fingerprints(table, "event_time", drop=("_source", "_source_row")) if table else {}
        else:
            for raw, _ in read_labels_file(resolved, run_id="catch-up", recorded_at_us=0):
                lab, _ = parse_labels(raw, source=resolved.name, run_id="catch-up", recorded_at_us=0)
                parts.append(lab)
            table = pa.concat_tables(parts) if parts else None
            days = day_fingerprints(table, "label_time", drop=("source", "label_date")) if table else {}
        return {**base, "days": days}

    known = {kind: _known_files(reports, kind, m_hash, k_id) for kind in ("inputs", "labels")}
    return Fingerprints(inputs=[one(p, "inputs") for p in inputs], labels=[one(p, "labels") for p in labels],
                        mapping=m_hash, key=k_id)


# ------------------------------------------------------------------------------------- history


@dataclass(frozen=True)
class Writer:
    """The commit that last wrote a day of the features table."""

    run_id: str
    version: int
    spec_hash: str | None
    code_version: str | None


def day_writers(features_path: str) -> dict[date, Writer]:
    """For each day some backfill wrote: the last commit whose ``finfeat.range`` covers it."""
    from deltalake import DeltaTable

    out: dict[date, Writer] = {}
    if not DeltaTable.is_deltatable(features_path):
        return out
    for entry in sorted(DeltaTable(features_path).history(), key=lambda e: e.get("version", 0)):
        rng = entry.get("finfeat.range")
        # a backfill's commit is a WRITE, or the CREATE TABLE of the first one (files committed by
        # their add actions create the table in the same commit)
        if not rng or ".." not in str(rng) or entry.get("operation") not in ("WRITE", "CREATE TABLE", None):
            continue
        lo, hi = (date.fromisoformat(x) for x in str(rng).split(".."))
        writer = Writer(run_id=str(entry.get("finfeat.run_id")), version=int(entry.get("version", 0)),
                        spec_hash=entry.get("finfeat.spec_hash"), code_version=entry.get("finfeat.code_version"))
        d = lo
        while d <= hi:
            out[d] = writer
            d += timedelta(days=1)
    return out


# ---------------------------------------------------------------------------------------- plan


def _days(lo: date, hi: date) -> list[date]:
    return [lo + timedelta(days=i) for i in range((hi - lo).days + 1)]


def _ceil_days(us: int) -> int:
    return -(-us // _US_PER_DAY)


def group_ranges(days: list[date]) -> list[tuple[date, date]]:
    """Contiguous days as inclusive ranges, in order."""
    ranges: list[tuple[date, date]] = []
    for d in sorted(set(days)):
        if ranges and d == ranges[-1][1] + timedelta(days=1):
            ranges[-1] = (ranges[-1][0], d)
        else:
            ranges.append((d, d))
    return ranges


def changed_days(before: dict[str, str], now: dict[str, str]) -> list[date]:
    return sorted(date.fromisoformat(d) for d in set(before) | set(now) if before.get(d) != now.get(d))


@dataclass
class Plan:
    start: date
    end: date
    #: every day of [start, end] that needs computing, with the reasons
    reasons: dict[date, list[str]] = field(default_factory=dict)
    fingerprints: Fingerprints | None = None

    @property
    def days(self) -> list[date]:
        return sorted(self.reasons)

    @property
    def ranges(self) -> list[tuple[date, date]]:
        return group_ranges(self.days)

    def as_json(self) -> dict[str, Any]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(),
                "days": {d.isoformat(): r for d, r in sorted(self.reasons.items())},
                "ranges": [[a.isoformat(), b.isoformat()] for a, b in self.ranges]}

    def describe(self) -> str:
        if not self.reasons:
            return f"catch-up {self.start}..{self.end}: every day is current; nothing to do"
        lines = [f"catch-up {self.start}..{self.end}: {len(self.reasons)} day(s) to compute in "
                 f"{len(self.ranges)} range(s)"]
        for lo, hi in self.ranges:
            lines.append(f"  backfill {lo}..{hi}")
            # consecutive days with the same reasons share a line
            first = prev = lo
            for d in [*_days(lo, hi)[1:], None]:
                if d is not None and self.reasons[d] == self.reasons[first]:
                    prev = d
                    continue
                span = str(first) if first == prev else f"{first}..{prev}"
                lines.append(f"    {span:<22}  {'; '.join(self.reasons[first])}")
                if d is not None:
                    first = prev = d
        return "\n".join(lines)


def unlanded_label_days(*, labels: list[Path], warehouse: Path) -> set[date]:
    """Days of transactions whose latest feed label (``is_fraud``, ``label_time``) is not what the
    warehouse holds: the labels table lacks it or has another one. Their feature rows carry the
    label (``is_fraud``) and their run lands it in the labels table, so those days are stale."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from finfeat.jobs import delta
    from finfeat.jobs.sources import read_labels_file
    from finfeat.transforms.labels import latest_per_txn, parse_labels

    parts = []
    for path in labels:
        for raw, _ in read_labels_file(path, run_id="catch-up", recorded_at_us=0):
            parts.append(parse_labels(raw, source=path.name, run_id="catch-up", recorded_at_us=0)[0])
    features_path = delta.table_path(warehouse, delta.FEATURES)
    if not parts or not DeltaTable.is_deltatable(features_path):
        return set()
    feed = latest_per_txn(pa.concat_tables(parts)).select(["txn_id", "is_fraud", "label_time"])
    txns = feed.column("txn_id")

    def read(path: str, columns: list[str]) -> pa.Table:
        # delta-rs may hand strings back as string_view; compare as plain strings
        table = delta.read_table(path, columns=columns)
        table = table.set_column(0, "txn_id", table.column("txn_id").cast(pa.string()))
        return table.filter(pc.is_in(table.column("txn_id"), value_set=txns))

    written = read(features_path, ["txn_id", "event_date"])
    if written.num_rows == 0:
        return set()
    labels_path = delta.table_path(warehouse, delta.LABELS)
    if DeltaTable.is_deltatable(labels_path):
        landed = read(labels_path, ["txn_id", "is_fraud", "label_time"]).rename_columns(
            ["txn_id", "landed_fraud", "landed_time"])
    else:
        landed = pa.table({"txn_id": pa.array([], pa.string()), "landed_fraud": pa.array([], pa.bool_()),
                           "landed_time": pa.array([], feed.schema.field("label_time").type)})
    joined = feed.join(landed, keys="txn_id", join_type="left outer")
    same = pc.and_(pc.equal(joined.column("is_fraud"), joined.column("landed_fraud")),
                   pc.equal(joined.column("label_time"), joined.column("landed_time"))).fill_null(False)
    late = joined.filter(pc.invert(same)).select(["txn_id"])
    days = late.join(written, keys="txn_id", join_type="inner").column("event_date").to_pylist()
    return set(days)


def next_event_days(changed: list[date], *, spec: FeatureSpec, events: pa.Table, features_path: str) -> dict[date, set[date]]:
    """For each changed day C: the days of the next event, and the next located event, after C of every
    entity with an event on C (now, or in the feature rows written for C). Features without a window
    (``*_seconds_since_last``, ``*_geo_velocity_kmh``) of those events reach back to C however far it is."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from finfeat.jobs import delta
    from finfeat.transforms.features import UNBOUNDED_AGGS
    from finfeat.transforms.spec import ENTITY_COLUMNS

    entities = sorted({f.entity for f in spec.features if f.agg in UNBOUNDED_AGGS})
    out: dict[date, set[date]] = {c: set() for c in changed}
    if not entities or not changed:
        return out
    times = events.column("event_time").cast(pa.int64()).to_numpy()
    days = times // _US_PER_DAY
    located = (events.column("merchant_lat").is_valid() if "merchant_lat" in events.column_names
               else pa.array(np.zeros(len(times), bool)))
    if "merchant_lon" in events.column_names:
        located = pc.and_(located, events.column("merchant_lon").is_valid())
    located = located.to_numpy(zero_copy_only=False)
    written = None
    if DeltaTable.is_deltatable(features_path):
        written = delta.read_table(features_path, columns=["event_date", *[ENTITY_COLUMNS[e] for e in entities]])
    epoch = date(1970, 1, 1)
    for entity in entities:
        col = ENTITY_COLUMNS[entity]
        keys = events.column(col).cast(pa.string())
        for c in changed:
            c_day = (c - epoch).days
            touched = keys.filter(pa.array(days == c_day))
            if written is not None:
                old = written.filter(pc.equal(written.column("event_date"), pa.scalar(c)))
                touched = pa.concat_arrays([touched.combine_chunks(), old.column(col).cast(pa.string()).combine_chunks()])
            if len(touched) == 0:
                continue
            after = (days > c_day) & pc.is_in(keys, value_set=pc.unique(touched)).to_numpy(zero_copy_only=False)
            for mask in (after, after & located):
                if not mask.any():
                    continue
                firsts = pa.table({"k": keys.filter(pa.array(mask)), "d": pa.array(days[mask])}).group_by("k").aggregate(
                    [("d", "min")])
                out[c].update(epoch + timedelta(days=int(d)) for d in pc.unique(firsts.column("d_min")).to_pylist())
    return out


def _plain_run_current(report: dict[str, Any], inputs: list[Path], labels: list[Path]) -> bool:
    """A run without fingerprints: current while it read the same files and none changed after it started."""
    from finfeat.jobs.runs import report_started

    started = report_started(report, str(report.get("run_id", "")))
    if started is None:
        return False
    named = {str(Path(p).resolve()) for p in report.get("inputs", [])}
    if named != {str(p.resolve()) for p in inputs}:
        return False
    return all(p.stat().st_mtime < started.timestamp() for p in [*inputs, *labels])


def make_plan(*, warehouse: Path, inputs: list[Path], labels: list[Path], mapping: Mapping, spec: FeatureSpec,
              token_key: bytes, start: date | None, end: date | None, code_version: str) -> Plan:
    """Which days of ``[start, end]`` need computing (default: the days the input has events on)."""
    from finfeat.jobs import delta
    from finfeat.jobs.runs import read_reports

    reports = read_reports(warehouse)
    fps = fingerprint_inputs(inputs=inputs, labels=labels, mapping=mapping, token_key=token_key, reports=reports)
    now_input, now_labels = fps.input_days, fps.label_days
    if start is None or end is None:
        if not now_input:
            raise CatchUpError("the input has no valid events, so there are no days to catch up; "
                               "pass --start and --end to name the days")
        start = start or date.fromisoformat(min(now_input))
        end = end or date.fromisoformat(max(now_input))
    if end < start:
        raise CatchUpError(f"--end {end} is before --start {start}; give an inclusive date range")
    writers = day_writers(delta.table_path(warehouse, delta.FEATURES))
    reach = _ceil_days(spec.max_window_us)
    label_reach = max((_ceil_days(f.reach_us) for f in spec.features if f.agg == "fraud_rate"), default=None)
    plan = Plan(start=start, end=end, fingerprints=fps)
    stale_cache: dict[str, dict[date, list[str]]] = {}
    next_days: dict[date, set[date]] = {}
    parsed: list[pa.Table] = []

    def beyond_reach(c: date) -> set[date]:
        """Days past C + reach that C still reaches through features without a window."""
        if c + timedelta(days=reach) >= end:
            return set()
        if c not in next_days:
            if not parsed:
                from finfeat.jobs.sources import parse_files
                from finfeat.transforms.parse import CardTokenizer

                parsed.append(parse_files(inputs, mapping, CardTokenizer(token_key), run_id="catch-up")[0])
            next_days.update(next_event_days([c], spec=spec, events=parsed[0],
                                             features_path=delta.table_path(warehouse, delta.FEATURES)))
        return {d for d in next_days[c] if d > c + timedelta(days=reach)}

    def stale_from(run_id: str, rec: dict[str, Any]) -> dict[date, list[str]]:
        """Days made stale for a run's output by what changed since it ran."""
        if run_id in stale_cache:
            return stale_cache[run_id]
        out: dict[date, list[str]] = {}
        for c in changed_days(merge_days(rec.get("inputs", [])), now_input):
            for i in range(reach + 1):
                out.setdefault(c + timedelta(days=i), []).append(f"input of {c} changed")
            for d in sorted(beyond_reach(c)):
                out.setdefault(d, []).append(f"input of {c} changed (an entity's next event)")
        if label_reach is not None:
            for c in changed_days(merge_days(rec.get("labels", [])), now_labels):
                for i in range(label_reach + 1):
                    out.setdefault(c + timedelta(days=i), []).append(f"labels of {c} arrived or changed")
        stale_cache[run_id] = out
        return out

    late_labels = unlanded_label_days(labels=labels, warehouse=warehouse) if labels else set()
    for d in _days(start, end):
        w = writers.get(d)
        if w is None:
            plan.reasons[d] = ["never written"]
            continue
        why: list[str] = []
        report = reports.get(w.run_id)
        if w.spec_hash != spec.spec_hash:
            why.append(f"spec {w.spec_hash} -> {spec.spec_hash}")
        if w.code_version != code_version:
            why.append(f"code version {w.code_version} -> {code_version}")
        if report is None:
            why.append(f"run {w.run_id} left no run report")
        elif report.get("status") != "succeeded":
            why.append(f"run {w.run_id} {report.get('status', 'ended without an outcome')}")
        else:
            rec = report.get(REPORT_KEY)
            if isinstance(rec, dict) and rec.get("fingerprint_version") == FINGERPRINT_VERSION:
                if rec.get("mapping_hash") != fps.mapping:
                    why.append("mapping changed")
                elif rec.get("key_id") != fps.key:
                    why.append("tokenization key changed")
                else:
                    why.extend(dict.fromkeys(stale_from(w.run_id, rec).get(d, [])))
            elif not _plain_run_current(report, inputs, labels):
                why.append(f"inputs changed or unknown since run {w.run_id} (no fingerprints)")
        if d in late_labels:
            why.append("labels of its transactions arrived or changed")
        if why:
            plan.reasons[d] = why
    return plan


# ----------------------------------------------------------------------------------------- run


def _record(report_path: str | Path, plan: Plan, plan_id: str, seconds: float) -> None:
    """Add the catch-up's fingerprints to a finished run's report (new keys only), atomically."""
    path = Path(report_path)
    report = json.loads(path.read_text())
    if plan.fingerprints is None:
        raise CatchUpError("a plan without fingerprints cannot be recorded")
    report[REPORT_KEY] = {**plan.fingerprints.record(), "plan_id": plan_id,
                          "reasons": {d.isoformat(): r for d, r in plan.reasons.items() if _in(d, report.get("range"))}}
    report.setdefault("kind", "catch-up")
    report.setdefault("seconds", round(seconds, 2))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def new_run_id() -> str:
    """A run id in the backfill's format: start time to the second, then 8 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def _in(d: date, rng: object) -> bool:
    if not isinstance(rng, str) or ".." not in rng:
        return False
    lo, hi = (date.fromisoformat(x) for x in rng.split(".."))
    return lo <= d <= hi


def run_plan(plan: Plan, template: BackfillConfig, *, log_format: str = "text",
             on_report: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Each range of the plan as a backfill (``template`` is a BackfillConfig; its dates and run id are
    replaced), in order; the first failure stops the catch-up (the days it did not reach stay stale)."""
    from finfeat.jobs import progress
    from finfeat.jobs.backfill import run_backfill

    plan_id = new_run_id()
    reports = []
    for lo, hi in plan.ranges:
        # only the range that ends on the plan's last day writes the online store (state as of that day)
        cfg = replace(template, start=lo, end=hi, run_id=new_run_id(),
                      online_store=template.online_store if hi == plan.end else None)
        progress.set_run_id(cfg.run_id)
        _LOG.info("catch-up %s: backfill %s..%s as run %s", plan_id, lo, hi, cfg.run_id)
        started = time.monotonic()
        with progress.Progress(run_id=cfg.run_id, total_files=len(cfg.inputs), log_format=log_format,  # type: ignore[arg-type]
                               label=f"catch-up {lo}..{hi}"):
            report = run_backfill(cfg)
        _record(report["report_path"], plan, plan_id, time.monotonic() - started)
        report["seconds"] = report.get("seconds", round(time.monotonic() - started, 2))
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports


# ----------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The backfill's catch-up flags."""
    g = parser.add_argument_group("catch-up: recompute only the days that need it (see README, Scheduled backfills)")
    g.add_argument("--catch-up", action="store_true",
                   help="work out from the run history which days of --start..--end (default: the days the input "
                        "has events on) are missing or stale, and backfill exactly those")
    g.add_argument("--dry-run", action="store_true", help="with --catch-up: print the plan and stop")
    g.add_argument("--plan-json", help="with --catch-up: also write the plan and the run ids to this JSON file")


def config_from_args(args: argparse.Namespace, *, start: date, end: date, beam_args: list[str],
                     token_key: bytes) -> BackfillConfig:
    from finfeat.jobs.backfill import BackfillConfig
    from finfeat.jobs.options import DEFAULT_MAX_EVENTS_PER_SLICE
    from finfeat.jobs.sources import expand_inputs
    from finfeat.schemas.mapping import Mapping
    from finfeat.transforms.spec import FeatureSpec

    spec = FeatureSpec.from_yaml(args.feature_spec) if getattr(args, "feature_spec", None) else FeatureSpec.default()
    no_validate = getattr(args, "no_validate", False)
    return BackfillConfig(inputs=expand_inputs(args.input), mapping=Mapping.load(args.mapping),
                          warehouse=Path(args.warehouse), start=start, end=end, token_key=token_key, spec=spec,
                          buckets=args.buckets, labels=[Path(p) for p in getattr(args, "labels", [])],
                          feature_suite=None if no_validate else getattr(args, "feature_suite", "features"),
                          event_suite=None if no_validate else "events",
                          max_quarantine_fraction=getattr(args, "max_quarantine_fraction", 0.01),
                          max_dead_letter_fraction=getattr(args, "max_dead_letter_fraction", 0.1),
                          allow_shrink=getattr(args, "allow_shrink", False),
                          online_store=getattr(args, "online_store", None),
                          max_events_per_slice=getattr(args, "max_events_per_slice", DEFAULT_MAX_EVENTS_PER_SLICE),
                          slice_days=getattr(args, "slice_days", None), beam_args=beam_args)


def run(args: argparse.Namespace, *, beam_args: list[str], token_key: bytes,
        print_report: Callable[[dict[str, Any]], None] | None = None) -> int:
    """``finfeat backfill --catch-up``: plan, print the plan, run it (unless ``--dry-run``)."""
    from finfeat import __version__
    from finfeat.jobs import progress

    log_format = getattr(args, "log_format", "text")
    # a throwaway config checks the flags (mapping, spec, inputs) before any planning
    probe = config_from_args(args, start=date(1970, 1, 1), end=date(1970, 1, 1), beam_args=beam_args,
                             token_key=token_key)
    try:
        plan = make_plan(warehouse=probe.warehouse, inputs=probe.inputs, labels=probe.labels, mapping=probe.mapping,
                         spec=probe.spec, token_key=token_key, start=args.start, end=args.end,
                         code_version=__version__)
    except CatchUpError as exc:
        print(f"finfeat backfill --catch-up: error: {exc}", file=sys.stderr)
        return 2
    if probe.online_store and plan.end not in plan.reasons:
        # the store gets the state as of the end of the last day: that day's run materializes it
        plan.reasons[plan.end] = ["refresh the online store"]
    if log_format == "json":
        progress.emit_json("catch_up_plan", sys.stdout, run_id=None, **plan.as_json())
    else:
        print(plan.describe(), flush=True)
    summary: dict[str, Any] = {"plan": plan.as_json(), "dry_run": bool(args.dry_run), "runs": []}

    def write_summary() -> None:
        if args.plan_json:
            Path(args.plan_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.plan_json).write_text(json.dumps(summary, indent=2, default=str))

    write_summary()
    if args.dry_run or not plan.reasons:
        return 0

    def done(report: dict[str, Any]) -> None:
        summary["runs"].append({"run_id": report["run_id"], "range": report.get("range"),
                                "features_written": report.get("features_written")})
        write_summary()
        if print_report is not None:
            print_report(report)

    run_plan(plan, probe, log_format=log_format, on_report=done)
    return 0
