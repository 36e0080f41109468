"""Warehouses for the training-set, training, scoring and Spark tests.

* :func:`sparkov_warehouse`: the bundled Sparkov files backfilled (features + labels tables, as
  the backfill writes them), built once per test session;
* :func:`edge_warehouse`: a hand-made features table and labels table whose rows sit on every
  branch and boundary of the label-maturity rule (:data:`EDGE_EXPECTED`).
"""
from __future__ import annotations

from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from finfeat.schemas.features import feature_schema
from finfeat.schemas.labels import LABEL_SCHEMA
from finfeat.transforms.spec import FeatureSpec
from tests.conftest import RUNNER, SPARKOV_TEST, SPARKOV_TRAIN, TOKEN_KEY

SPARKOV_RANGE = (date(2019, 1, 1), date(2020, 12, 31))
_BUILT: dict[str, Path] = {}


def build_sparkov_warehouse(root: Path) -> Path:
    from finfeat.jobs.backfill import BackfillConfig, run_backfill
    from finfeat.schemas.mapping import Mapping

    run_backfill(BackfillConfig(inputs=[SPARKOV_TRAIN, SPARKOV_TEST], mapping=Mapping.load("sparkov"), warehouse=root,
                                start=SPARKOV_RANGE[0], end=SPARKOV_RANGE[1], token_key=TOKEN_KEY,
                                beam_args=[f"--runner={RUNNER}"], buckets=2))
    return root


@pytest.fixture(scope="session")
def sparkov_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only for tests: copy it (shutil.copytree) before changing anything."""
    if "sparkov" not in _BUILT:
        _BUILT["sparkov"] = build_sparkov_warehouse(tmp_path_factory.mktemp("sparkov_wh"))
    return _BUILT["sparkov"]


# ----------------------------------------------------------------------------------- edge cases

UTC = timezone.utc
EDGE_RANGE = (date(2024, 1, 1), date(2024, 1, 20))
EDGE_CUTOFF = datetime(2024, 1, 20, tzinfo=UTC)
EDGE_DELAY_DAYS = 7  # mature_before = 2024-01-13T00:00:00Z


def _t(day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(2024, 1, day, hour, minute, second, us, tzinfo=UTC)


#: txn id -> (event time, features' own is_fraud, [(label, label_time, source)], expected status, label)
EDGE_ROWS: dict[str, tuple[datetime, bool | None, list[tuple[bool, datetime, str]], str | None, bool | None]] = {
    "a_matured_fraud": (_t(5, 10), True, [(True, _t(12, 10), "events")], "matured", True),
    "b_matured_genuine": (_t(5, 11), False, [(False, _t(12, 11), "events")], "matured", False),
    "c_old_unlabelled": (_t(6), None, [], "assumed_negative", False),
    "d_exactly_mature": (_t(13), None, [], "assumed_negative", False),
    "e_just_immature": (_t(13, us=1), None, [], "immature", None),
    "f_early_report": (_t(15), True, [(True, _t(16), "chargebacks.csv")], "matured", True),
    "g_reported_later": (_t(15, 5), True, [(True, _t(25), "chargebacks.csv")], "immature", None),
    "h_old_reported_later": (_t(8), True, [(True, _t(21), "chargebacks.csv")], "assumed_negative", False),
    "i_label_at_cutoff": (_t(19), False, [(True, _t(20), "chargebacks.csv")], "matured", True),
    "j_after_cutoff": (_t(20, 0, 0, 1), False, [(False, _t(20, 0, 0, 1), "events")], "after_cutoff", None),
    "k_feed_overrides": (_t(3), False, [(False, _t(10), "events"), (True, _t(18), "chargebacks.csv")], "matured", True),
    "l_override_too_late": (_t(4), True, [(True, _t(11), "events"), (False, _t(25), "chargebacks.csv")],
                            "matured", True),
    "n_ingest_label_ignored": (_t(2), True, [], "assumed_negative", False),
    "o_same_time_tie": (_t(9), False, [(False, _t(16), "a.csv"), (True, _t(16), "b.csv")], "matured", True),
}
#: Outside the range: never read.
EDGE_OUTSIDE = {"m_next_day": (datetime(2024, 1, 21, 1, tzinfo=UTC), True, [(True, _t(19), "chargebacks.csv")])}
EDGE_EXPECTED = {k: (v[3], v[4]) for k, v in EDGE_ROWS.items()}


def edge_features() -> pa.Table:
    spec = FeatureSpec.default()
    schema = feature_schema(spec)
    rows = {**{k: v[:2] for k, v in EDGE_ROWS.items()}, **{k: v[:2] for k, v in EDGE_OUTSIDE.items()}}
    n = len(rows)
    names = list(rows)
    cols: dict[str, pa.Array] = {
        "txn_id": pa.array(names, pa.string()),
        "card_token": pa.array([f"tok_{i % 3}" for i in range(n)], pa.string()),
        "merchant_id": pa.array([f"m{i % 4}" for i in range(n)], pa.string()),
        "event_time": pa.array([t for t, _ in rows.values()], schema.field("event_time").type),
        "event_date": pa.array([t.date() for t, _ in rows.values()], pa.date32()),
        "amount_minor": pa.array([1000 + 37 * i for i in range(n)], pa.int64()),
        "currency": pa.array(["USD"] * n, pa.string()),
        "channel": pa.array(["pos"] * n, pa.string()),
        "merchant_category": pa.array([None if i % 5 == 0 else "grocery_pos" for i in range(n)], pa.string()),
        "is_fraud": pa.array([f for _, f in rows.values()], pa.bool_()),
    }
    for j, f in enumerate(spec.arrow_fields()):
        if pa.types.is_boolean(f.type):
            values = [None if (i + j) % 4 == 0 else (i + j) % 2 == 0 for i in range(n)]
        elif pa.types.is_floating(f.type):
            values = [None if (i + j) % 3 == 0 else (i * 1.5 + j) / 7 for i in range(n)]
        else:
            values = [(i * 3 + j) % 11 for i in range(n)]
        cols[f.name] = pa.array(values, f.type)
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def edge_labels() -> pa.Table:
    rows = []
    for txn, (_, _, labels, *_rest) in {**EDGE_ROWS, **{k: (*v, None, None) for k, v in EDGE_OUTSIDE.items()}}.items():
        for fraud, when, source in labels:
            rows.append((txn, fraud, when, source))
    return pa.Table.from_arrays(
        [pa.array([r[0] for r in rows], pa.string()), pa.array([r[1] for r in rows], pa.bool_()),
         pa.array([r[2] for r in rows], LABEL_SCHEMA.field("label_time").type),
         pa.array([r[3] for r in rows], pa.string()), pa.array([r[2].date() for r in rows], pa.date32())],
        schema=LABEL_SCHEMA)


def build_edge_warehouse(root: Path) -> Path:
    """features v0 and labels v0 as above (labels written with deltalake in the labels schema)."""
    write_deltalake(str(root / "features"), edge_features(), partition_by=["event_date"],
                    commit_properties=_props({"finfeat.spec_hash": FeatureSpec.default().spec_hash}))
    write_deltalake(str(root / "labels"), edge_labels(), partition_by=["label_date"])
    return root


def _props(meta: dict[str, str]):  # noqa: ANN202
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata=meta)


def add_late_label(root: Path, txn_id: str, fraud: bool, when: datetime, source: str = "late.csv") -> int:
    """Append one label row (a new labels version) and return that version."""
    t = pa.Table.from_arrays(
        [pa.array([txn_id]), pa.array([fraud]), pa.array([when], LABEL_SCHEMA.field("label_time").type),
         pa.array([source]), pa.array([when.date()], pa.date32())], schema=LABEL_SCHEMA)
    write_deltalake(str(root / "labels"), t, partition_by=["label_date"], mode="append")
    return DeltaTable(str(root / "labels")).version()


@pytest.fixture()
def edge_warehouse(tmp_path: Path) -> Path:
    return build_edge_warehouse(tmp_path / "edge_wh")


def small_files_copy(src_features: Path, dest: Path, parts: int = 4, until: date | None = None) -> pa.Table:
    """The features table (event dates up to ``until``) rewritten as ``parts`` appends: several
    small files per partition."""
    table = DeltaTable(str(src_features)).to_pyarrow_table().sort_by([("txn_id", "ascending")])
    if until is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.less_equal(table.column("event_date"), pa.scalar(until, pa.date32())))
    step = -(-table.num_rows // parts)
    for i in range(parts):
        write_deltalake(str(dest), table.slice(i * step, step), partition_by=["event_date"], mode="append")
    return table

