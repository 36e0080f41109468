"""The backfill in event-time slices: peak memory set by a slice and the longest window, not the input.

A run whose input holds more events than one slice (``--max-events-per-slice``) goes this way:

1. **Spill**: every input file is read in batches, parsed and validated by the same steps as the
   one-pipeline run, and the events are written to a temporary Parquet folder, one sub-folder
   per event day. Dead letters, quarantined events, counts and each event's 64-bit txn-id hash
   are kept (8 bytes an event); nothing else of the input is held.
2. **De-duplication across the run**: only the hashes that occur twice need to meet; those events
   are read back from the spill and de-duplicated together, by the same rule (the winners replace
   every copy when the days are read back; the others are dead letters once).
3. **Slices**: consecutive days of the range, each one Beam pipeline over its own days plus the
   history before them (the spec's ``max_window_us``, and each entity's newest and newest located
   event however old: :func:`~finfeat.transforms.features.history_tail`), emitting feature rows
   for its own days only. The workers write the rows as uncommitted Parquet files, as the
   one-pipeline run does.
4. **One commit**: the same committer (:class:`~finfeat.jobs.backfill.CommitRunFn`) gets every
   slice's files, what the spill gathered and the slices' label rows (kept on disk until then),
   checks reconciliation and the guards, and commits the feature files in one Delta transaction;
   a run killed before leaves no partial table (only its temporary folder).
"""
from __future__ import annotations

import gzip
import logging
import math
import pickle
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam import pvalue
from apache_beam.options.pipeline_options import PipelineOptions

from finfeat.jobs import delta, testhooks
from finfeat.jobs.sources import compression_of
from finfeat.transforms.buckets import stable_hash
from finfeat.transforms.dedup import deduplicate
from finfeat.transforms.features import UNBOUNDED_AGGS, history_tail
from finfeat.transforms.labels import attach_labels, label_rows
from finfeat.transforms.parse import PARSED_SCHEMA, SOURCE, SOURCE_ROW

if TYPE_CHECKING:
    from finfeat.jobs.backfill import BackfillConfig

_LOG = logging.getLogger(__name__)
_US_PER_DAY = 86_400_000_000
_SAMPLE_BYTES = 1 << 20
_REPEATED, _WINNERS, _LABELS = "repeated.npy", "winners.parquet", "labels.parquet"
_LABEL_ROWS = "label-rows"  # the label rows of the slices' own events, for the labels table


@dataclass(frozen=True)
class Slice:
    """Own days ``[first_day, end_day)`` (days since 1970-01-01, UTC)."""

    first_day: int
    end_day: int

    @property
    def from_us(self) -> int:
        return self.first_day * _US_PER_DAY

    @property
    def until_us(self) -> int:
        return self.end_day * _US_PER_DAY


# ------------------------------------------------------------------------------ deciding to slice


def estimate_events(paths: list[Path]) -> int:
    """About how many records the input files hold: Parquet's row counts; for text files, the
    size over the mean line length of their first MiB (decompressed, for gzip)."""
    total = 0
    for path in paths:
        try:
            total += _estimate(path)
        except (OSError, EOFError, ValueError, pa.ArrowException):
            total += path.stat().st_size // 100 if path.is_file() else 0  # read as a bad file later
    return total


def _estimate(path: Path) -> int:
    if path.name.lower().endswith(".parquet"):
        return pq.ParquetFile(path).metadata.num_rows
    size = path.stat().st_size
    with path.open("rb") as raw:
        if compression_of(path) == "gzip":
            with gzip.GzipFile(fileobj=raw) as fh:
                sample = fh.read(_SAMPLE_BYTES)
                size = int(size * len(sample) / max(raw.tell(), 1))
        else:
            sample = raw.read(_SAMPLE_BYTES)
    lines = sample.count(b"\n")
    if len(sample) < _SAMPLE_BYTES:
        return lines
    return int(size * lines / len(sample))


def wants_slices(cfg: BackfillConfig) -> bool:
    """Whether the run is cut into slices: with ``slice_days``, when the range is longer; else when
    the input holds more events than one slice may (a run that fits one slice is one pipeline)."""
    if cfg.slice_days is not None:
        return (cfg.end - cfg.start).days + 1 > cfg.slice_days
    return estimate_events(cfg.inputs) > cfg.max_events_per_slice


def plan_slices(day_counts: dict[int, int], *, first_day: int, end_day: int, reach_us: int,
                max_events: int, slice_days: int | None = None) -> list[Slice]:
    """Consecutive slices covering days ``[first_day, end_day)``.

    With ``slice_days``, that many days each. Otherwise a slice grows a day at a time while its
    events and those of the history before it (``reach_us``) stay within ``max_events``, and
    also while its own events are fewer than its history's, so that recomputing the history
    at most doubles the work.
    """
    if slice_days is not None:
        return [Slice(a, min(a + slice_days, end_day)) for a in range(first_day, end_day, slice_days)]
    warm_days = math.ceil(reach_us / _US_PER_DAY)
    base = first_day - warm_days
    prefix = np.concatenate([[0], np.cumsum([day_counts.get(d, 0) for d in range(base, end_day)])])

    def count(lo: int, hi: int) -> int:
        return int(prefix[hi - base] - prefix[max(lo, base) - base])

    slices, a = [], first_day
    while a < end_day:
        warm = count(a - warm_days, a)
        b = a + 1
        while b < end_day and (warm + count(a, b + 1) <= max_events or count(a, b) < warm):
            b += 1
        slices.append(Slice(a, b))
        a = b
    return slices


# --------------------------------------------------------------------------------------- spilling


@dataclass
class Spill:
    """What reading the input left: the day folders, and everything small the committer needs."""

    folder: Path
    day_counts: Counter[int]
    tagged: list[tuple[str, object]]  # ("dead" | "quarantine" | "failure" | "stat", ...) as the committer reads them
    hashes: list[np.ndarray]
    parts: int = 0

    def write(self, events: pa.Table) -> None:
        """One parsed batch, one file per event day it holds."""
        self.hashes.append(stable_hash(events.column("txn_id")))
        days = events.column("event_time").cast(pa.int64()).to_numpy() // _US_PER_DAY
        if len(days) > 1 and (days[1:] < days[:-1]).any():
            order = np.argsort(days, kind="stable")
            days, events = days[order], events.take(pa.array(order))
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(days)) + 1, [len(days)]])
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            day = int(days[s])
            folder = self.folder / f"day={day}"
            folder.mkdir(exist_ok=True)
            pq.write_table(events.slice(s, e - s), folder / f"part-{self.parts:06d}.parquet", compression="lz4")
            self.parts += 1
            self.day_counts[day] += e - s


def spill_inputs(cfg: BackfillConfig, folder: Path, *, recorded_at_us: int) -> Spill:
    """Read, parse and validate every input batch by batch (the one-pipeline run's own steps, here
    outside a pipeline) into ``folder``; the labels feed is parsed and kept there too."""
    from finfeat.jobs.backfill import ReadFilesFn, ReadLabelsFn
    from finfeat.pipelines.features import DEAD, FAILURES, QUARANTINE, STATS, ParseBatchFn, ParseLabelsFn

    kinds = {DEAD: "dead", STATS: "stat", QUARANTINE: "quarantine", FAILURES: "failure"}
    spill = Spill(folder=folder, day_counts=Counter(), tagged=[], hashes=[])
    read = ReadFilesFn(mapping=cfg.mapping, token_key=cfg.token_key, run_id=cfg.run_id,
                       recorded_at_us=recorded_at_us)
    parse = ParseBatchFn(mapping=cfg.mapping, token_key=cfg.token_key, run_id=cfg.run_id,
                         recorded_at_us=recorded_at_us, event_suite=cfg.event_suite)
    parse.setup()

    def parsed(reader, parser, paths) -> Iterator[pa.Table]:  # noqa: ANN001
        """The parser's main output over every file; its tagged outputs go to the spill."""
        for path in paths:
            for triple in reader.process(str(path)):
                for out in parser.process(triple):
                    if isinstance(out, pvalue.TaggedOutput):
                        spill.tagged.append((kinds[out.tag], out.value))
                    else:
                        yield out

    for events in parsed(read, parse, cfg.inputs):
        spill.write(events)
    labels = list(parsed(ReadLabelsFn(run_id=cfg.run_id, recorded_at_us=recorded_at_us),
                         ParseLabelsFn(run_id=cfg.run_id, recorded_at_us=recorded_at_us), cfg.labels))
    if labels:
        pq.write_table(pa.concat_tables(labels), folder / _LABELS)
    return spill


def deduplicate_spill(spill: Spill, *, run_id: str, recorded_at_us: int) -> tuple[int, pa.Table | None]:
    """Find the txn-id hashes that repeat across the whole run, de-duplicate those events (every
    copy read back from the spill) and keep the winners beside the days; returns how many
    events are left and the dead letters of the other copies."""
    hashes = np.concatenate(spill.hashes) if spill.hashes else np.zeros(0, np.uint64)
    spill.hashes = []
    values, counts = np.unique(hashes, return_counts=True)
    repeated = values[counts > 1]
    total = len(hashes)
    del hashes, values, counts
    np.save(spill.folder / _REPEATED, repeated)
    if not len(repeated):
        return total, None
    copies = []
    for path in sorted(spill.folder.glob("day=*/*.parquet")):
        ids = pq.read_table(path, columns=["txn_id"]).column("txn_id")
        mask = np.isin(stable_hash(ids), repeated)
        if mask.any():
            copies.append(pq.read_table(path).filter(pa.array(mask)))
    winners, dead = deduplicate(pa.concat_tables(copies), run_id=run_id, recorded_at_us=recorded_at_us)
    pq.write_table(winners, spill.folder / _WINNERS)
    _LOG.info("%d event(s) share a txn id with another; %d dead letter(s)", sum(c.num_rows for c in copies),
              dead.num_rows)
    return total - dead.num_rows, dead


class SpilledDays:
    """Reads one event day back from the spill: de-duplicated, feed labels attached, in the
    columns the feature computation reads (as the one-pipeline run hands them over)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._repeated = np.load(folder / _REPEATED)
        self._winners = pq.read_table(folder / _WINNERS) if (folder / _WINNERS).exists() else None
        self._labels = pq.read_table(folder / _LABELS) if (folder / _LABELS).exists() else None
        if self._winners is not None:
            self._winner_days = self._winners.column("event_time").cast(pa.int64()).to_numpy() // _US_PER_DAY

    def empty(self) -> pa.Table:
        """No events, in the columns :meth:`load` gives."""
        return attach_labels(PARSED_SCHEMA.empty_table().drop_columns([SOURCE, SOURCE_ROW]), self._labels)

    def load(self, day: int) -> pa.Table:
        parts = [pq.read_table(p) for p in sorted((self._folder / f"day={day}").glob("*.parquet"))]
        table = pa.concat_tables(parts) if parts else PARSED_SCHEMA.empty_table()
        if len(self._repeated) and table.num_rows:
            mask = np.isin(stable_hash(table.column("txn_id")), self._repeated)
            if mask.any():
                table = table.filter(pa.array(~mask))
        if self._winners is not None:
            mine = self._winners.filter(pa.array(self._winner_days == day))
            if mine.num_rows:
                table = pa.concat_tables([table, mine.cast(table.schema)])
        return attach_labels(table.drop_columns([SOURCE, SOURCE_ROW]), self._labels)


def _within(table: pa.Table, lo: int | None, hi: int | None) -> pa.Table:
    t = table.column("event_time").cast(pa.int64())
    mask = None
    if lo is not None:
        mask = pc.greater_equal(t, lo)
    if hi is not None:
        upper = pc.less(t, hi)
        mask = upper if mask is None else pc.and_(mask, upper)
    if mask is None or pc.all(mask).as_py() is not False:
        return table
    return table.filter(mask)


# --------------------------------------------------------------------------------------- a slice


class ReadSliceFn(beam.DoFn):
    """``("tail", path)`` or ``("day", n)`` -> the slice's events: its history tail, and each day's
    events from the start of its history (``lo_us``) to the end of its own days. Its own days'
    label rows go to ``labels``; ``stats`` counts the events the slice keeps (the first slice
    also its history, as the one-pipeline run counts what it keeps)."""

    def __init__(self, *, folder: str, lo_us: int, sl: Slice, first: bool, delay_us: int) -> None:
        self._folder, self._lo, self._slice, self._first, self._delay = folder, lo_us, sl, first, delay_us

    def setup(self) -> None:
        self._days = SpilledDays(Path(self._folder))

    def process(self, item: tuple[str, object]) -> Iterator[object]:
        from finfeat.pipelines.features import LABELS, STATS

        kind, value = item
        if kind == "tail":
            table = pq.read_table(str(value))
            if self._first:
                yield pvalue.TaggedOutput(STATS, ("events_kept", table.num_rows))
        else:
            table = _within(self._days.load(int(value)), self._lo, self._slice.until_us)
            own = _within(table, self._slice.from_us, None)
            yield pvalue.TaggedOutput(STATS, ("events_kept", table.num_rows if self._first else own.num_rows))
            labelled = label_rows(own, delay_us=self._delay)
            if labelled.num_rows:
                yield pvalue.TaggedOutput(LABELS, labelled)
        if table.num_rows:
            yield table


class _SaveFn(beam.DoFn):
    """The slice's gathered ``(kind, value)`` items, pickled for the run (they are small)."""

    def __init__(self, path: str) -> None:
        self._path = path

    def process(self, item: tuple[int, list[tuple[str, object]]]) -> None:
        with open(self._path, "wb") as fh:
            pickle.dump(list(item[1]), fh, protocol=pickle.HIGHEST_PROTOCOL)


def _run_slice(cfg: BackfillConfig, sl: Slice, *, number: int, folder: Path, lo_us: int, tail: Path,
               days: list[int], first: bool) -> list[tuple[str, object]]:
    """One slice as one Beam pipeline; what its workers wrote and counted."""
    from finfeat.jobs.backfill import WriteFeatureFilesFn
    from finfeat.pipelines.features import LABELS, STATS, ComputeFeatures, spec_label_delay_us

    out = folder / f"slice-{number}.pickle"
    items = [("tail", str(tail)), *(("day", d) for d in days)]
    with beam.Pipeline(options=PipelineOptions(cfg.beam_args)) as p:
        read = (p
                | "ListDays" >> beam.Create(items)
                | "ReadSlice" >> beam.ParDo(ReadSliceFn(folder=str(folder), lo_us=lo_us, sl=sl, first=first,
                                                        delay_us=spec_label_delay_us(cfg.spec))
                                            ).with_outputs(STATS, LABELS, main="events"))
        computed = read.events | "ComputeFeatures" >> ComputeFeatures(
            spec=cfg.spec, buckets=cfg.buckets, emit_from_us=sl.from_us, emit_until_us=sl.until_us)
        ((computed["features"] | "WriteFeatureFiles" >> beam.ParDo(WriteFeatureFilesFn(cfg=cfg)),
          read[LABELS] | "TagLabels" >> beam.Map(lambda t: (0, ("labels", t))),
          read[STATS] | "TagStats" >> beam.Map(lambda kv: (0, ("stat", kv))),
          p | "Done" >> beam.Create([(0, ("slice", number))]))
         | "Flatten" >> beam.Flatten()
         | "GatherSlice" >> beam.GroupByKey()
         | "SaveSlice" >> beam.ParDo(_SaveFn(str(out))))
    with out.open("rb") as fh:
        return pickle.load(fh)


def _tail_of(table: pa.Table, entities: list[str]) -> pa.Table:
    """The rows of ``table`` that unbounded features still reach (see :func:`history_tail`)."""
    if not entities or table.num_rows == 0:
        return table.slice(0, 0)
    keep = np.unique(np.concatenate([history_tail(table, e) for e in entities]))
    return table.take(pa.array(keep, pa.int64()))


# ------------------------------------------------------------------------------------------ a run


def run_sliced(cfg: BackfillConfig, *, recorded_at_us: int) -> dict[str, object]:
    """Spill, de-duplicate, run each slice, then hand everything to the committer; the committer's
    report (as the one-pipeline run leaves it). Feature files of a run that fails are deleted."""
    from finfeat.jobs.backfill import CommitRunFn, _day_us

    root = Path(tempfile.mkdtemp(prefix=f"finfeat-{cfg.run_id}-"))
    files: list[delta.DataFile] = []
    try:
        spill = spill_inputs(cfg, root, recorded_at_us=recorded_at_us)
        pa.default_memory_pool().release_unused()  # what reading held goes back before the first slice
        accepted, dup_dead = deduplicate_spill(spill, run_id=cfg.run_id, recorded_at_us=recorded_at_us)
        tagged = list(spill.tagged)
        if dup_dead is not None and dup_dead.num_rows:
            tagged.append(("dead", dup_dead))
        tagged.append(("stat", ("events_accepted", accepted)))
        reach = cfg.spec.max_window_us
        slices = plan_slices(spill.day_counts, first_day=_day_us(cfg.start) // _US_PER_DAY,
                             end_day=_day_us(cfg.end) // _US_PER_DAY + 1, reach_us=reach,
                             max_events=cfg.max_events_per_slice, slice_days=cfg.slice_days)
        _LOG.info("%d event(s) in %d day(s) spilled; %d slice(s)", accepted, len(spill.day_counts), len(slices))
        delta.update_run_report(cfg.warehouse, cfg.run_id, slices=len(slices))
        if not _refused_early(cfg, tagged):
            files_and_items = _run_slices(cfg, slices, spill, root, files)
            tagged += files_and_items
        kept = sum(kv[1] for kind, kv in tagged if kind == "stat" and kv[0] == "events_kept")
        tagged.append(("stat", ("events_outside_range", accepted - kept)))
        if (root / _LABEL_ROWS).is_dir():
            tagged.append(("labels", pq.read_table(root / _LABEL_ROWS)))
        if cfg.online_store:
            tagged.append(("events", _reach_events(cfg, slices, spill, root)))
        committer = CommitRunFn(cfg=cfg, recorded_at_us=recorded_at_us)
        files = []  # the committer owns them now (it deletes them if it does not commit)
        for _ in committer.process((0, tagged)):
            pass
        return delta.read_run_report(cfg.warehouse, cfg.run_id) or {}
    finally:
        if files:
            delta.discard_data_files(delta.table_path(cfg.warehouse, delta.FEATURES), files)
        shutil.rmtree(root, ignore_errors=True)


def _refused_early(cfg: BackfillConfig, tagged: list[tuple[str, object]]) -> bool:
    """Broken event expectations or too many dead letters: the committer refuses the run
    whatever the features, so the slices are not computed."""
    if any(kind == "failure" for kind, _ in tagged):
        return True
    read = sum(kv[1] for kind, kv in tagged if kind == "stat" and kv[0] == "rows_read")
    dead = sum(t.num_rows - pc.sum(pc.equal(t.column("stage"), "labels")).as_py() if t.num_rows else 0
               for kind, t in tagged if kind == "dead")
    return bool(read) and dead > cfg.max_dead_letter_fraction * read


def _run_slices(cfg: BackfillConfig, slices: list[Slice], spill: Spill, root: Path,
                files: list[delta.DataFile]) -> list[tuple[str, object]]:
    """Each slice in time order; its history tail is carried from one slice to the next."""
    entities = sorted({f.entity for f in cfg.spec.features if f.agg in UNBOUNDED_AGGS})
    days = SpilledDays(root)
    known = sorted(spill.day_counts)
    reach = cfg.spec.max_window_us
    tail: pa.Table | None = None
    prev_lo: int | None = None
    items: list[tuple[str, object]] = []
    for number, sl in enumerate(slices):
        lo = sl.from_us - reach
        tail = _advance_tail(days, tail, known, prev_lo, lo, entities, chunk_events=cfg.max_events_per_slice,
                             day_counts=spill.day_counts)
        tail_path = root / f"tail-{number}.parquet"
        pq.write_table(tail, tail_path)
        mine = [d for d in known if (d + 1) * _US_PER_DAY > lo and d * _US_PER_DAY < sl.until_us]
        _LOG.info("slice %d of %d: days %s..%s, %d event(s) with history", number + 1, len(slices),
                  sl.first_day, sl.end_day - 1, sum(spill.day_counts[d] for d in mine) + tail.num_rows)
        got = _run_slice(cfg, sl, number=number, folder=root, lo_us=lo, tail=tail_path, days=mine,
                         first=number == 0)
        files.extend(f for kind, fs in got if kind == "feature_files" for f in fs)  # type: ignore[union-attr]
        labels = [t for kind, t in got if kind == "labels"]
        if labels:  # kept on disk until the commit reads them as one table (they grow with the run)
            (root / _LABEL_ROWS).mkdir(exist_ok=True)
            pq.write_table(pa.concat_tables(labels), root / _LABEL_ROWS / f"slice-{number:05d}.parquet")
        items.extend((kind, value) for kind, value in got if kind != "labels")
        prev_lo = lo
        pa.default_memory_pool().release_unused()
        testhooks.reached(f"after:slice:{number + 1}")
    return items


def _advance_tail(days: SpilledDays, tail: pa.Table | None, known: list[int], prev_lo: int | None, lo: int,
                  entities: list[str], *, chunk_events: int, day_counts: dict[int, int]) -> pa.Table:
    """The history tail of every event before ``lo``, from that of the events before ``prev_lo``
    and the days in between, read about ``chunk_events`` events at a time."""
    pending: list[pa.Table] = []
    held = 0
    todo = [d for d in known if d * _US_PER_DAY < lo and (prev_lo is None or (d + 1) * _US_PER_DAY > prev_lo)]
    for n, d in enumerate(todo):
        if entities:
            pending.append(_within(days.load(d), prev_lo, lo))
            held += day_counts.get(d, 0)
        if pending and (held >= chunk_events or n == len(todo) - 1):
            parts = pending if tail is None else [tail, *pending]
            table = pa.concat_tables([t.cast(parts[0].schema) for t in parts])
            tail = _tail_of(table, entities)
            pending, held = [], 0
    return tail if tail is not None else days.empty()


def _reach_events(cfg: BackfillConfig, slices: list[Slice], spill: Spill, root: Path) -> pa.Table:
    """Every event the run keeps (the range, its history and tail), for the online store."""
    entities = sorted({f.entity for f in cfg.spec.features if f.agg in UNBOUNDED_AGGS})
    days = SpilledDays(root)
    known = sorted(spill.day_counts)
    lo = slices[0].from_us - cfg.spec.max_window_us if slices else 0
    until = slices[-1].until_us if slices else 0
    tail = _advance_tail(days, None, known, None, lo, entities, chunk_events=cfg.max_events_per_slice,
                         day_counts=spill.day_counts)
    parts = [tail, *(_within(days.load(d), lo, until).cast(tail.schema) for d in known
                     if (d + 1) * _US_PER_DAY > lo and d * _US_PER_DAY < until)]
    return pa.concat_tables(parts)
