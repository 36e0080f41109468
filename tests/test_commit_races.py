"""Each Delta writer of a backfill against itself: N processes (spawned, delta-rs cannot fork)
released at one barrier write overlapping rows into a fresh and into an existing table; every row
must land exactly once. Faster and more direct than whole backfills (tests/test_reliability.py)."""
from __future__ import annotations

import multiprocessing as mp
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from finfeat.jobs import delta
from finfeat.jobs.delta import RUN_KEY, read_table
from finfeat.schemas.dead_letters import DEAD_LETTER_SCHEMA
from finfeat.schemas.labels import LABEL_SCHEMA
from finfeat.transforms.parse import make_dead_letters

WRITERS = 4
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _labels(first: int, n: int, source: str) -> pa.Table:
    times = [T0 + timedelta(hours=i) for i in range(first, first + n)]
    return pa.table({"txn_id": [f"t{i:05d}" for i in range(first, first + n)], "is_fraud": [i % 7 == 0 for i in
                                                                                              range(first, first + n)],
                     "label_time": times, "source": [source] * n, "label_date": [t.date() for t in times]},
                    schema=LABEL_SCHEMA)


def _dead(run_id: str, n: int) -> pa.Table:
    return make_dead_letters(run_id=run_id, stage="parse", reasons=["wrong_type"] * n, details=["amt: 'x'"] * n,
                             source="in.csv", source_rows=list(range(n)), txn_ids=[f"d{i}" for i in range(n)],
                             payloads=["{}"] * n, recorded_at_us=1_700_000_000_000_000)


def _write(kind: str, path: str, i: int, barrier, results) -> None:  # noqa: ANN001
    try:
        meta = {"finfeat.run_id": f"r{i}"}
        barrier.wait(timeout=120)
        races: list[str] = []
        if kind == "labels":  # overlapping txn ids: writer i covers t[i*50, i*50+200)
            delta.upsert_labels(path, _labels(i * 50, 200, "events"), metadata=meta, races=races)
        else:  # the same run key: a scheduled and a manual run of the same inputs and range
            delta.replace_dead_letters(path, _dead(f"r{i}", 30), key="k-same", metadata=meta, races=races)
        results.put((i, "ok", races))
    except Exception as exc:  # reported to the test, which fails on it
        results.put((i, f"{type(exc).__name__}: {exc}", []))


def _race(kind: str, path: str) -> list[tuple[int, str, list[str]]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_write, args=(kind, path, i, barrier, results)) for i in range(WRITERS)]
    for p in procs:
        p.start()
    out = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing"])
def test_concurrent_label_merges_keep_each_txn_once(tmp_path: Path, existing: bool) -> None:
    path = str(tmp_path / "labels")
    if existing:
        delta.upsert_labels(path, _labels(100, 20, "feed.csv"), metadata={})
    out = _race("labels", path)
    assert [s for _, s, _ in out] == ["ok"] * WRITERS, out
    print("lost races:", [r for _, _, r in out])
    table = read_table(path)
    ids = table.column("txn_id")
    assert len(pc.unique(ids)) == table.num_rows == 50 * (WRITERS - 1) + 200
    if existing:  # a feed's label is never replaced by one that came with the event
        kept = table.filter(pc.equal(table.column("source"), "feed.csv"))
        assert kept.num_rows == 20


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing"])
def test_concurrent_dead_letters_of_one_run_key_land_once(tmp_path: Path, existing: bool) -> None:
    path = str(tmp_path / "dead_letters")
    if existing:
        delta.replace_dead_letters(path, _dead("older", 5), key="k-other", metadata={})
        delta.replace_dead_letters(path, _dead("before", 30), key="k-same", metadata={})
    out = _race("dead", path)
    assert [s for _, s, _ in out] == ["ok"] * WRITERS, out
    table = read_table(path)
    same = table.filter(pc.equal(table.column(RUN_KEY), "k-same"))
    assert same.num_rows == 30 and len(set(same.column("run_id").to_pylist())) == 1
    assert table.num_rows == 30 + (5 if existing else 0)
    print("lost races:", [r for _, _, r in out])  # timing-dependent; the whole-backfill race asserts some


def test_a_dead_letter_table_without_run_keys_gains_the_column(tmp_path: Path) -> None:
    path = str(tmp_path / "dead_letters")
    write_deltalake(path, _dead("old", 4), partition_by=["recorded_date"])  # as written before run keys
    for _ in range(2):
        delta.replace_dead_letters(path, _dead("new", 3), key="k1", metadata={})
    table = read_table(path)
    assert table.num_rows == 7
    assert sorted(table.column(RUN_KEY).to_pylist(), key=str) == [None] * 4 + ["k1"] * 3
    # a rerun with nothing rejected any more removes that key's rows, and only those
    delta.replace_dead_letters(path, DEAD_LETTER_SCHEMA.empty_table(), key="k1", metadata={})
    assert read_table(path).num_rows == 4
    assert DeltaTable(path).version() >= 3


def test_a_writer_that_keeps_losing_gives_up_with_a_typed_error(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """Losing every race is a fault the tests cannot cause on purpose: the attempt raises delta-rs's
    own CommitFailedError, as a lost race does."""
    from deltalake.exceptions import CommitFailedError

    monkeypatch.setattr(delta, "COMMIT_ATTEMPTS", 3)
    tries: list[int] = []

    def attempt() -> int:
        tries.append(1)
        raise CommitFailedError("Commit failed: a concurrent transactions added new data.")

    races: list[str] = []
    with pytest.raises(delta.CommitConflict, match="3 commits to .* lost to concurrent writers"):
        delta._commit("features", str(tmp_path / "features"), attempt, races)
    assert len(tries) == 3 and races == ["features", "features"]


def _features(days: dict[date, int]) -> pa.Table:
    rows = [(f"{d}-{i}", d) for d, n in days.items() for i in range(n)]
    return pa.table({"txn_id": [r[0] for r in rows], "event_date": pa.array([r[1] for r in rows], pa.date32())})


@pytest.mark.parametrize(("new", "refused"), [
    ({date(2024, 1, 1): 10, date(2024, 1, 2): 6}, False),   # 16 of 20: a correction
    ({date(2024, 1, 1): 5, date(2024, 1, 2): 4}, True),     # 9 of 20: fewer than half
    ({date(2024, 1, 1): 20}, True),                         # as many rows, but 2024-01-02 would be emptied
    ({}, True),                                             # nothing at all
])
def test_shrink_guard(tmp_path: Path, new: dict[date, int], refused: bool) -> None:
    path = str(tmp_path / "features")
    lo, hi = date(2024, 1, 1), date(2024, 1, 2)
    delta.overwrite_partitions(path, _features({lo: 10, hi: 10, date(2024, 1, 3): 5}), start=lo,
                               end=date(2024, 1, 3), metadata={})
    table = _features(new) if new else _features({lo: 0})
    if refused:
        with pytest.raises(delta.ShrinkRefused, match="--allow-shrink"):
            delta.overwrite_partitions(path, table, start=lo, end=hi, metadata={})
        assert read_table(path).num_rows == 25
    delta.overwrite_partitions(path, table, start=lo, end=hi, metadata={}, allow_shrink=refused)
    assert read_table(path).num_rows == table.num_rows + 5
