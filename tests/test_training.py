"""Training sets (local engine), label maturity, training, scoring, maintenance (delta-rs)."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from finfeat.jobs import maintain as maintain_cli
from finfeat.jobs import score as score_cli
from finfeat.jobs import train as train_cli
from finfeat.jobs import training as training_cli
from finfeat.jobs.score import Scorer, score_batch, score_request
from finfeat.jobs.train import TrainConfig, TrainError, card_precision_at_k, train
from finfeat.jobs.training import (
    MANIFEST_NAME,
    TrainingSetError,
    TrainingSetRequest,
    build_training_set,
    labels_from_features,
    read_training_set,
    write_training_set,
)
from tests.training_fixtures import (  # noqa: F401  (fixtures)
    EDGE_CUTOFF,
    EDGE_DELAY_DAYS,
    EDGE_EXPECTED,
    EDGE_RANGE,
    add_late_label,
    edge_warehouse,
    small_files_copy,
    sparkov_warehouse,
)

UTC = timezone.utc
TRAIN = dict(train_start=date(2019, 1, 1), train_end=date(2019, 1, 15), test_start=date(2020, 6, 21),
             test_end=date(2020, 6, 22))


def _cli(module, argv: list[str]) -> int:  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="finfeat")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return module.run(parser.parse_args(argv))


def _edge_request(wh: Path, **kw) -> TrainingSetRequest:  # noqa: ANN003
    return TrainingSetRequest.from_warehouse(wh, start=EDGE_RANGE[0], end=EDGE_RANGE[1], cutoff=EDGE_CUTOFF,
                                             label_delay_days=EDGE_DELAY_DAYS, **kw)


# ----------------------------------------------------------------------------------- labels


def test_labels_from_features_equals_the_backfill_labels_table(sparkov_warehouse: Path) -> None:
    features = DeltaTable(str(sparkov_warehouse / "features")).to_pyarrow_table()
    backfill = DeltaTable(str(sparkov_warehouse / "labels")).to_pyarrow_table()
    mine = labels_from_features(features, delay_days=7)
    key = [("txn_id", "ascending")]
    assert mine.num_rows == backfill.num_rows == features.num_rows > 0
    assert mine.sort_by(key).equals(backfill.select(mine.schema.names).sort_by(key).cast(mine.schema))
    first = mine.sort_by(key).slice(0, 1).to_pylist()[0]
    event = features.filter(pc.equal(features.column("txn_id"), first["txn_id"])).to_pylist()[0]
    assert first["label_time"] - event["event_time"] == timedelta(days=7)


# ----------------------------------------------------------------------------------- the rule


def test_maturity_rule_on_every_branch_and_boundary(edge_warehouse: Path) -> None:
    ts = build_training_set(_edge_request(edge_warehouse))
    got = {r["txn_id"]: (r["label_status"], r["label"]) for r in ts.table.to_pylist()}
    expected = {k: v for k, v in EDGE_EXPECTED.items() if v[0] in ("matured", "assumed_negative")}
    assert got == expected
    c = ts.manifest["counts"]
    assert (c["rows_in_range"], c["matured"], c["assumed_negative"], c["immature"], c["after_cutoff"]) == \
           (14, 7, 4, 2, 1)
    assert c["rows"] == ts.table.num_rows == 11
    # no label known only after the cut-off, and the ingest-time label column is gone
    times = [t for t in ts.table.column("label_time").to_pylist() if t is not None]
    assert max(times) <= EDGE_CUTOFF
    assert "is_fraud" not in ts.table.column_names
    assert ts.table.column_names[-4:] == ["label", "label_status", "label_time", "label_source"]
    assert ts.manifest["mature_before"] == "2024-01-13T00:00:00Z"


def test_training_set_is_pinned_to_versions_and_reproducible(edge_warehouse: Path, tmp_path: Path) -> None:
    first = build_training_set(_edge_request(edge_warehouse))
    assert first.manifest["features"]["version"] == 0 and first.manifest["labels"]["version"] == 0
    assert first.manifest["features"]["spec_hash"]
    folder = write_training_set(first, tmp_path / "ts")
    assert (folder / MANIFEST_NAME).is_file()
    again = read_training_set(folder)
    assert again.table.equals(first.table) and again.manifest == first.manifest

    # a chargeback for an old "genuine" transaction arrives (labels v1) before the cut-off
    v1 = add_late_label(edge_warehouse, "c_old_unlabelled", True, datetime(2024, 1, 19, tzinfo=UTC))
    assert v1 == 1
    pinned = build_training_set(_edge_request(edge_warehouse, labels_version=0))
    assert pinned.table.equals(first.table)
    latest = build_training_set(_edge_request(edge_warehouse))
    assert latest.manifest["labels"]["version"] == 1
    row = latest.table.filter(pc.equal(latest.table.column("txn_id"), "c_old_unlabelled")).to_pylist()[0]
    assert (row["label_status"], row["label"], row["label_source"]) == ("matured", True, "late.csv")
    # the same request at an earlier cut-off does not see it
    early = build_training_set(replace(_edge_request(edge_warehouse), cutoff=datetime(2024, 1, 18, tzinfo=UTC)))
    assert "c_old_unlabelled" not in pc.filter(early.table.column("txn_id"), early.table.column("label")).to_pylist()


def test_training_set_cli_and_errors(edge_warehouse: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ts_cli"
    rc = _cli(training_cli, ["training-set", "--warehouse", str(edge_warehouse), "--start", "2024-01-01",
                             "--end", "2024-01-20", "--cutoff", "2024-01-20T00:00:00Z", "--out", str(out)])
    assert rc == 0
    assert "rows 11" in capsys.readouterr().out
    assert read_training_set(out).table.num_rows == 11
    # version that does not exist, missing table, a folder that is not a training set
    assert _cli(training_cli, ["training-set", "--warehouse", str(edge_warehouse), "--start", "2024-01-01",
                               "--end", "2024-01-20", "--cutoff", "2024-01-20", "--out", str(out),
                               "--labels-version", "9"]) == 2
    assert _cli(training_cli, ["training-set", "--warehouse", str(tmp_path / "nowhere"), "--start", "2024-01-01",
                               "--end", "2024-01-20", "--cutoff", "2024-01-20", "--out", str(out)]) == 2
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "data.txt").write_text("keep me")
    assert _cli(training_cli, ["training-set", "--warehouse", str(edge_warehouse), "--start", "2024-01-01",
                               "--end", "2024-01-20", "--cutoff", "2024-01-20", "--out",
                               str(tmp_path / "precious")]) == 2
    assert (tmp_path / "precious" / "data.txt").read_text() == "keep me"
    assert "not a finfeat training set" in capsys.readouterr().err
    with pytest.raises(TrainingSetError):
        TrainingSetRequest.from_warehouse(edge_warehouse, start=date(2024, 1, 2), end=date(2024, 1, 1),
                                          cutoff=EDGE_CUTOFF)


def test_sparkov_training_set_uses_only_matured_labels(sparkov_warehouse: Path) -> None:
    cutoff = datetime(2019, 1, 16, tzinfo=UTC)
    ts = build_training_set(TrainingSetRequest.from_warehouse(sparkov_warehouse, start=date(2019, 1, 1),
                                                              end=date(2019, 1, 15), cutoff=cutoff))
    features = DeltaTable(str(sparkov_warehouse / "features")).to_pyarrow_table()
    jan = features.filter(pc.less_equal(features.column("event_date"), pa.scalar(date(2019, 1, 15), pa.date32())))
    mature = jan.filter(pc.less_equal(jan.column("event_time"),
                                      pa.scalar(cutoff - timedelta(days=7), pa.timestamp("us", tz="UTC"))))
    # the backfill's labels come from the events (label_time = event_time + 7 d): exactly the
    # transactions older than the maturity window are in, with their own label
    assert ts.table.num_rows == mature.num_rows > 0
    assert sorted(ts.table.column("txn_id").to_pylist()) == sorted(mature.column("txn_id").to_pylist())
    assert ts.manifest["counts"]["immature"] == jan.num_rows - mature.num_rows
    assert pc.sum(ts.table.column("label")).as_py() == pc.sum(mature.column("is_fraud")).as_py()
    assert set(ts.table.column("label_status").to_pylist()) == {"matured"}


# ----------------------------------------------------------------------------------- training


def test_card_precision_at_k_by_hand() -> None:
    day = np.array(["d1"] * 5 + ["d2"] * 3)
    card = np.array(["a", "a", "b", "c", "d", "a", "b", "c"])
    score = np.array([0.1, 0.9, 0.8, 0.2, 0.7, 0.3, 0.6, 0.9])
    label = np.array([1, 0, 0, 0, 1, 0, 1, 0])
    # d1: cards a(.9, fraud) b(.8) d(.7, fraud) c(.2): top 2 = a, b -> 1/2; d2: c(.9) b(.6, fraud) -> 1/2
    mean, per_day = card_precision_at_k(day, card, score, label, k=2)
    assert [p["precision"] for p in per_day] == [0.5, 0.5] and mean == 0.5
    # fewer cards than k: the share among all of them
    mean, _ = card_precision_at_k(day, card, score, label, k=10)
    assert mean == pytest.approx((2 / 4 + 1 / 3) / 2)


def test_windows_are_checked() -> None:
    with pytest.raises(TrainError, match="gap"):
        TrainConfig(warehouse="w", train_start=date(2019, 1, 1), train_end=date(2019, 1, 10),
                    test_start=date(2019, 1, 15), test_end=date(2019, 1, 20)).windows()
    w = TrainConfig(warehouse="w", train_start=date(2019, 1, 1), train_end=date(2019, 1, 10),
                    test_end=date(2019, 1, 30)).windows()
    assert w["test"][0] == "2019-01-18" and w["train_cutoff"] == "2019-01-18T00:00:00Z"
    assert w["test_cutoff"] == "2019-02-07T00:00:00Z"


@pytest.fixture(scope="module")
def model_dir(sparkov_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    train(TrainConfig(warehouse=str(sparkov_warehouse), n_estimators=60, threads=1, **TRAIN), out)
    return out


def test_train_writes_the_model_folder(model_dir: Path, sparkov_warehouse: Path) -> None:
    for name in ("model.json", "features.json", "run.json", "metrics.json", "baseline_logreg.json",
                 "test_predictions.parquet", "pr_curve.png", "feature_importance.png", "report.md"):
        assert (model_dir / name).is_file(), name
    run = json.loads((model_dir / "run.json").read_text())
    assert run["delta_versions"] == {"features": 0, "labels": 0}
    assert run["windows"]["train_cutoff"] == "2020-06-21T00:00:00Z"
    assert run["class_imbalance"]["xgboost_scale_pos_weight"] == pytest.approx(run["train_genuine"] / run["train_fraud"])
    assert run["train_fraud"] > 100 and run["training_set"]["counts"]["immature"] == 0
    features = json.loads((model_dir / "features.json").read_text())
    assert features["spec_hash"] == run["spec_hash"] and features["features"][-1] == "amount_minor"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    for model in ("xgboost", "logistic_regression"):
        m = metrics[model]
        assert 0.5 < m["roc_auc"] <= 1 and 0 < m["average_precision"] <= 1
        assert 0 <= m["card_precision_at_100"] <= 1 and len(m["card_precision_per_day"]) == 2
    assert metrics["xgboost"]["roc_auc"] > 0.9
    preds = pq.read_table(model_dir / "test_predictions.parquet")
    assert preds.num_rows == metrics["test_rows"] and {"score_xgboost", "score_logreg", "label"} <= set(preds.column_names)
    report = (model_dir / "report.md").read_text()
    assert "scale_pos_weight" in report and "logistic regression" in report and "pr_curve.png" in report
    assert (model_dir / "pr_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_model(model_dir: Path, sparkov_warehouse: Path, tmp_path: Path) -> None:
    rc = _cli(train_cli, ["train", "--warehouse", str(sparkov_warehouse), "--train-start", "2019-01-01",
                          "--train-end", "2019-01-15", "--test-start", "2020-06-21", "--test-end", "2020-06-22",
                          "--n-estimators", "60", "--threads", "1", "--out", str(tmp_path / "again")])
    assert rc == 0
    assert (tmp_path / "again" / "model.json").read_bytes() == (model_dir / "model.json").read_bytes()
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == \
           json.loads((model_dir / "metrics.json").read_text())
    assert _cli(train_cli, ["train", "--warehouse", str(sparkov_warehouse), "--train-start", "2019-01-01",
                            "--train-end", "2019-01-15", "--test-start", "2019-01-16", "--test-end", "2019-01-17",
                            "--out", str(tmp_path / "bad")]) == 2


# ----------------------------------------------------------------------------------- scoring


def test_batch_scores_equal_row_dict_scores(model_dir: Path, sparkov_warehouse: Path) -> None:
    scorer = Scorer.load(model_dir)
    batch, version = score_batch(scorer, str(sparkov_warehouse / "features"), start=date(2020, 6, 21),
                                 end=date(2020, 6, 22))
    assert version == 0 and batch.num_rows == 5116
    features = DeltaTable(str(sparkov_warehouse / "features")).to_pyarrow_table()
    rows = {r["txn_id"]: r for r in features.to_pylist()}
    dicts = [{c: rows[t][c] for c in scorer.features} for t in batch.column("txn_id").to_pylist()]
    one_by_one = scorer.score_rows(dicts)
    assert np.array_equal(np.array(one_by_one), batch.column("score").to_numpy())
    # and the same as the test predictions written at training time
    preds = pq.read_table(model_dir / "test_predictions.parquet")
    by_txn = dict(zip(preds.column("txn_id").to_pylist(), preds.column("score_xgboost").to_pylist()))
    assert [by_txn[t] for t in batch.column("txn_id").to_pylist()] == batch.column("score").to_pylist()
    with pytest.raises(ValueError, match="lacks model feature"):
        scorer.score_rows([{"amount_minor": 5}])


def test_score_cli_batch_parquet_and_delta(model_dir: Path, sparkov_warehouse: Path, tmp_path: Path) -> None:
    base = ["score", "--model", str(model_dir), "--batch", "--warehouse", str(sparkov_warehouse),
            "--start", "2020-06-21", "--end", "2020-06-22"]
    assert _cli(score_cli, [*base, "--out", str(tmp_path / "p.parquet")]) == 0
    parquet = pq.read_table(tmp_path / "p.parquet")
    assert parquet.num_rows == 5116 and parquet.schema.names[:5] == ["txn_id", "card_token", "event_time",
                                                                      "event_date", "score"]
    for _ in range(2):  # re-scoring the range replaces it
        assert _cli(score_cli, [*base, "--out", str(tmp_path / "preds"), "--format", "delta"]) == 0
    delta = DeltaTable(str(tmp_path / "preds")).to_pyarrow_table()
    assert delta.num_rows == 5116
    assert delta.sort_by("txn_id").column("score").equals(parquet.sort_by("txn_id").column("score"))
    assert _cli(score_cli, ["score", "--model", str(tmp_path / "nope"), "--batch"]) == 2


def test_score_json_feature_dict_and_online_store(model_dir: Path, sparkov_warehouse: Path, sparkov_events: pa.Table,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scorer = Scorer.load(model_dir)
    batch, _ = score_batch(scorer, str(sparkov_warehouse / "features"), start=date(2020, 6, 22),
                           end=date(2020, 6, 22))
    target = batch.slice(1500, 1).to_pylist()[0]
    features = DeltaTable(str(sparkov_warehouse / "features")).to_pyarrow_table()
    row = features.filter(pc.equal(features.column("txn_id"), target["txn_id"])).to_pylist()[0]
    feature_dict = {c: row[c] for c in scorer.features}
    assert score_request(scorer, feature_dict)["score"] == target["score"]
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--json", json.dumps(feature_dict)]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == target["score"]

    from finfeat.jobs.online import materialize, open_store
    from finfeat.transforms.spec import FeatureSpec

    spec = FeatureSpec.default()
    ev = sparkov_events
    t = pa.scalar(row["event_time"], pa.timestamp("us", tz="UTC"))
    before = ev.filter(pc.or_(pc.less(ev.column("event_time"), t),
                              pc.and_(pc.equal(ev.column("event_time"), t),
                                      pc.less(ev.column("txn_id"), target["txn_id"]))))
    url = f"sqlite:{tmp_path / 'online.db'}"
    with open_store(url, spec) as store:
        materialize(store, before, spec)
    me = ev.filter(pc.equal(ev.column("txn_id"), target["txn_id"])).to_pylist()[0]
    request = {"txn_id": me["txn_id"], "card_token": me["card_token"], "merchant_id": me["merchant_id"],
               "amount_minor": me["amount_minor"], "at": me["event_time"].isoformat(),
               "merchant_lat": me["merchant_lat"], "merchant_lon": me["merchant_lon"]}
    rc = _cli(score_cli, ["score", "--model", str(model_dir), "--json", json.dumps(request), "--store", url])
    assert rc == 0
    online = json.loads(capsys.readouterr().out)
    assert online["features"] == feature_dict
    assert online["score"] == target["score"]
    unknown = {**request, "card_token": "tok_never_seen"}
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--json", json.dumps(unknown), "--store", url]) == 3
    assert json.loads(capsys.readouterr().out)["error"] == "not_found"

    # the scoring loop: one result line per request line, in order; failures stay in their line
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([json.dumps(request), json.dumps(unknown), "{not json", json.dumps(request)]) + "\n")
    rc = _cli(score_cli, ["score", "--model", str(model_dir), "--jsonl", str(requests), "--store", url])
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert rc == 1 and len(results) == 4
    assert [r.get("error") for r in results] == [None, "not_found", "bad_request", None]
    assert results[0]["score"] == results[3]["score"] == target["score"]
    assert results[0]["features"] == feature_dict
    assert results[2]["line"] == 3
    assert "4 requests, 2 scored, 2 failed" in captured.err


def _strict_json(line: str) -> dict:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in JSON output: {line}")

    return json.loads(line, parse_constant=refuse)


def test_score_loop_survives_every_bad_request(model_dir: Path, sparkov_events: pa.Table, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """Each malformed request gets its own error line and the loop goes on; the output is strict
    JSON (no NaN); the same bounds as the batch parser's."""
    from finfeat.jobs.online import materialize, open_store
    from finfeat.transforms.spec import FeatureSpec

    spec = FeatureSpec.default()
    url = f"sqlite:{tmp_path / 'online.db'}"
    with open_store(url, spec) as store:
        materialize(store, sparkov_events, spec)
    me = sparkov_events.to_pylist()[-1]
    good = {"card_token": me["card_token"], "merchant_id": me["merchant_id"], "amount_minor": 1250,
            "at": "2020-12-31T23:00:00Z", "merchant_lat": 40.0, "merchant_lon": -74.0}
    bad_changes = [
        '"amount_minor": 1e30', '"amount_minor": 100000000000000000000000000000', '"at": "not a time"',
        '"amount_minor": -5', '"amount_minor": true', '"amount_minor": 12.5', '"amount_minor": 1000000000001',
        '"merchant_lat": NaN', '"merchant_lon": Infinity', '"merchant_lat": -Infinity', '"merchant_lat": 1000',
        '"merchant_lon": -181', '"merchant_lat": true', '"at": "2021-02-29T10:00:00Z"', '"at": "2300-01-01"',
        '"at_us": -1', '"card_token": "4000 1234 1234 1234"', '"card_token": 12', '"currency": "XYZ"',
    ]
    lines = [json.dumps(good)]
    for change in bad_changes:
        key = change.split(":")[0].strip('"')
        rest = {k: v for k, v in good.items() if k != key and not (key == "at_us" and k == "at")}
        lines.append(json.dumps(rest)[:-1] + ", " + change + "}")
    lines += ["[1, 2]", json.dumps({**good, "merchant_lat": None, "merchant_lon": None})]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    rc = _cli(score_cli, ["score", "--model", str(model_dir), "--jsonl", str(requests), "--store", url])
    captured = capsys.readouterr()
    results = [_strict_json(line) for line in captured.out.splitlines()]
    assert rc == 1 and len(results) == len(lines)
    assert "error" not in results[0] and "error" not in results[-1]
    assert 0.0 <= results[0]["score"] <= 1.0
    for i, (change, result) in enumerate(zip(bad_changes + ["[1, 2]"], results[1:-1]), start=2):
        assert result.get("error") == "bad_request", (change, result)
        assert result["line"] == i and result["message"]
    assert f"{len(lines)} requests, 2 scored, {len(lines) - 2} failed" in captured.err

    # one request on the command line: the same validation, exit 2 and no traceback
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--json",
                            json.dumps({**good, "amount_minor": 10**30}), "--store", url]) == 2
    assert "amount_minor" in capsys.readouterr().err
    # a feature row with a non-finite value is refused, not scored
    row = {c: 0.0 for c in Scorer.load(model_dir).features}
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--json",
                            json.dumps({**row, next(iter(row)): float("nan")})]) == 2
    assert "not finite" in capsys.readouterr().err
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--json", json.dumps({**row, "amount_minor": -3})]) == 2
    assert "amount_minor" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- maintenance


def test_maintain_local_compacts_and_vacuums_safely(sparkov_warehouse: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    wh = tmp_path / "wh"
    content = small_files_copy(sparkov_warehouse / "features", wh / "features", parts=4)
    files = len(DeltaTable(str(wh / "features")).file_uris())
    args = ["maintain", "--warehouse", str(wh), "--table", "features"]
    assert _cli(maintain_cli, [*args, "--retention-hours", "23"]) == 2
    assert "under 24 h" in capsys.readouterr().err
    assert _cli(maintain_cli, args) == 0  # default: 7 days, nothing old enough to delete
    dt = DeltaTable(str(wh / "features"))
    assert len(dt.file_uris()) < files and dt.version() == 4
    assert dt.history(1)[0]["finfeat.operation"] == "maintain"
    assert dt.to_pyarrow_table().sort_by("txn_id").equals(content)
    on_disk = maintain_cli.files_on_disk(wh / "features")
    assert on_disk == files + len(dt.file_uris())
    assert _cli(maintain_cli, [*args, "--retention-hours", "0", "--force", "--dry-run"]) == 0
    assert maintain_cli.files_on_disk(wh / "features") == on_disk
    # a data file no commit references (a backfill killed before its commit) goes too
    day_folder = next(p for p in (wh / "features").iterdir() if p.name.startswith("event_date="))
    pq.write_table(pa.table({"txn_id": ["orphan"]}), day_folder / "part-killed-run.snappy.parquet")
    assert maintain_cli.files_on_disk(wh / "features") == on_disk + 1
    assert _cli(maintain_cli, [*args, "--retention-hours", "0", "--force"]) == 0
    assert maintain_cli.files_on_disk(wh / "features") == len(DeltaTable(str(wh / "features")).file_uris())
    assert DeltaTable(str(wh / "features")).to_pyarrow_table().sort_by("txn_id").equals(content)
    assert _cli(maintain_cli, ["maintain", "--warehouse", str(tmp_path / "empty")]) == 2

