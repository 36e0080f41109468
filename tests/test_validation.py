"""Expectation suites inside the pipeline and ``finfeat validate``, on real Delta tables.

Feature rows come from the production engine on the bundled Sparkov test file (5,116 rows); a
few are corrupted on purpose. GX's import takes a few seconds once per session; each
validation of these rows takes under a second.
"""
from __future__ import annotations

import argparse
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import CommitProperties, DeltaTable, write_deltalake

from finfeat.jobs import validate as validate_cmd
from finfeat.schemas.features import IDENTITY_COLUMNS, feature_schema
from finfeat.schemas.quarantine import BROKEN_EXPECTATIONS, QUARANTINE_COLUMNS
from finfeat.transforms.features import compute_features
from finfeat.transforms.spec import FeatureSpec
from finfeat.validation.drift import drift_report, psi
from finfeat.validation.quarantine import append_quarantine, quarantine_path
from finfeat.validation.suite import Suite, SuiteError
from finfeat.validation.validate import QuarantinePolicy, ValidationFailed, ValidationOutcome, validate_table
from tests.conftest import SPARKOV_TEST, load_events

SPEC = FeatureSpec.default()
_US_PER_DAY = 86_400_000_000


def _feature_rows() -> pa.Table:
    events, _ = load_events(SPARKOV_TEST, "sparkov")
    events = events.drop_columns(["_source", "_source_row"])
    features = compute_features(events, SPEC)   # txn_id + features, aligned with the events
    cols = {name: events.column(name) for name in IDENTITY_COLUMNS if name in events.column_names}
    t_us = events.column("event_time").cast(pa.int64()).to_numpy()
    cols["event_date"] = pa.array(t_us // _US_PER_DAY, pa.int32()).cast(pa.date32())
    cols.update({name: features.column(name) for name in SPEC.names})
    schema = feature_schema(SPEC)
    return pa.table({name: cols[name] for name in schema.names}).cast(schema)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dq")


@pytest.fixture(scope="module")
def good_path(warehouse: Path) -> str:
    """A real feature table (version 0), as the backfill writes it."""
    path = str(warehouse / "features")
    write_deltalake(path, _feature_rows(), partition_by=["event_date"], mode="overwrite")
    return path


@pytest.fixture(scope="module")
def good(good_path: str) -> pa.Table:
    return _read(good_path).sort_by([("event_time", "ascending"), ("txn_id", "ascending")])


@pytest.fixture(scope="module")
def baseline(good: pa.Table) -> ValidationOutcome:
    return validate_table(good, "features")


def _read(path: str) -> pa.Table:
    """A Delta table's rows (single-threaded scan: see jobs/validate.py on the exit-time abort)."""
    return DeltaTable(path).to_pyarrow_dataset().to_table(use_threads=False)


def _set(table: pa.Table, column: str, values: dict[int, object]) -> pa.Table:
    """``table`` with ``column[i] = v`` for each ``i: v``."""
    data = table.column(column).to_pylist()
    for i, v in values.items():
        data[i] = v
    i = table.column_names.index(column)
    return table.set_column(i, table.schema.field(i), pa.array(data, table.schema.field(i).type))


def _col(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist()


# -- suites ----------------------------------------------------------------------------------------

def test_suites_load_with_policies_and_the_spec_feature_names() -> None:
    features, events = Suite.load("features"), Suite.load("events")
    assert set(features.columns) <= set(feature_schema(SPEC).names)
    assert {"card_count_1h", "card_count_30d", "hour_of_day", "day_of_week", "card_geo_velocity_kmh",
            "card_std_amount_30d"} <= set(features.columns)
    assert features.rule("currency_iso_4217").policy == "fail"
    assert features.rule("geo_velocity_plausible").policy == "warn"
    assert features.rule("count_non_negative[card_count_1h]").policy == "drop"
    assert features.rule("card_count_24h_le_7d").type == "expect_column_pair_values_a_to_be_greater_than_b"
    assert {"txn_id_unique", "currency_iso_4217", "channel_known", "event_time_plausible",
            "latitude_in_range[card_lat]", "amount_sanity_cap"} <= set(events.names)


def test_a_broken_suite_fails_at_load_naming_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nexpectations:\n  - {name: m, policy: drop, type: expect_column_mean_to_be_between,"
                   " kwargs: {column: a, min_value: 0}}\n")
    with pytest.raises(SuiteError, match="'m'.*row-level"):
        Suite.load(bad)
    bad.write_text("name: x\nexpectations:\n  - {name: y, policy: warn, type: expect_no_such_thing, kwargs: {}}\n")
    with pytest.raises(SuiteError, match="expect_no_such_thing"):
        Suite.load(bad)


def test_clean_table_passes(good: pa.Table, baseline: ValidationOutcome) -> None:
    assert baseline.ok and baseline.failures == []
    assert baseline.quarantined.num_rows == 0 and baseline.passed.num_rows == good.num_rows == 5_116
    assert set(baseline.warnings) <= {"geo_velocity_plausible"}   # real data: a few impossible trips


# -- policies --------------------------------------------------------------------------------------

def test_drop_quarantines_exactly_the_corrupted_rows(good: pa.Table, baseline: ValidationOutcome,
                                                     warehouse: Path) -> None:
    t = good
    t = _set(t, "card_count_1h", {10: -1})
    t = _set(t, "hour_of_day", {20: 25})
    t = _set(t, "card_count_24h", {30: _col(good, "card_count_7d")[30] + 5})
    t = _set(t, "txn_id", {40: _col(good, "txn_id")[41]})                 # a repeat: both copies go
    t = _set(t, "day_of_week", {50: 9})
    t = _set(t, "card_geo_velocity_kmh", {50: 1e6})                        # also breaks a warn expectation
    txn = _col(t, "txn_id")
    expected = {
        (10, txn[10]): ["count_non_negative[card_count_1h]"],
        (20, txn[20]): ["hour_of_day_range"],
        (30, txn[30]): ["card_count_24h_le_7d"],
        (40, txn[40]): ["txn_id_unique"],
        (41, txn[41]): ["txn_id_unique"],
        (50, txn[50]): ["geo_velocity_plausible", "day_of_week_range"],
    }
    out = validate_table(t, "features", run_id="run-1")
    assert out.failures == []
    got = list(zip(_col(out.quarantined, "txn_id"), _col(out.quarantined, BROKEN_EXPECTATIONS)))
    assert out.quarantined.num_rows == 6
    assert sorted(got) == sorted((k[1], v) for k, v in expected.items())
    assert out.passed.num_rows == t.num_rows - 6
    assert not set(_col(out.passed, "txn_id")) & {txn[i] for i in (10, 20, 30, 41, 50)}
    assert set(_col(out.quarantined, "suite")) == {"features"} and set(_col(out.quarantined, "run_id")) == {"run-1"}
    assert out.quarantined.column_names[-len(QUARANTINE_COLUMNS):] == QUARANTINE_COLUMNS
    assert out.warnings["geo_velocity_plausible"] == baseline.warnings.get("geo_velocity_plausible", 0) + 1

    # the quarantine Delta table: the rows, their reasons, the run id from the commit metadata
    q = validate_table(t, "features")            # run_id "" -> filled from the commit's metadata
    path = quarantine_path(warehouse, "features")
    version = append_quarantine(path, q.quarantined, {"finfeat.run_id": "run-2"})
    stored = _read(path)
    assert version == 0 and stored.num_rows == 6
    assert set(_col(stored, "run_id")) == {"run-2"}
    assert sorted(map(tuple, _col(stored, BROKEN_EXPECTATIONS))) == sorted(tuple(v) for v in expected.values())
    assert DeltaTable(path).history(1)[0]["finfeat.run_id"] == "run-2"


def test_warn_only_counts(good: pa.Table, baseline: ValidationOutcome) -> None:
    t = _set(good, "card_geo_velocity_kmh", {1: 50_000.0, 2: 60_000.0, 3: 1e7})
    out = validate_table(t, "features")
    assert out.ok and out.quarantined.num_rows == 0 and out.passed.num_rows == good.num_rows
    assert out.warnings["geo_velocity_plausible"] == baseline.warnings.get("geo_velocity_plausible", 0) + 3


def test_fail_raises_validation_failed_naming_the_expectation(good: pa.Table) -> None:
    t = _set(good, "currency", {5: "XXX", 6: "ZZZ"})
    out = validate_table(t, "features")
    assert out.failed_expectations == ["currency_iso_4217"]
    assert len(out.failures) == 1 and out.failures[0].startswith("currency_iso_4217: 2 of 5,116 rows")
    assert "XXX" in out.failures[0]
    with pytest.raises(ValidationFailed, match="currency_iso_4217") as info:
        out.raise_for_failures()
    assert info.value.failures == out.failures
    assert out.quarantined.num_rows == 0   # fail rows are not quarantined: the run stops


def test_quarantine_fraction_above_the_threshold_fails(good: pa.Table) -> None:
    rows = {i: 24 for i in range(0, 5_116, 50)}                        # 103 rows, 2.0 %
    out = validate_table(_set(good, "hour_of_day", rows), "features", policy=QuarantinePolicy(max_fraction=0.01))
    assert out.quarantined.num_rows == 103
    assert len(out.failures) == 1 and out.failures[0].startswith("quarantine: 103 of 5,116 rows (2.01%)")
    assert "hour_of_day_range: 103" in out.failures[0]
    assert QuarantinePolicy(max_fraction=0.05).check(out) is None
    with pytest.raises(ValidationFailed, match="hour_of_day_range"):
        out.raise_for_failures()


def test_an_expectation_that_cannot_run_fails_whatever_its_policy(good: pa.Table) -> None:
    suite = Suite.from_dict({"name": "odd", "expectations": [
        {"name": "currency_as_number", "policy": "drop", "type": "expect_column_values_to_be_between",
         "kwargs": {"column": "currency", "min_value": 0}}]})
    out = validate_table(good.slice(0, 100), suite)
    assert out.failed_expectations == ["currency_as_number"]
    assert out.failures[0].startswith("currency_as_number: could not be evaluated")
    lacking = good.drop_columns(["hour_of_day"])
    assert validate_table(lacking, "features").failed_expectations == ["feature_defined[hour_of_day]",
                                                                        "hour_of_day_range"]
    skipped = validate_table(lacking, "features", missing_columns="skip")
    assert skipped.ok and skipped.summary()["skipped"] == ["feature_defined[hour_of_day]", "hour_of_day_range"]


def _commit(path: str, table: pa.Table, quarantine: str, policy: QuarantinePolicy) -> None:
    """The commit step as the backfill does it: validate, stop on failure, then commit."""
    out = validate_table(table, "features", policy=policy, run_id="r")
    out.raise_for_failures()                    # before any commit
    write_deltalake(path, out.passed, partition_by=["event_date"], mode="overwrite")
    append_quarantine(quarantine, out.quarantined, {"finfeat.run_id": "r"})


def test_a_failing_run_commits_nothing(good: pa.Table, tmp_path: Path) -> None:
    path, quarantine = str(tmp_path / "features"), str(tmp_path / "quarantine")
    write_deltalake(path, good, partition_by=["event_date"])
    bad = _set(_set(good, "card_count_1h", {3: -5}), "currency", {4: "XXX"})
    with pytest.raises(ValidationFailed, match="currency_iso_4217"):
        _commit(path, bad, quarantine, QuarantinePolicy(0.01))
    too_many = _set(good, "hour_of_day", {i: 99 for i in range(0, 5_116, 10)})
    with pytest.raises(ValidationFailed, match="quarantine: 512 of 5,116"):
        _commit(path, too_many, quarantine, QuarantinePolicy(0.01))
    assert DeltaTable(path).version() == 0 and _read(path).num_rows == good.num_rows
    assert not DeltaTable.is_deltatable(quarantine)
    _commit(path, _set(good, "card_count_1h", {3: -5}), quarantine, QuarantinePolicy(0.01))
    assert DeltaTable(path).version() == 1 and _read(path).num_rows == good.num_rows - 1
    assert _read(quarantine).num_rows == 1


# -- finfeat validate -----------------------------------------------------------------------------

def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="finfeat")
    sub = parser.add_subparsers(dest="command", required=True)
    validate_cmd.add_parser(sub)
    args = parser.parse_args(["validate", *argv])
    return validate_cmd.run(args)


@pytest.fixture(scope="module")
def versions(good_path: str, good: pa.Table) -> dict[str, int]:
    """Version 0 good, 1 corrupted (a drop and a fail expectation broken), 2 good but shifted."""
    corrupted = _set(_set(good, "currency", {7: "XXX"}), "card_count_1h", {8: -1})
    write_deltalake(good_path, corrupted, partition_by=["event_date"], mode="overwrite")
    scaled = good
    for name in ("card_sum_amount_1h", "card_sum_amount_24h", "card_sum_amount_7d", "card_sum_amount_30d",
                 "card_max_amount_24h"):
        scaled = scaled.set_column(scaled.column_names.index(name), name, pc.multiply(scaled.column(name), 10))
    for name in ("card_avg_amount_7d", "card_avg_amount_30d", "card_std_amount_30d"):
        scaled = scaled.set_column(scaled.column_names.index(name), name, pc.multiply(scaled.column(name), 10.0))
    scaled = scaled.set_column(scaled.column_names.index("card_count_30d"), "card_count_30d",
                               pc.add(scaled.column("card_count_30d"), 40))
    write_deltalake(good_path, scaled.cast(good.schema), partition_by=["event_date"], mode="overwrite")
    return {"good": 0, "corrupted": 1, "shifted": 2}


def test_cli_exit_codes_and_data_docs(good_path: str, versions: dict[str, int], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "dq"
    assert _cli("--table", good_path, "--version", "0", "--docs", str(docs)) == 0
    assert (docs / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").is_file()
    assert list((docs / "gx" / "uncommitted" / "data_docs" / "local_site" / "validations").rglob("*.html"))
    assert "finfeat validate: PASSED" in (docs / "index.html").read_text()
    assert "PASSED" in capsys.readouterr().out

    # the latest version (shifted, but valid row by row) passes the suite when no reference is given
    assert _cli("--table", good_path, "--start", "2020-06-21", "--end", "2020-06-22") == 0


def test_cli_on_a_corrupted_version(good_path: str, versions: dict[str, int], capsys: pytest.CaptureFixture[str]
                                    ) -> None:
    assert _cli("--table", good_path, "--version", str(versions["corrupted"]), "--start", "2020-06-21",
                "--end", "2020-06-22") == 1
    out = capsys.readouterr().out
    assert "currency_iso_4217" in out and "count_non_negative[card_count_1h]" in out and "FAILED" in out


def test_cli_usage_errors_exit_2(good_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--table", str(tmp_path / "nothing")) == 2
    assert _cli("--table", good_path, "--version", "99") == 2
    assert _cli("--table", good_path, "--start", "2020-06-21") == 2
    assert _cli("--table", good_path, "--start", "2031-01-01", "--end", "2031-01-02") == 2   # no rows
    assert _cli("--table", good_path, "--suite", str(tmp_path / "missing.yaml")) == 2
    assert _cli("--table", good_path, "--psi-warn", "0.5", "--psi-fail", "0.2") == 2
    assert "finfeat validate: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        _cli("--table", good_path, "--start", "June")
    assert info.value.code == 2


# -- drift -----------------------------------------------------------------------------------------

def test_psi_same_data_is_zero_shifted_is_large(good: pa.Table) -> None:
    report = drift_report(good, good, SPEC.names)
    assert [d.column for d in report] == SPEC.names
    assert max(d.psi for d in report) < 1e-9 and {d.status for d in report} == {"ok"}
    amounts = good.column("card_sum_amount_24h")
    assert psi(amounts, pc.multiply(amounts, 3)) > 0.25
    flags = pa.array([True] * 50 + [False] * 50)
    assert psi(flags, flags) == pytest.approx(0.0, abs=1e-12)
    assert psi(flags, pa.array([True] * 100)) > 0.25                          # booleans: two bins
    with_nulls = pa.array([1.0, 2.0, None, None] * 25)
    assert psi(with_nulls, pa.array([1.0, 2.0, 1.0, 2.0] * 25)) > 0.25          # nulls are a bin of their own
    rng = np.random.default_rng(7)
    a, b = rng.normal(0, 1, 20_000), rng.normal(0, 1, 20_000)
    assert psi(pa.array(a), pa.array(b)) < 0.01                                 # same distribution, other draw


def test_cli_psi_same_data_passes_shifted_fails(good_path: str, versions: dict[str, int],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("--table", good_path, "--version", "0", "--reference-version", "0") == 0
    compared = len([f for f in SPEC.features if f.entity != "event"])   # calendar features are left out
    assert f"{compared} of {compared} features stable (max PSI 0.0000" in capsys.readouterr().out
    assert _cli("--table", good_path, "--version", str(versions["shifted"]), "--reference-version", "0") == 1
    out = capsys.readouterr().out
    assert "drift[card_sum_amount_24h]: PSI" in out and "drift[card_count_30d]" in out
    assert "drift[hour_of_day]" not in out
    # the same shift only warns when the fail threshold is above it
    assert _cli("--table", good_path, "--version", str(versions["shifted"]), "--reference-version", "0",
                "--psi-fail", "1000") == 0
    assert "WARN" in capsys.readouterr().out


# -- Data Docs: self-contained pages, finfeat's verdict ----------------------------------------------

class _Refs(HTMLParser):
    """Resources a page loads (scripts, stylesheets, images, frames, CSS url()s) and its links."""

    LOADED = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"), ("source", "src"),
              ("embed", "src"), ("object", "data"), ("video", "src"), ("audio", "src")}

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []
        self.links: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if (tag, name) in self.LOADED:
                self.loaded.append(value)
            elif tag == "a" and name == "href":
                self.links.append(value)
            elif name == "style":
                self.loaded += re.findall(r"url\(\s*['\"]?([^'\")]+)", value)
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.loaded += re.findall(r"url\(\s*['\"]?([^'\")]+)", data)
            self.loaded += re.findall(r"@import\s+['\"]([^'\"]+)", data)


def _site_problems(site: Path) -> list[str]:
    """Every resource a page of ``site`` would fetch from another host, or a local file it names that
    is missing (resources and links alike)."""
    problems = []
    for page in sorted(site.rglob("*.html")):
        refs = _Refs()
        refs.feed(page.read_text())
        for ref in refs.loaded:
            if re.match(r"^(https?:)?//", ref, re.IGNORECASE):
                problems.append(f"{page.relative_to(site)} loads {ref}")
        for ref in refs.loaded + refs.links:
            parts = urlsplit(ref)
            if parts.scheme or parts.netloc or not parts.path:   # another host, mailto:, or '#anchor'
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.exists():
                problems.append(f"{page.relative_to(site)} names {ref}, which does not exist")
    return problems


def _text(page: Path) -> str:
    """The words of a page, without its scripts and styles."""
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", page.read_text(), flags=re.DOTALL)
    return " ".join(re.sub(r"<[^>]+>", " ", body).split())


def test_the_checker_sees_what_gx_pages_load(tmp_path: Path, good: pa.Table) -> None:
    """GX's own pages (its default site) load Bootstrap & co. from CDNs: the check below catches that."""
    from finfeat.validation import _gx

    gx = _gx.gx()
    context = _gx.quiet_context(gx.get_context(mode="file", project_root_dir=str(tmp_path)))
    batch = context.data_sources.add_pandas("p").add_dataframe_asset("a").add_batch_definition_whole_dataframe("w")
    suite = context.suites.add(gx.ExpectationSuite(name="s", expectations=[
        gx.expectations.ExpectColumnValuesToNotBeNull(column="txn_id")]))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="v", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name="c", validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")]))
    checkpoint.run(batch_parameters={"dataframe": good.select(["txn_id"]).to_pandas()})
    problems = _site_problems(tmp_path / "gx" / "uncommitted" / "data_docs" / "local_site")
    assert any("loads https://" in p and "bootstrap" in p for p in problems)


def test_data_docs_are_self_contained_and_show_finfeats_verdict(good_path: str, versions: dict[str, int],
                                                                good: pa.Table, tmp_path: Path) -> None:
    # a table written by a finfeat run, whose only broken expectation is a warn one
    warned = str(tmp_path / "warned")
    rows = _set(good, "amount_minor", {3: 10 ** 12})
    write_deltalake(warned, rows, partition_by=["event_date"],
                    commit_properties=CommitProperties(custom_metadata={"finfeat.run_id": "20261130T101500Z-0a1b2c3d"}))
    docs = tmp_path / "dq"
    assert _cli("--table", warned, "--docs", str(docs)) == 0
    report = json.loads((docs / "report.json").read_text())
    assert report["verdict"] == "passed with warnings" and "amount_sanity_cap" in report["validation"]["warnings"]
    assert _cli("--table", good_path, "--version", str(versions["corrupted"]), "--docs", str(docs)) == 1
    assert json.loads((docs / "report.json").read_text())["verdict"] == "failed"

    site = docs / "gx" / "uncommitted" / "data_docs" / "local_site"
    assert len(list(site.rglob("*.html"))) == 4          # index, the suite, two validations
    assert _site_problems(site) == []
    for page in site.rglob("*.html"):
        text = _text(page)
        assert "__none__" not in text and "Data asset: None" not in text, page

    # the index: one row per run, with finfeat's verdict, the finfeat run and the data validated
    index = _text(site / "index.html")
    warned_row = re.search(r"passed with warnings \S+ \S+ UTC 20261130T101500Z-0a1b2c3d features: (\S+) @ version 0",
                           index)
    assert warned_row and warned_row.group(1) == warned
    assert re.search(rf"failed \S+ \S+ UTC features@v{versions['corrupted']} features: {re.escape(good_path)} "
                     rf"@ version {versions['corrupted']}", index)
    assert "Failed" not in index and "Success" not in index

    # each validation page: finfeat's verdict, the data asset and the run name
    pages = {p.parent.parent.name: _text(p) for p in (site / "validations" / "features").rglob("*.html")}
    ok = pages["20261130T101500Z-0a1b2c3d"]
    assert f"Data asset: features: {warned} @ version 0, all partitions" in ok
    assert "finfeat verdict: passed with warnings" in ok and not re.search(r"Failed(?! only)", ok)
    assert "Run Name 20261130T101500Z-0a1b2c3d" in ok
    assert "Not met, by finfeat policy: warn amount_sanity_cap, " in ok     # by the names of the suite
    bad = pages[f"features@v{versions['corrupted']}"]
    assert "finfeat verdict: failed" in bad and f"Run Name features@v{versions['corrupted']}" in bad
    assert re.search(r"Not met, by finfeat policy: drop count_non_negative\[card_count_1h\]; fail currency_iso_4217;"
                     r" warn ", bad)


def test_a_site_built_by_gx_defaults_is_rebuilt_self_contained(good_path: str, versions: dict[str, int],
                                                              tmp_path: Path) -> None:
    test_the_checker_sees_what_gx_pages_load(tmp_path, _read(good_path))   # GX's CDN pages in tmp_path
    assert _cli("--table", good_path, "--version", "0", "--docs", str(tmp_path)) == 0
    site = tmp_path / "gx" / "uncommitted" / "data_docs" / "local_site"
    assert len(list((site / "validations").rglob("*.html"))) == 2     # the old run's page and this run's
    assert _site_problems(site) == []


def test_summary_page_names_the_drift_reference_or_says_there_is_none(good_path: str, versions: dict[str, int],
                                                                      tmp_path: Path) -> None:
    assert _cli("--table", good_path, "--version", "0", "--docs", str(tmp_path / "a")) == 0
    page = _text(tmp_path / "a" / "index.html")
    assert "Drift: no reference" in page and "--reference-version" in page and "None" not in page
    assert _cli("--table", good_path, "--version", "0", "--reference-version", "0", "--docs", str(tmp_path / "b")) == 0
    page = _text(tmp_path / "b" / "index.html")
    assert f"Drift: PSI against {good_path} @ version 0, all partitions" in page and "None" not in page
