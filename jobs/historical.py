"""Point-in-time joins against the user's own rows: ``finfeat training-set --entities FILE`` and
:func:`get_historical_features`.

The entity rows (a Parquet or CSV file, or an Arrow table / pandas frame) carry a ``timestamp``
and either a ``txn_id`` or a ``card_token``, plus any label or extra columns, which come back
as they are, in the same order, with the spec's feature columns and ``as_of`` appended.

* ``txn_id`` rows (used when the column is there): the transaction's row of the features table,
  as the backfill wrote it, if the transaction happened at or before ``timestamp``; all nulls
  otherwise (its features did not exist yet) or when the table does not hold it. ``as_of`` is
  the transaction's event time.
* ``card_token`` rows: the features of a transaction of that card at ``timestamp``, with the
  backfill's window rule. The W-window holds the card's transactions ``y`` in the features table
  with ``y.event_time <= timestamp`` (a transaction at that very instant is known) and
  ``y.event_time > timestamp - W``; every row is computed on its own (the entity rows never see
  each other). Optional columns make the row a full candidate: ``merchant_id`` gives the
  merchant features and ``card_is_new_merchant_*``, ``amount_minor`` the z-score (null without
  them). ``card_geo_velocity_kmh`` is null: the features table keeps no coordinates. ``as_of``
  is the card's newest transaction at or before ``timestamp`` (null: none).

The arithmetic is the engine's (:func:`finfeat.transforms.features.compute_sorted_entity_features`,
the same code the backfill, the stream and the online lookup run): each entity row becomes a
group of its entity's history within the spec's reach (plus the one event before it, which
``seconds_since_last`` needs) followed by the row itself. History is what the features table
holds (the backfilled date ranges): a row whose windows reach before the table's first event
sees less history than the backfill did; :attr:`HistoricalFeatures.short_history` counts them.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LOG = logging.getLogger(__name__)

TIMESTAMP = "timestamp"
AS_OF = "as_of"
_TS = pa.timestamp("us", tz="UTC")
#: A candidate id that sorts after every stored txn id at the same instant.
_AFTER_ALL = "\uffff"


class EntityRowsError(ValueError):
    """The entity rows or the warehouse cannot be joined; the message says how to fix it."""


@dataclass(frozen=True)
class HistoricalFeatures:
    """The entity rows with their features, and how they were made."""

    table: pa.Table
    key: str                       # "txn_id" or "card_token"
    features_version: int
    spec_hash: str
    rows: int
    rows_without_features: int     # txn rows not known at their timestamp / card rows of unknown cards
    short_history: int = 0         # card rows whose windows reach before the table's first event
    null_features: list[str] = field(default_factory=list)  # features null for every row (inputs missing)


def read_entities(path: str | Path) -> pa.Table:
    """A Parquet or CSV file of entity rows, columns as they are (CSV: types inferred by Arrow)."""
    p = Path(path)
    if not p.is_file():
        raise EntityRowsError(f"--entities {p}: no such file (give a Parquet or CSV file)")
    suffix = p.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        import pyarrow.parquet as pq

        return pq.read_table(p)
    if suffix in {".csv", ".txt"}:
        import pyarrow.csv as pcsv

        # key columns stay text (card tokens and txn ids are identifiers, never numbers)
        opts = pcsv.ConvertOptions(column_types={"txn_id": pa.string(), "card_token": pa.string(),
                                                 "merchant_id": pa.string()})
        return pcsv.read_csv(p, convert_options=opts)
    raise EntityRowsError(f"--entities {p}: a .parquet or .csv file, please")


def _timestamps(table: pa.Table) -> np.ndarray:
    """The ``timestamp`` column as UTC microseconds (text: ISO-8601, no offset = UTC)."""
    if TIMESTAMP not in table.column_names:
        raise EntityRowsError(f"the entity rows need a {TIMESTAMP!r} column (UTC; ISO-8601 text or a timestamp); "
                              f"they have {table.column_names}")
    col = table.column(TIMESTAMP)
    if col.null_count:
        first = pc.index(pc.is_null(col), True).as_py()
        raise EntityRowsError(f"{TIMESTAMP} is empty in row {first} (and {col.null_count - 1} more)")
    typ = col.type
    if pa.types.is_timestamp(typ):
        us = col.cast(pa.timestamp("us", tz=typ.tz)) if typ.unit != "us" else col
    elif pa.types.is_date(typ):
        us = col.cast(pa.timestamp("us"))
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        import pandas as pd

        try:
            parsed = pd.to_datetime(pd.Series(col.to_pylist()), utc=True, format="ISO8601")
        except (ValueError, TypeError) as exc:
            raise EntityRowsError(f"{TIMESTAMP}: not ISO-8601 times (e.g. 2020-06-22T18:30:00Z): {exc}") from None
        return parsed.astype("datetime64[us, UTC]").to_numpy().astype("datetime64[us]").astype(np.int64)
    else:
        raise EntityRowsError(f"{TIMESTAMP} has type {typ}; give ISO-8601 text or a timestamp")
    return us.cast(pa.int64()).to_numpy().astype(np.int64)


def _key_column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name).combine_chunks()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    return col


def get_historical_features(entities: Any, *, warehouse: str | Path = "warehouse", features_version: int | None = None,
                            feature_spec: Any = None) -> pa.Table:
    """The entity rows (a path, an Arrow table or a pandas frame) with their point-in-time
    features appended (see the module docstring); a pandas frame in, a pandas frame out."""
    as_pandas = type(entities).__module__.startswith("pandas")
    table = pa.Table.from_pandas(entities, preserve_index=False) if as_pandas else entities
    result = historical_features(table, warehouse=warehouse, features_version=features_version,
                                 feature_spec=feature_spec)
    return result.table.to_pandas() if as_pandas else result.table


def historical_features(entities: pa.Table | str | Path, *, warehouse: str | Path = "warehouse",
                        features_version: int | None = None, feature_spec: Any = None) -> HistoricalFeatures:
    """:func:`get_historical_features` with the run's facts (key, version, counts)."""
    from deltalake import DeltaTable

    from finfeat.jobs import delta
    from finfeat.jobs.training import spec_hash_at
    from finfeat.transforms.spec import FeatureSpec

    table = entities if isinstance(entities, pa.Table) else read_entities(entities)
    spec = feature_spec if isinstance(feature_spec, FeatureSpec) else (
        FeatureSpec.from_yaml(feature_spec) if feature_spec else FeatureSpec.default())
    clash = [c for c in (*spec.names, AS_OF) if c in table.column_names]
    if clash:
        raise EntityRowsError(f"the entity rows already have column(s) {clash}; rename them (the output adds them)")
    if "txn_id" in table.column_names:
        key = "txn_id"
    elif "card_token" in table.column_names:
        key = "card_token"
    else:
        raise EntityRowsError(f"the entity rows need a txn_id or a card_token column; they have {table.column_names}")
    at = _timestamps(table)
    keys = _key_column(table, key)
    if keys.null_count:
        first = pc.index(pc.is_null(keys), True).as_py()
        raise EntityRowsError(f"{key} is empty in row {first}")

    path = delta.table_path(warehouse, delta.FEATURES)
    if not DeltaTable.is_deltatable(path):
        raise EntityRowsError(f"no features table at {path}: run `finfeat backfill` first (or pass --warehouse)")
    version = features_version if features_version is not None else DeltaTable(path).version()
    stored_hash = spec_hash_at(path, version)
    if stored_hash and stored_hash != spec.spec_hash:
        raise EntityRowsError(f"{path} (version {version}) was written with feature spec {stored_hash}, not "
                              f"{spec.spec_hash}: pass the spec it was written with (--feature-spec)")
    dt = DeltaTable(path, version=version)
    _LOG.info("point-in-time join of %d %s rows against %s version %d", len(at), key, path, version)
    if key == "txn_id":
        return _by_transaction(table, keys, at, dt, spec, version)
    return _by_card(table, keys, at, dt, spec, version)


def _by_transaction(table: pa.Table, keys: pa.Array, at: np.ndarray, dt: Any, spec: Any,
                    version: int) -> HistoricalFeatures:
    import pyarrow.dataset as pads

    wanted = pc.unique(keys)
    stored = dt.to_pyarrow_dataset().to_table(columns=["txn_id", "event_time", *spec.names],
                                              filter=pads.field("txn_id").isin(wanted))
    pos = pc.index_in(keys, value_set=stored.column("txn_id").combine_chunks())
    t = stored.column("event_time").cast(pa.int64()).to_numpy()
    found = pos.is_valid().to_numpy(zero_copy_only=False)
    p = pos.fill_null(0).to_numpy().astype(np.int64)
    known = found & (t[p] <= at) if stored.num_rows else np.zeros(len(at), dtype=bool)
    take = pa.array(np.where(known, p, 0), mask=~known) if stored.num_rows else pa.nulls(len(at), pa.int64())
    out = table
    for name in spec.names:
        col = stored.column(name).combine_chunks()
        out = out.append_column(name, col.take(take) if stored.num_rows else pa.nulls(len(at), col.type))
    as_of = stored.column("event_time").combine_chunks().cast(_TS)
    out = out.append_column(AS_OF, as_of.take(take) if stored.num_rows else pa.nulls(len(at), _TS))
    return HistoricalFeatures(table=out, key="txn_id", features_version=version, spec_hash=spec.spec_hash,
                              rows=len(at), rows_without_features=int((~known).sum()))


def _by_card(table: pa.Table, keys: pa.Array, at: np.ndarray, dt: Any, spec: Any, version: int) -> HistoricalFeatures:
    import pyarrow.dataset as pads

    from finfeat.jobs.online.base import retention_for
    from finfeat.transforms.features import calendar_values
    from finfeat.transforms.spec import ENTITY_COLUMNS

    label_aware = sorted(d.name for d in spec.features if d.agg == "fraud_rate")
    if label_aware:
        raise EntityRowsError(f"card_token rows: label-aware features ({', '.join(label_aware)}) are not computed "
                              "from the features table (it lacks the feed's label times); give txn_id rows, or a "
                              "spec without them")
    retention = retention_for(spec)
    n = len(at)
    values: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    null_features: list[str] = []
    as_of = np.zeros(n, dtype=np.int64)
    has_as_of = np.zeros(n, dtype=bool)
    short = np.zeros(n, dtype=bool)
    dataset = dt.to_pyarrow_dataset()
    schema_names = set(dataset.schema.names)
    first_event = pc.min(dataset.to_table(columns=["event_time"]).column("event_time")).cast(pa.int64()).as_py()
    for entity in spec.entities:
        ret = retention[entity]
        defs = spec.for_entity(entity)
        key_col = ENTITY_COLUMNS[entity]
        if key_col not in table.column_names:
            for f in defs:
                values[f.name] = (np.zeros(n), np.zeros(n, dtype=bool))
            null_features += [f.name for f in defs]
            continue
        q_keys = _key_column(table, key_col)
        present = [c for c in ret.fields if c in schema_names]
        hist = dataset.to_table(columns=["txn_id", "event_time", key_col, *(c for c in present if c != key_col)],
                                filter=pads.field(key_col).isin(pc.unique(q_keys.drop_null())))
        got, (ent_as_of, ent_has) = _entity_rows(hist, table, q_keys, at, defs, ret)
        keyed = q_keys.is_valid().to_numpy(zero_copy_only=False)
        for f in defs:
            v, ok = got[f.name]
            values[f.name] = (v, ok & keyed)  # a row without the entity's key has none of its features
            own = _own_input(f)
            if (own is not None and own not in table.column_names) or (
                    f.agg == "geo_velocity" and not {"merchant_lat", "merchant_lon"} <= schema_names):
                null_features.append(f.name)
        if entity == spec.entities[0]:
            as_of, has_as_of = ent_as_of, ent_has
            short = (first_event is None) | (at - ret.reach_us < (first_event or 0))
    calendar = calendar_values(at)
    for f in spec.for_entity("event"):
        values[f.name] = (calendar[f.agg], np.ones(n, dtype=bool))
    out = table
    for f in spec.features:
        v, ok = values[f.name]
        out = out.append_column(f.name, pa.array(v, mask=~ok).cast(f.arrow_type) if n else pa.array([], f.arrow_type))
    out = out.append_column(AS_OF, pa.array(as_of, mask=~has_as_of).cast(pa.timestamp("us")).cast(_TS))
    return HistoricalFeatures(table=out, key="card_token", features_version=version, spec_hash=spec.spec_hash,
                              rows=n, rows_without_features=int((~has_as_of).sum()), short_history=int(short.sum()),
                              null_features=sorted(set(null_features), key=spec.names.index))


def _own_input(f: Any) -> str | None:
    """The entity-row column a feature needs of the row itself (None: only history)."""
    from finfeat.transforms.spec import FIELD_COLUMNS

    if f.agg in {"zscore", "is_new"}:
        return FIELD_COLUMNS[f.field]
    return None


def _entity_rows(hist: pa.Table, table: pa.Table, q_keys: pa.Array, at: np.ndarray, defs: Sequence[Any], ret: Any
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """One entity kind's features for every entity row: each row is a group of its entity's
    history within the reach (and the event just before it) followed by the row itself."""
    from finfeat.transforms.features import compute_sorted_entity_features, group_searchsorted
    from finfeat.transforms.spec import ENTITY_COLUMNS

    key_col = ENTITY_COLUMNS[ret.entity]
    n = len(at)
    order = pc.sort_indices(hist, sort_keys=[(key_col, "ascending"), ("event_time", "ascending"),
                                             ("txn_id", "ascending")])
    hist = hist.take(order)
    h_keys = hist.column(key_col).combine_chunks()
    t = hist.column("event_time").cast(pa.int64()).to_numpy().astype(np.int64)
    new = np.ones(len(t), dtype=bool)
    if len(t) > 1:
        new[1:] = pc.not_equal(h_keys.slice(1), h_keys.slice(0, len(t) - 1)).to_numpy(zero_copy_only=False)
    group = np.cumsum(new) - 1
    uniq = h_keys.filter(pa.array(new)) if len(t) else h_keys
    qg_arr = pc.index_in(q_keys, value_set=uniq)
    known = qg_arr.is_valid().to_numpy(zero_copy_only=False)
    qg = qg_arr.fill_null(0).to_numpy().astype(np.int64)

    start = np.zeros(n, dtype=np.int64)
    stop = np.zeros(n, dtype=np.int64)
    if known.any():
        rows = np.flatnonzero(known)
        rows = rows[np.argsort(qg[rows], kind="stable")]
        g = qg[rows]
        first = group_searchsorted(t, group, g, np.full(len(rows), np.iinfo(np.int64).min // 4))
        after = group_searchsorted(t, group, g, at[rows] + 1)               # events at or before the row
        lo = group_searchsorted(t, group, g, at[rows] - ret.reach_us + 1)     # ... inside the reach
        start[rows] = np.maximum(lo - 1, first)                               # plus the one just before it
        stop[rows] = after
    lens = stop - start
    sizes = lens + 1
    total = int(sizes.sum())
    base = np.cumsum(sizes) - sizes
    qpos = base + lens
    is_query = np.zeros(total, dtype=bool)
    is_query[qpos] = True
    hist_idx = np.repeat(start - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    out_group = np.repeat(np.arange(n, dtype=np.int64), sizes)
    out_t = np.empty(total, dtype=np.int64)
    out_t[~is_query] = t[hist_idx]
    out_t[qpos] = at

    columns: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    take = pa.array(hist_idx)
    for name in ret.fields:
        h_col = hist.column(name).combine_chunks().take(take) if name in hist.column_names else None
        q_col = table.column(name).combine_chunks() if name in table.column_names else None
        columns[name] = _column(name, h_col, q_col, total, is_query, n)
    got = compute_sorted_entity_features(out_group, out_t, columns, defs, qpos)
    has = stop > start
    has &= known
    prev = np.where(has, stop - 1, 0)
    as_of = t[prev] if len(t) else np.zeros(n, dtype=np.int64)
    for f in defs:
        own = _own_input(f)
        if own is not None:
            v, ok = got[f.name]
            if own in table.column_names:
                ok = ok & table.column(own).is_valid().to_numpy(zero_copy_only=False)
            else:
                ok = np.zeros(n, dtype=bool)
            got[f.name] = (v, ok)
    return got, (as_of, has)


def _column(name: str, h_col: pa.Array | None, q_col: pa.Array | None, total: int, is_query: np.ndarray,
            n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """One field column of the expanded rows, as the engine takes it (text as integer codes)."""
    from finfeat.jobs.online.lookup import _FIELD_TYPES

    typ = _FIELD_TYPES.get(name, pa.int64())
    m = total - n
    if typ == pa.string():
        h = h_col if h_col is not None else pa.nulls(m, pa.string())
        q = q_col.cast(pa.string()) if q_col is not None else pa.nulls(n, pa.string())
        codes = pc.dictionary_encode(pa.concat_arrays([h.cast(pa.string()), q])).indices
        codes = codes.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        # a missing text value never equals another one: give each its own negative code
        missing = np.flatnonzero(codes < 0)
        codes[missing] = -1 - np.arange(len(missing))
        out = np.empty(total, dtype=np.int64)
        out[~is_query], out[is_query] = codes[:m], codes[m:]
        return out, None
    if typ == pa.float64():
        out = np.zeros(total, dtype=np.float64)
        valid = np.zeros(total, dtype=bool)
        for col, where in ((h_col, ~is_query), (q_col, is_query)):
            if col is not None:
                col = col.cast(pa.float64())
                out[where] = col.fill_null(0.0).to_numpy(zero_copy_only=False)
                valid[where] = col.is_valid().to_numpy(zero_copy_only=False)
        return out, valid
    out = np.zeros(total, dtype=np.int64)
    for col, where in ((h_col, ~is_query), (q_col, is_query)):
        if col is not None:
            out[where] = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    return out, None
