"""Nothing lost, nothing doubled: all-rejected runs, kill -9 at every commit boundary, concurrent
backfills, a warehouse that is a file, bad tokenization keys, output permissions.

Real Delta tables and real ``finfeat backfill`` processes; the kill and the concurrent start come
from the test hooks in ``finfeat.jobs.testhooks`` (environment variables, inert otherwise).
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from finfeat.jobs import testhooks
from finfeat.jobs.cli import DEMO_TOKEN_KEY, main
from finfeat.jobs.delta import RUN_KEY, read_table
from tests.conftest import RUNNER, SPARKOV_TRAIN

KEY = "reliability-test-key-0123456789"
#: columns that differ between two runs of the same input by construction (who and when)
VOLATILE = {"run_id", "recorded_at", "recorded_date", "quarantined_at", "quarantined_date"}
TABLES = ("features", "labels", "dead_letters", "quarantine/features")
BIG = 50_000  # minor units; a few rows of the slice are larger: quarantined by the suite below


def _slice(path: Path, *, every: int = 5, bad_every: int = 40, bump: int = 0) -> Path:
    """Every ``every``-th Sparkov row of 2019-01-01..04 (about 1,000 rows), every ``bad_every``-th
    of those with an unparseable amount (a dead letter); ``bump`` cents added to each amount."""
    with SPARKOV_TRAIN.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if r["trans_date_trans_time"] < "2019-01-05"][::every]
        fields = reader.fieldnames
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for i, row in enumerate(rows):
            row = dict(row)
            if bump:
                row["amt"] = f"{float(row['amt']) + bump / 100:.2f}"
            if i % bad_every == 7 % bad_every:
                row["amt"] = "twelve dollars"
            writer.writerow(row)
    return path


def _suite(path: Path) -> Path:
    path.write_text(f"""name: capped
expectations:
  - name: amount_at_most_500_dollars
    policy: drop
    type: expect_column_values_to_be_between
    columns: [amount_minor]
    kwargs: {{min_value: 0, max_value: {BIG}}}
""")
    return path


def _cmd(wh: Path, inputs: list[Path], start: str, end: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "finfeat.jobs.cli", "backfill", *(a for p in inputs for a in ("--input", str(p))),
            "--mapping", "sparkov", "--start", start, "--end", end, "--warehouse", str(wh), "--buckets", "2",
            f"--runner={RUNNER}", *flags]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (testhooks.KILL_AT_ENV, testhooks.BARRIER_ENV)}
    return {**env, "FINFEAT_TOKEN_KEY": KEY, **extra}


def _backfill(wh: Path, inputs: list[Path], start: str, end: str, *flags: str, **env: str
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(wh, inputs, start, end, *flags), capture_output=True, text=True, env=_env(**env),
                          timeout=600)


def _rows(path: Path) -> list[str] | None:
    """A table's rows without the per-run columns, as sorted JSON lines; None if there is no table."""
    if not DeltaTable.is_deltatable(str(path)):
        return None
    table = read_table(path)
    table = table.drop_columns([c for c in table.column_names if c in VOLATILE])
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in table.to_pylist())


def _reports(wh: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((wh / "_runs").glob("*.json"))]


# ------------------------------------------------------------------------------- all rows rejected


def test_all_rejected_run_fails_before_any_commit_and_the_flags_allow_it(tmp_path: Path) -> None:
    good = _slice(tmp_path / "in.csv")
    wh = tmp_path / "wh"
    first = _backfill(wh, [good], "2019-01-01", "2019-01-04", "--no-validate")
    assert first.returncode == 0, first.stderr
    before = {t: _rows(wh / t) for t in ("features", "labels", "dead_letters")}
    versions = {t: DeltaTable(str(wh / t)).version() for t in before}
    assert len(before["features"]) > 900

    # the same path, every amount unparseable now
    _slice(tmp_path / "in.csv", bad_every=1)
    refused = _backfill(wh, [good], "2019-01-01", "2019-01-04", "--no-validate")
    assert refused.returncode == 1
    assert "are dead letters" in refused.stderr and "--max-dead-letter-fraction" in refused.stderr
    assert {t: DeltaTable(str(wh / t)).version() for t in before} == versions
    assert {t: _rows(wh / t) for t in before} == before

    # past the dead-letter guard, the shrink guard still refuses to empty the partitions
    shrink = _backfill(wh, [good], "2019-01-01", "2019-01-04", "--no-validate", "--max-dead-letter-fraction", "1")
    assert shrink.returncode == 1
    assert "would become empty" in shrink.stderr and "--allow-shrink" in shrink.stderr
    assert {t: DeltaTable(str(wh / t)).version() for t in before} == versions
    statuses = [r["status"] for r in _reports(wh)]
    assert sorted(statuses) == ["failed", "failed", "succeeded"]
    assert all(r["committed"] == {} for r in _reports(wh) if r["status"] == "failed")

    # both flags: the user said so
    forced = _backfill(wh, [good], "2019-01-01", "2019-01-04", "--no-validate", "--max-dead-letter-fraction", "1",
                       "--allow-shrink")
    assert forced.returncode == 0, forced.stderr
    assert read_table(wh / "features").num_rows == 0
    dead = read_table(wh / "dead_letters")
    # the rerun of the same inputs and range replaced the first run's dead letters
    assert dead.num_rows == len(before["features"]) + len(before["dead_letters"])
    assert set(dead.column("reason").to_pylist()) == {"wrong_type"}


def test_the_guards_raise_typed_errors_from_run_backfill(tmp_path: Path) -> None:
    from finfeat.jobs.backfill import BackfillConfig, TooManyDeadLetters, run_backfill
    from finfeat.jobs.delta import ShrinkRefused
    from finfeat.schemas.mapping import Mapping

    def cfg(**kw: object) -> BackfillConfig:
        return BackfillConfig(inputs=[tmp_path / "in.csv"], mapping=Mapping.load("sparkov"), warehouse=tmp_path / "wh",
                              start=date(2019, 1, 1), end=date(2019, 1, 4), token_key=KEY.encode(),
                              beam_args=[f"--runner={RUNNER}"], buckets=2, feature_suite=None, event_suite=None, **kw)

    _slice(tmp_path / "in.csv")
    assert run_backfill(cfg())["status"] == "succeeded"
    _slice(tmp_path / "in.csv", bad_every=1)
    with pytest.raises(TooManyDeadLetters, match="100.0%"):
        run_backfill(cfg())
    with pytest.raises(ShrinkRefused, match="--allow-shrink"):
        run_backfill(cfg(max_dead_letter_fraction=1.0))
    assert run_backfill(cfg(max_dead_letter_fraction=1.0, allow_shrink=True))["features_written"] == 0


def test_a_mapping_whose_time_format_matches_nothing_replaces_nothing(tmp_path: Path) -> None:
    source = _slice(tmp_path / "in.csv")
    wh = tmp_path / "wh"
    assert _backfill(wh, [source], "2019-01-01", "2019-01-04", "--no-validate").returncode == 0
    before = {t: _rows(wh / t) for t in ("features", "labels", "dead_letters")}
    mapping = tmp_path / "m.yaml"
    mapping.write_text((Path(__file__).resolve().parents[1] / "jobs" / "mappings" / "sparkov.yaml").read_text()
                       .replace("%Y-%m-%d %H:%M:%S", "%d/%m/%Y %H:%M"))
    cmd = _cmd(wh, [source], "2019-01-01", "2019-01-04", "--no-validate")
    cmd[cmd.index("sparkov")] = str(mapping)
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 1 and "bad_timestamp" in run.stderr and "nothing was committed" in run.stderr
    assert {t: _rows(wh / t) for t in before} == before


def test_a_wider_range_over_a_narrower_input_does_not_wipe_the_other_days(tmp_path: Path) -> None:
    full = _slice(tmp_path / "all.csv")
    wh = tmp_path / "wh"
    assert _backfill(wh, [full], "2019-01-01", "2019-01-04", "--no-validate").returncode == 0
    held = _rows(wh / "features")
    # an input of the first two days only, backfilled over all four
    with full.open() as fh:
        lines = fh.readlines()
    part = tmp_path / "part.csv"
    part.write_text("".join(lines[:1] + [ln for ln in lines[1:] if ",2019-01-01 " in ln or ",2019-01-02 " in ln]))
    run = _backfill(wh, [part], "2019-01-01", "2019-01-04", "--no-validate")
    assert run.returncode == 1 and "2019-01-03, 2019-01-04" in run.stderr
    assert _rows(wh / "features") == held


def test_dead_letter_fraction_flag_is_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["backfill", "--input", "x.csv", "--start", "2019-01-01", "--end", "2019-01-02", "--demo-key",
              "--warehouse", str(tmp_path), "--max-dead-letter-fraction", "1.5"])
    assert exc.value.code == 2
    assert "between 0 and 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------- kill -9, then rerun

#: (kill point, whether the run validates with a dropping suite, so that it writes a quarantine table);
#: validation costs seconds per run, so only the points around the quarantine commit use it
KILL_POINTS = [("started", False), ("before:commit", False), ("after:features", False), ("after:dead_letters", False),
               ("after:labels", False), ("after:labels", True), ("after:quarantine/features", True)]
#: what a run killed at each point has committed, as its report says
COMMITTED_AT = {"started": set(), "before:commit": set(), "after:features": {"features"},
                "after:dead_letters": {"features", "dead_letters"},
                "after:labels": {"features", "dead_letters", "labels"},
                "after:quarantine/features": {"features", "dead_letters", "labels", "quarantine/features"}}
_CRASH: dict[bool, dict] = {}


def _crash_setup(root: Path, validated: bool) -> dict:
    """A warehouse holding an older run (base), the newer input, and what one clean run of the
    newer input leaves on top of the base, per table."""
    if validated not in _CRASH:
        root = root / ("validated" if validated else "plain")
        root.mkdir()
        flags = ("--feature-suite", str(_suite(root / "suite.yaml")), "--max-quarantine-fraction", "0.5") \
            if validated else ("--no-validate",)
        old = _slice(root / "old.csv", bad_every=50)
        new = _slice(root / "new.csv", bad_every=30, bump=7)
        base = root / "base"
        done = _backfill(base, [old], "2019-01-01", "2019-01-04", *flags)
        assert done.returncode == 0, done.stderr
        clean = root / "clean"
        shutil.copytree(base, clean)
        done = _backfill(clean, [new], "2019-01-01", "2019-01-04", *flags)
        assert done.returncode == 0, done.stderr
        expected = {t: _rows(clean / t) for t in TABLES}
        tables = TABLES if validated else TABLES[:3]
        assert all(expected[t] for t in tables), "every table should hold rows in the clean run"
        assert all(expected[t] != _rows(base / t) for t in tables)
        _CRASH[validated] = {"root": root, "base": base, "new": new, "flags": flags, "expected": expected}
    return _CRASH[validated]


@pytest.fixture(scope="module")
def crash_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("crash")


@pytest.mark.parametrize(("point", "validated"), KILL_POINTS)
def test_kill_at_a_commit_boundary_then_rerun_equals_one_clean_run(crash_root: Path, point: str,
                                                                   validated: bool) -> None:
    setup = _crash_setup(crash_root, validated)
    wh = setup["root"] / f"killed_{point.replace(':', '_').replace('/', '_')}"
    shutil.copytree(setup["base"], wh)
    args = (wh, [setup["new"]], "2019-01-01", "2019-01-04", *setup["flags"])
    killed = _backfill(*args, **{testhooks.KILL_AT_ENV: point})
    assert killed.returncode == -9, killed.stderr
    dead_run = next(r for r in _reports(wh) if r["status"] == "running")
    assert set(dead_run["committed"]) == COMMITTED_AT[point]

    rerun = _backfill(*args)
    assert rerun.returncode == 0, rerun.stderr
    for table in TABLES:
        assert _rows(wh / table) == setup["expected"][table], f"{table} after a kill at {point} and a rerun"
    reports = {r["run_id"]: r for r in _reports(wh)}
    assert reports[dead_run["run_id"]]["status"] == "interrupted"
    assert sorted(r["status"] for r in reports.values()) == ["interrupted", "succeeded", "succeeded"]


def test_kill_before_the_online_store_write_then_rerun_completes_the_store(tmp_path: Path) -> None:
    from finfeat.jobs.online import open_store
    from finfeat.transforms.spec import FeatureSpec

    source = _slice(tmp_path / "in.csv")

    def run(name: str, **env: str) -> subprocess.CompletedProcess[str]:
        return _backfill(tmp_path / name, [source], "2019-01-01", "2019-01-04", "--no-validate", "--online-store",
                         f"sqlite:{tmp_path / name}.db", **env)

    assert run("clean").returncode == 0
    assert run("killed", **{testhooks.KILL_AT_ENV: "after:labels"}).returncode == -9
    assert not (tmp_path / "killed.db").exists()
    assert run("killed").returncode == 0
    now = time.time_ns() // 1_000

    def states(name: str) -> dict:
        store = open_store(f"sqlite:{tmp_path / name}.db", FeatureSpec.default(), create=False)
        try:
            return {k: v.canonical() for k, v in store.snapshot(now_us=now).items()}
        finally:
            store.close()

    assert states("killed") == states("clean") != {}
    for table in ("features", "labels", "dead_letters"):
        assert _rows(tmp_path / "killed" / table) == _rows(tmp_path / "clean" / table)
    assert [r["committed"].get("online_store") for r in _reports(tmp_path / "killed")
            if r["status"] == "succeeded"] == [f"sqlite:{tmp_path / 'killed'}.db"]


# ------------------------------------------------------------------------------- concurrent backfills

#: overlapping ranges; two runs share a range (the same run key: a scheduled and a manual run)
RANGES = [("2019-01-01", "2019-01-03"), ("2019-01-02", "2019-01-04"), ("2019-01-01", "2019-01-04"),
          ("2019-01-02", "2019-01-04")]


def _race(wh: Path, source: Path, tag: str) -> list[subprocess.CompletedProcess[str]]:
    """Start one process per range; hold each at its first commit until all are there, then
    release them together."""
    start = wh.parent / f"start-{tag}"
    procs = [subprocess.Popen(_cmd(wh, [source], a, b, "--no-validate"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(**{testhooks.BARRIER_ENV: str(start)})) for a, b in RANGES]
    deadline = time.monotonic() + 600
    while len(list(wh.parent.glob(f"start-{tag}.*.ready"))) < len(procs):
        assert time.monotonic() < deadline, "the processes never reached their first commit"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    start.touch()
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing"])
def test_concurrent_overlapping_backfills_leave_every_row_once(tmp_path: Path, existing: bool) -> None:
    source = _slice(tmp_path / "in.csv")
    reference = tmp_path / "reference"
    done = _backfill(reference, [source], "2019-01-01", "2019-01-04", "--no-validate")
    assert done.returncode == 0, done.stderr
    wh = tmp_path / "wh"
    if existing:
        _slice(tmp_path / "older.csv", bump=3)
        done = _backfill(wh, [tmp_path / "older.csv"], "2019-01-01", "2019-01-04", "--no-validate")
        assert done.returncode == 0, done.stderr

    runs = _race(wh, source, "go")
    assert [r.returncode for r in runs] == [0] * len(RANGES), [r.stderr[-2000:] for r in runs]

    features = read_table(wh / "features")
    ids = features.column("txn_id")
    assert len(pc.unique(ids)) == features.num_rows
    # every row exactly as one run over the union of the ranges writes it
    assert _rows(wh / "features") == _rows(reference / "features")
    labels = read_table(wh / "labels")
    assert len(pc.unique(labels.column("txn_id"))) == labels.num_rows == features.num_rows
    # dead letters: once per distinct range (run key) of this input, whoever won
    dead = read_table(wh / "dead_letters")
    mine = dead.filter(pc.is_in(dead.column(RUN_KEY), pa.array({r["run_key"] for r in _reports(wh)
                                                                 if r["inputs"] == [str(source)]})))
    one_run = read_table(reference / "dead_letters").num_rows
    assert one_run > 0
    assert mine.num_rows == one_run * len(set(RANGES))
    keys = [(k, s, n) for k, s, n in zip(mine.column(RUN_KEY).to_pylist(), mine.column("source").to_pylist(),
                                         mine.column("source_row").to_pylist())]
    assert len(set(keys)) == len(keys)
    if existing:  # the older run's dead letters are another input's: kept
        assert dead.num_rows - mine.num_rows == one_run
    reports = _reports(wh)
    assert all(r["status"] == "succeeded" for r in reports)
    # the release was simultaneous: some commits lost a race and were retried (or lost the create)
    lost = [race for r in reports for race in r.get("commit_races_lost") or []]
    print(f"commit races lost ({'existing' if existing else 'fresh'} warehouse): {lost}")
    assert lost


# ------------------------------------------------------------------------------- outputs, keys, modes


def test_warehouse_that_is_a_file_fails_before_reading(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "warehouse"
    target.write_text("not a folder")
    code = main(["backfill", "--input", str(tmp_path / "missing.csv"), "--mapping", "sparkov", "--start",
                 "2019-01-01", "--end", "2019-01-02", "--demo-key", "--warehouse", str(target)])
    text = capsys.readouterr().err
    # the input does not exist either: the warehouse is checked first, before any input is opened
    assert code == 2 and "is a file, not a folder" in text and "missing.csv" not in text
    below = main(["backfill", "--input", str(SPARKOV_TRAIN), "--mapping", "sparkov", "--start", "2019-01-01",
                  "--end", "2019-01-02", "--demo-key", "--warehouse", str(target / "sub")])
    assert below == 2 and "a part of this path is a file" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_warehouse_fails_before_reading(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code = main(["backfill", "--input", str(SPARKOV_TRAIN), "--mapping", "sparkov", "--start", "2019-01-01",
                 "--end", "2019-01-02", "--demo-key", "--warehouse", str(locked / "wh")])
    assert code == 2 and "permission denied" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "message"), [
    (DEMO_TOKEN_KEY, "public demo key"),
    (" " * 16, "at least 16 bytes"),
    ("  short-key-12  ", "at least 16 bytes"),
    ("abababababababababab", "distinct characters"),
])
def test_weak_token_keys_are_refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path, key: str, message: str) -> None:
    monkeypatch.setenv("FINFEAT_TOKEN_KEY", key)
    code = main(["backfill", "--input", str(SPARKOV_TRAIN), "--mapping", "sparkov", "--start", "2019-01-01",
                 "--end", "2019-01-02", "--warehouse", str(tmp_path / "wh")])
    text = capsys.readouterr().err
    assert code == 2 and message in text and "FINFEAT_TOKEN_KEY" in text
    assert "tokenization.key" not in text
    assert not (tmp_path / "wh" / "features").exists()


def test_demo_key_in_the_variable_is_accepted_with_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from finfeat.jobs.cli import check_token_key

    assert check_token_key(DEMO_TOKEN_KEY.encode(), demo_ok=True) == DEMO_TOKEN_KEY.encode()
    assert check_token_key(KEY.encode(), demo_ok=False) == KEY.encode()


def test_outputs_are_not_world_readable(tmp_path: Path) -> None:
    source = _slice(tmp_path / "in.csv")
    wh = tmp_path / "wh"
    done = subprocess.run(_cmd(wh, [source], "2019-01-01", "2019-01-02", "--no-validate", "--online-store",
                               f"sqlite:{tmp_path / 'online.db'}"), capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    paths = [wh, *wh.rglob("*"), *tmp_path.glob("online.db*")]
    assert any(p.suffix == ".parquet" for p in paths) and any(p.parent.name == "_runs" for p in paths)
    loose = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o007]
    assert loose == []


def test_redis_store_with_a_password_and_a_wrong_one(tmp_path: Path) -> None:
    """``redis://:PASSWORD@HOST:PORT/DB`` as the README documents it, against a redis-server that
    requires a password; a wrong one is a typed store error that does not echo the password."""
    from finfeat.jobs.online import open_store
    from finfeat.jobs.online.base import StoreUnavailable
    from finfeat.jobs.online.local_redis import free_port
    from finfeat.transforms.spec import FeatureSpec
    from tests.conftest import load_events

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port, password = free_port(), "pw-3f9c2a7e51b04d"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--requirepass", password, "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        spec = FeatureSpec.default()
        events, _ = load_events(_slice(tmp_path / "in.csv"), "sparkov")
        events = events.drop_columns(["_source", "_source_row"]).slice(0, 50)
        deadline = time.monotonic() + 20
        while True:
            try:
                store = open_store(f"redis://:{password}@127.0.0.1:{port}/0", spec)
                store.write(events)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "redis-server did not come up"
                time.sleep(0.1)
        assert len(store.snapshot()) > 0
        assert password not in store.location
        store.close()
        with pytest.raises(StoreUnavailable) as exc:
            wrong = open_store(f"redis://:not-the-{password}@127.0.0.1:{port}/0", spec)
            wrong.write(events)
        assert password not in str(exc.value)
    finally:
        proc.kill()
        proc.wait(10)
