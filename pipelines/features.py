"""Composite transforms from raw source batches to feature rows and dead letters.

Nothing here knows where rows come from or where they go: the jobs attach sources and
sinks. Elements are Arrow tables (whole batches), so a bounded run does a handful of
vectorized calls per key-partition instead of one Python call per event.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam import pvalue

from finfeat.schemas.features import IDENTITY_COLUMNS, feature_schema
from finfeat.pipelines import coders as _coders  # noqa: F401  (registers the Arrow table coder)
from finfeat.pipelines.streaming import ComputeFeaturesUnbounded
from finfeat.schemas.mapping import Mapping
from finfeat.transforms.buckets import split_by_bucket, stable_hash
from finfeat.transforms.dedup import deduplicate
from finfeat.transforms.labels import attach_labels, label_rows, parse_labels
from finfeat.transforms.features import (
    UNBOUNDED_AGGS,
    compute_calendar_features,
    compute_entity_features,
    history_tail,
)
from finfeat.transforms.parse import CardTokenizer, parse_batch
from finfeat.transforms.spec import DEFAULT_LABEL_DELAY, ENTITY_COLUMNS, FIELD_COLUMNS, FeatureSpec, window_us

NAMESPACE = "finfeat"
Keyed = Tuple[int, pa.Table]  # a bucket number and a table (Beam reads the hint at run time)
DEAD = "dead_letters"
STATS = "stats"
LABELS = "labels"
QUARANTINE = "quarantine"
FAILURES = "failures"


def _stat(name: str, value: int) -> pvalue.TaggedOutput:
    return pvalue.TaggedOutput(STATS, (name, int(value)))


class ParseBatchFn(beam.DoFn):
    """Raw source batch -> canonical events; rows that fail go to the dead-letter output.

    With an ``event_suite``, each parsed batch (a whole bundle, not row by row) is validated:
    ``drop`` rows go to the ``quarantine`` output, broken ``fail`` expectations to ``failures``
    (the committer stops the run on them before any commit).
    """

    def __init__(self, *, mapping: Mapping, token_key: bytes, run_id: str, recorded_at_us: int,
                 event_suite: str | None = None) -> None:
        self._mapping, self._key, self._run_id, self._recorded = mapping, token_key, run_id, recorded_at_us
        self._suite = event_suite

    def setup(self) -> None:
        self._tokenizer = CardTokenizer(self._key)
        self._parsed = beam.metrics.Metrics.counter(NAMESPACE, "events_parsed")
        self._dead = beam.metrics.Metrics.counter(NAMESPACE, "dead_letters")

    def process(self, element: tuple[str, pa.Table, pa.Table]) -> Iterator[object]:
        source, raw, unreadable = element
        events, dead = parse_batch(raw, mapping=self._mapping, tokenizer=self._tokenizer, source=source,
                                   run_id=self._run_id, recorded_at_us=self._recorded)
        if self._suite and events.num_rows:
            from finfeat.validation.validate import validate_table

            outcome = validate_table(events, self._suite, run_id=self._run_id, missing_columns="skip")
            for failure in outcome.failures:
                yield pvalue.TaggedOutput(FAILURES, failure)
            if outcome.quarantined.num_rows:
                yield pvalue.TaggedOutput(QUARANTINE, outcome.quarantined)
                yield _stat("events_quarantined", outcome.quarantined.num_rows)
            events = outcome.passed
        self._parsed.inc(events.num_rows)
        self._dead.inc(dead.num_rows + unreadable.num_rows)
        yield _stat("rows_read", raw.num_rows + unreadable.num_rows)
        if unreadable.num_rows:
            yield pvalue.TaggedOutput(DEAD, unreadable)
        if events.num_rows:
            yield events
        if dead.num_rows:
            yield pvalue.TaggedOutput(DEAD, dead)


class _RepeatedHashes(beam.CombineFn):
    """The hashes that occur more than once among all the arrays of hashes it is given."""

    def create_accumulator(self) -> list[np.ndarray]:
        return []

    def add_input(self, acc: list[np.ndarray], hashes: np.ndarray) -> list[np.ndarray]:
        acc.append(hashes)
        return acc

    def merge_accumulators(self, accs: Iterator[list[np.ndarray]]) -> list[np.ndarray]:
        return [a for acc in accs for a in acc]

    def compact(self, acc: list[np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate(acc)] if len(acc) > 1 else acc

    def extract_output(self, acc: list[np.ndarray]) -> np.ndarray:
        if not acc:
            return np.zeros(0, dtype=np.uint64)
        values, counts = np.unique(np.concatenate(acc), return_counts=True)
        return values[counts > 1]


class DeduplicateEvents(beam.PTransform):
    """Every txn id once (repeated copies become dead letters), labels from a feed attached.

    Bounded input. Takes the events, or ``{"events": ..., "labels": ...}`` to join a labels
    feed on txn id in the same shuffle; gives ``{"events": ..., "dead_letters": ...}``.
    """

    def __init__(self, *, buckets: int, run_id: str, recorded_at_us: int) -> None:
        super().__init__()
        self._buckets, self._run_id, self._recorded = buckets, run_id, recorded_at_us

    def expand(self, inputs: beam.PCollection | dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        if not isinstance(inputs, dict):
            inputs = {"events": inputs}
        if set(inputs) == {"events"}:
            return self._only_repeats_shuffled(inputs["events"])
        return self._all_shuffled(inputs)

    def _only_repeats_shuffled(self, events: beam.PCollection) -> dict[str, beam.PCollection]:
        """Without a labels feed only the events whose txn id repeats need to meet: a narrow
        global pass finds the repeated txn-id hashes, and only those events (every copy of a
        repeated id, and any that share its hash) cross the shuffle by txn id."""
        repeated = (events
                    | "HashTxnIds" >> beam.Map(lambda t: stable_hash(t.column("txn_id")))
                    | "FindRepeatedTxnIds" >> beam.CombineGlobally(_RepeatedHashes()))

        def split(table: pa.Table, repeats: np.ndarray) -> Iterator[object]:
            if len(repeats):
                mask = np.isin(stable_hash(table.column("txn_id")), repeats)
                if mask.any():
                    yield pvalue.TaggedOutput("repeated", table.filter(pa.array(mask)))
                    table = table.filter(pa.array(~mask))
            if table.num_rows:
                yield attach_labels(table, None)

        parts = events | "SplitRepeatedTxnIds" >> beam.FlatMap(
            split, repeats=pvalue.AsSingleton(repeated)).with_output_types(pa.Table).with_outputs(
                "repeated", main="unique")
        shuffled = self._all_shuffled({"events": parts.repeated})
        unique = (parts.unique, shuffled["events"]) | "FlattenUniqueEvents" >> beam.Flatten()
        return {"events": unique, DEAD: shuffled[DEAD]}

    def _all_shuffled(self, inputs: dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        run_id, recorded, buckets = self._run_id, self._recorded, self._buckets
        keyed = {name: pcoll | f"Partition{name.capitalize()}ByTxnId" >> beam.FlatMap(
                     split_by_bucket, "txn_id", buckets).with_output_types(Keyed)
                 for name, pcoll in inputs.items()}

        def dedup(item: tuple[int, dict[str, list[pa.Table]]]) -> Iterator[object]:
            _, parts = item
            if not parts["events"]:
                return
            unique, dead = deduplicate(pa.concat_tables(list(parts["events"])), run_id=run_id,
                                       recorded_at_us=recorded)
            labels = pa.concat_tables(list(parts["labels"])) if parts.get("labels") else None
            yield attach_labels(unique, labels)
            if dead.num_rows:
                yield pvalue.TaggedOutput(DEAD, dead)

        out = (keyed
               | "GroupByTxnId" >> beam.CoGroupByKey()
               | "KeepOneCopy" >> beam.FlatMap(dedup).with_output_types(pa.Table).with_outputs(DEAD, main="events"))
        return {"events": out.events, DEAD: out[DEAD]}


class ParseLabelsFn(beam.DoFn):
    """Raw labels-feed batch -> label rows; bad rows become dead letters (stage ``labels``)."""

    def __init__(self, *, run_id: str, recorded_at_us: int) -> None:
        self._run_id, self._recorded = run_id, recorded_at_us

    def process(self, element: tuple[str, pa.Table, pa.Table]) -> Iterator[object]:
        source, raw, unreadable = element
        labels, dead = parse_labels(raw, source=source, run_id=self._run_id, recorded_at_us=self._recorded)
        yield _stat("label_rows_read", raw.num_rows + unreadable.num_rows)
        yield _stat("labels_accepted", labels.num_rows)
        if labels.num_rows:
            yield labels
        for table in (dead, unreadable):
            if table.num_rows:
                yield pvalue.TaggedOutput(DEAD, table)


def _emit_mask(table: pa.Table, emit_from_us: int | None, emit_until_us: int | None) -> pa.Array:
    t = table.column("event_time").cast(pa.int64())
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    if emit_from_us is not None:
        mask = pc.and_(mask, pc.greater_equal(t, emit_from_us))
    if emit_until_us is not None:
        mask = pc.and_(mask, pc.less(t, emit_until_us))
    return mask


def _in_range(rows: pa.Table, events: pa.Table, emit_from_us: int | None, emit_until_us: int | None) -> pa.Table:
    """The rows of ``rows`` whose event (the same row of ``events``) is in the emit range; ``rows``
    itself, not a copy, when all are."""
    if emit_from_us is None and emit_until_us is None:
        return rows
    mask = _emit_mask(events, emit_from_us, emit_until_us)
    return rows if pc.all(mask).as_py() is not False else rows.filter(mask)


def _columns_needed(defs: tuple, entity: str, anchor_col: str) -> list[str]:
    """The event columns an entity's features read (so only those are shuffled)."""
    cols = ["txn_id", "event_time", ENTITY_COLUMNS[entity], anchor_col]
    for f in defs:
        if f.field:
            cols.append(FIELD_COLUMNS[f.field])
        if f.agg == "geo_velocity":
            cols += ["merchant_lat", "merchant_lon"]
        if f.agg == "fraud_rate":
            cols += ["is_fraud", "label_time"]
    return list(dict.fromkeys(cols))


def _join_on_txn_id(rows: pa.Table, right: pa.Table) -> pa.Table:
    """``rows`` with ``right``'s other columns, matched on txn id (a left outer join that keeps
    ``rows``' order). Matches on a 64-bit hash of the id, checked against the ids themselves:
    if two ids share a hash, Arrow's hash join on the strings decides instead."""
    if right.num_rows == 0 or rows.num_rows == 0:
        return rows.join(right, keys="txn_id", join_type="left outer")
    rh = stable_hash(right.column("txn_id"))
    order = np.argsort(rh, kind="stable")
    sorted_h = rh[order]
    if len(sorted_h) > 1 and (sorted_h[1:] == sorted_h[:-1]).any():
        return rows.join(right, keys="txn_id", join_type="left outer")
    lh = stable_hash(rows.column("txn_id"))
    pos = np.minimum(np.searchsorted(sorted_h, lh), len(sorted_h) - 1)
    found = sorted_h[pos] == lh
    idx = pa.array(order[pos], mask=~found)
    ids = right.column("txn_id").take(idx)
    same = pc.fill_null(pc.equal(ids, rows.column("txn_id")), False).to_numpy(zero_copy_only=False)
    if not (same == found).all():  # a hash that matched another id: let the string join decide
        return rows.join(right, keys="txn_id", join_type="left outer")
    taken = right.drop_columns(["txn_id"]).take(idx)
    for name in taken.column_names:
        rows = rows.append_column(taken.schema.field(name), taken.column(name))
    return rows


class ComputeFeatures(beam.PTransform):
    """Exact point-in-time features for a PCollection of event tables -> ``{"features", "late"}``.

    Bounded input is computed as below; unbounded input goes through
    :class:`finfeat.pipelines.streaming.ComputeFeaturesUnbounded` (per-entity state and
    event-time timers) that calls the same engine. ``late`` holds events that arrived after
    their features could still be exact (always empty for bounded input).

    Each entity kind (card, merchant) is partitioned by a stable hash of its key so that one
    worker holds all of an entity's history; the arithmetic is
    :func:`finfeat.transforms.features.compute_entity_features`, the same function the
    streaming job and the online lookup call. The first entity of the spec (the card) is the
    anchor: the other entities' features, a few narrow columns, travel to the anchor's
    partitions and are joined there, so the wide rows are shuffled only once.
    Only events with ``emit_from_us <= event_time < emit_until_us`` produce rows; the others
    are history that warms the windows up.
    """

    def __init__(self, *, spec: FeatureSpec, buckets: int = 8, emit_from_us: int | None = None,
                 emit_until_us: int | None = None) -> None:
        super().__init__()
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        self._spec, self._buckets = spec, buckets
        self._from, self._until = emit_from_us, emit_until_us

    def expand(self, events: beam.PCollection) -> dict[str, beam.PCollection]:
        if not events.is_bounded:
            if self._from is not None or self._until is not None:
                raise ValueError("an emit range applies to bounded input only")
            return events | "Unbounded" >> ComputeFeaturesUnbounded(spec=self._spec)
        spec, buckets, lo, hi = self._spec, self._buckets, self._from, self._until
        schema = feature_schema(spec)
        entities = list(spec.entities)
        anchor = entities[0] if entities else None
        anchor_col = ENTITY_COLUMNS[anchor] if anchor else "txn_id"
        # the anchor's partitions get only what its features and the feature rows read (the wide
        # rows cross this shuffle: e.g. the card's own coordinates stay behind)
        anchor_needed = list(dict.fromkeys(
            [*(_columns_needed(spec.for_entity(anchor), anchor, anchor_col) if anchor else ["txn_id", "event_time"]),
             *(c for c in IDENTITY_COLUMNS if c != "event_date")]))

        def partition_anchor(table: pa.Table) -> list[tuple[int, pa.Table]]:
            return split_by_bucket(table.select([c for c in anchor_needed if c in table.column_names]),
                                   anchor_col, buckets)

        branches: dict[str, beam.PCollection] = {
            "events": events | "PartitionByAnchor" >> beam.FlatMap(partition_anchor).with_output_types(Keyed)}
        for entity in entities[1:]:
            label = entity.capitalize()
            defs = spec.for_entity(entity)

            def entity_features(item: tuple[int, list[pa.Table]], defs=defs, entity=entity
                                ) -> Iterator[tuple[int, pa.Table]]:
                _, pieces = item
                table = pa.concat_tables(list(pieces))
                cols = compute_entity_features(table, defs, entity)
                out = pa.table({"txn_id": table.column("txn_id"), anchor_col: table.column(anchor_col), **cols})
                yield from split_by_bucket(_in_range(out, table, lo, hi), anchor_col, buckets)

            needed = _columns_needed(defs, entity, anchor_col)
            branches[entity] = (events
                                | f"Project{label}Columns" >> beam.Map(lambda t, cols=needed: t.select(cols)
                                                                       ).with_output_types(pa.Table)
                                | f"PartitionBy{label}" >> beam.FlatMap(split_by_bucket, ENTITY_COLUMNS[entity],
                                                                         buckets).with_output_types(Keyed)
                                | f"GroupBy{label}" >> beam.GroupByKey()
                                | f"Compute{label}Features" >> beam.FlatMap(entity_features).with_output_types(Keyed))

        def assemble(item: tuple[int, dict[str, list[pa.Table]]]) -> Iterator[pa.Table]:
            """All of an anchor bucket's events: anchor features, calendar, identity, then the
            other entities' (narrow) feature columns joined on txn id."""
            _, parts = item
            if not parts["events"]:
                return
            table = pa.concat_tables(parts["events"])
            cols = compute_entity_features(table, spec.for_entity(anchor), anchor) if anchor else {}
            cols.update(compute_calendar_features(table, spec.for_entity("event")))
            t_us = table.column("event_time").cast(pa.int64()).to_numpy()
            cols["event_date"] = pa.array(t_us // 86_400_000_000, pa.int32()).cast(pa.date32())
            for name in IDENTITY_COLUMNS:
                if name not in cols:
                    cols[name] = table.column(name)
            rows = _in_range(pa.table(cols), table, lo, hi)
            for entity in entities[1:]:
                if rows.num_rows == 0:
                    break
                if not parts[entity]:
                    raise RuntimeError(f"no {entity} features for a bucket that has events")
                right = pa.concat_tables(parts[entity]).drop_columns([anchor_col])
                rows = _join_on_txn_id(rows, right)
            if rows.num_rows:
                yield rows.select(schema.names).cast(schema)

        features = (branches
                    | "GroupByAnchor" >> beam.CoGroupByKey()
                    | "AssembleFeatureRows" >> beam.FlatMap(assemble).with_output_types(pa.Table))
        late = events.pipeline | "NoLateEventsInBatch" >> beam.Create([])
        return {"features": features, "late": late}


def spec_label_delay_us(spec: FeatureSpec) -> int:
    """How long after its transaction a label that came with the event counts as known: the
    longest delay of the spec's label-aware features, else the default."""
    delays = [f.delay_us for f in spec.features if f.agg == "fraud_rate"]
    return max(delays) if delays else window_us(DEFAULT_LABEL_DELAY)


class BuildFeatures(beam.PTransform):
    """Raw ``(source, batch, unreadable dead letters)`` triples (or ``{"raw": ..., "labels": ...}``
    with a labels feed read the same way) -> ``{"features", "dead_letters", "stats", "labels",
    "quarantined_events", "event_failures"}``.

    ``stats`` carries ``(name, count)`` pairs from every stage so that a run can reconcile
    ``rows read = events accepted + dead letters`` on any runner.
    """

    def __init__(self, *, mapping: Mapping, spec: FeatureSpec, token_key: bytes, run_id: str,
                 recorded_at_us: int, emit_from_us: int | None = None, emit_until_us: int | None = None,
                 buckets: int = 8, label_delay_us: int | None = None, event_suite: str | None = None) -> None:
        super().__init__()
        self._event_suite = event_suite
        self._label_delay_us = label_delay_us if label_delay_us is not None else spec_label_delay_us(spec)
        CardTokenizer(token_key)  # fail at construction on a bad key
        self._mapping, self._spec, self._key = mapping, spec, token_key
        self._run_id, self._recorded, self._buckets = run_id, recorded_at_us, buckets
        self._from, self._until = emit_from_us, emit_until_us

    def expand(self, inputs: beam.PCollection | dict[str, beam.PCollection]) -> dict[str, beam.PCollection]:
        raw, label_raw = (inputs["raw"], inputs.get("labels")) if isinstance(inputs, dict) else (inputs, None)
        parsed = raw | "ParseEvents" >> beam.ParDo(
            ParseBatchFn(mapping=self._mapping, token_key=self._key, run_id=self._run_id,
                         recorded_at_us=self._recorded, event_suite=self._event_suite)).with_output_types(
                pa.Table).with_outputs(DEAD, STATS, QUARANTINE, FAILURES, main="events")
        dedup_in: dict[str, beam.PCollection] = {"events": parsed.events}
        dead_parts = [parsed[DEAD]]
        stat_parts = [parsed[STATS]]
        if label_raw is not None:
            labels = label_raw | "ParseLabels" >> beam.ParDo(
                ParseLabelsFn(run_id=self._run_id, recorded_at_us=self._recorded)).with_outputs(DEAD, STATS,
                                                                                              main="labels")
            dedup_in["labels"] = labels.labels
            dead_parts.append(labels[DEAD])
            stat_parts.append(labels[STATS])
        unique = dedup_in | "DeduplicateEvents" >> DeduplicateEvents(
            buckets=self._buckets, run_id=self._run_id, recorded_at_us=self._recorded)
        warmup = self._spec.max_window_us
        lo = None if self._from is None else self._from - warmup
        emit_from, until = self._from, self._until
        delay = self._label_delay_us

        unbounded = sorted({f.entity for f in self._spec.features if f.agg in UNBOUNDED_AGGS})

        def in_reach(table: pa.Table) -> Iterator[object]:
            """The range plus the warm-up windows, plus each entity's newest (located) event
            before them, which features without a window still reach."""
            yield _stat("events_accepted", table.num_rows)
            table = table.drop_columns(["_source", "_source_row"])
            kept = _in_range(table, table, lo, until)
            if lo is not None and unbounded:
                before = table.filter(pc.less(table.column("event_time").cast(pa.int64()), lo))
                tails = np.unique(np.concatenate([history_tail(before, e) for e in unbounded]))
                kept = pa.concat_tables([before.take(pa.array(tails, pa.int64())), kept])
            yield _stat("events_outside_range", table.num_rows - kept.num_rows)
            labelled = label_rows(_in_range(kept, kept, emit_from, until), delay_us=delay)
            if labelled.num_rows:
                yield pvalue.TaggedOutput(LABELS, labelled)
            if kept.num_rows:
                yield kept

        events = unique["events"] | "SelectWarmupAndRange" >> beam.FlatMap(in_reach).with_output_types(
            pa.Table).with_outputs(STATS, LABELS, main="events")
        computed = events.events | "ComputeFeatures" >> ComputeFeatures(
            spec=self._spec, buckets=self._buckets, emit_from_us=self._from, emit_until_us=self._until)
        features = computed["features"]

        def count(table: pa.Table) -> tuple[str, int]:
            return ("features_out", table.num_rows)

        def count_dead(table: pa.Table) -> Iterator[tuple[str, int]]:
            pairs = Counter(zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()))
            for (stage, reason), n in pairs.items():
                yield (f"dead_letters.{stage}.{reason}", n)

        dead = (*dead_parts, unique[DEAD]) | "FlattenDeadLetters" >> beam.Flatten()
        stats = ((*stat_parts, events[STATS], features | "CountFeatures" >> beam.Map(count),
                  dead | "CountDeadLetters" >> beam.FlatMap(count_dead))
                 | "FlattenStats" >> beam.Flatten())
        return {"features": features, "dead_letters": dead, "stats": stats, "labels": events[LABELS],
                "events": events.events,
                "quarantined_events": parsed[QUARANTINE], "event_failures": parsed[FAILURES]}
