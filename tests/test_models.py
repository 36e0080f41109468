"""Reason codes (tree SHAP) with every score, the waterfall of one decision, model selection over time."""
from __future__ import annotations

import argparse
import json
import math
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from finfeat.jobs import explain as explain_cli
from finfeat.jobs import score as score_cli
from finfeat.jobs.score import Scorer, feature_matrix, score_batch, score_request
from finfeat.jobs.train import TrainConfig, train
from tests.training_fixtures import sparkov_warehouse  # noqa: F401  (fixture)

TRAIN = dict(train_start=date(2019, 1, 1), train_end=date(2019, 1, 15), test_start=date(2020, 6, 21),
             test_end=date(2020, 6, 22))
DAY = (date(2020, 6, 22), date(2020, 6, 22))


def _cli(module, argv: list[str]) -> int:  # noqa: ANN001
    parser = argparse.ArgumentParser(prog="finfeat")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return module.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def model_dir(sparkov_warehouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("model") / "m"
    train(TrainConfig(warehouse=str(sparkov_warehouse), n_estimators=40, threads=1, **TRAIN), out)
    return out


def _feature_rows(warehouse: Path, txn_ids: list[str], columns: list[str]) -> list[dict]:
    features = DeltaTable(str(warehouse / "features")).to_pyarrow_table()
    rows = {r["txn_id"]: r for r in features.filter(pc.is_in(features.column("txn_id"), pa.array(txn_ids))).to_pylist()}
    return [{c: rows[t][c] for c in columns} for t in txn_ids]


# ----------------------------------------------------------------------------------- reasons


def test_contributions_plus_bias_are_the_margin_of_every_batch_row(model_dir: Path, sparkov_warehouse: Path  # noqa: F811
                                                                    ) -> None:
    scorer = Scorer.load(model_dir)
    n = len(scorer.features)
    batch, _ = score_batch(scorer, str(sparkov_warehouse / "features"), start=DAY[0], end=DAY[1], reasons=n)
    assert batch.num_rows > 1000 and {"margin", "bias", "reasons"} <= set(batch.column_names)
    margins = batch.column("margin").to_numpy()
    scores = batch.column("score").to_numpy()
    # the margin is the score's log-odds ...
    assert np.allclose(1 / (1 + np.exp(-margins)), scores, atol=1e-6)
    reasons = batch.column("reasons").to_pylist()
    bias = batch.column("bias").to_pylist()
    for m, b, rs in zip(margins, bias, reasons):
        # ... and the bias plus every input's contribution add up to it
        assert len(rs) == n and sorted(r["feature"] for r in rs) == sorted(scorer.features)
        assert b + sum(r["contribution"] for r in rs) == pytest.approx(m, abs=1e-4)
        mags = [abs(r["contribution"]) for r in rs]
        assert mags == sorted(mags, reverse=True)
    assert len(set(bias)) == 1  # one bias per model
    assert any(abs(r["contribution"]) > 0.1 for rs in reasons for r in rs)
    # the reason values are the feature values of the row (null when missing)
    picks = [0, batch.num_rows // 2, batch.num_rows - 1]
    txns = [batch.column("txn_id")[i].as_py() for i in picks]
    for i, row in zip(picks, _feature_rows(sparkov_warehouse, txns, scorer.features)):
        for r in reasons[i]:
            v = row[r["feature"]]
            assert r["value"] == (None if v is None else float(v))


def test_top_reasons_in_json_jsonl_batch_and_none_on_request(model_dir: Path, sparkov_warehouse: Path,  # noqa: F811
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scorer = Scorer.load(model_dir)
    batch, _ = score_batch(scorer, str(sparkov_warehouse / "features"), start=DAY[0], end=DAY[1],
                           reasons=len(scorer.features))
    high = int(np.argmax(batch.column("score").to_numpy()))
    txn = batch.column("txn_id")[high].as_py()
    full = batch.column("reasons")[high].as_py()
    row = _feature_rows(sparkov_warehouse, [txn], scorer.features)[0]

    one = score_request(scorer, row)
    assert one["score"] == batch.column("score")[high].as_py()
    assert one["reasons"] == full[:5] and one["margin"] == pytest.approx(batch.column("margin")[high].as_py())
    assert "reasons" not in score_request(scorer, row, reasons=0)

    assert _cli(score_cli, ["score", "--model", str(model_dir), "--json", json.dumps(row), "--reasons", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["reasons"] == full[:3]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"features": row}) + "\n")
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--jsonl", str(path)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["reasons"] for x in lines] == [full[:5], full[:5]]

    out = tmp_path / "p.parquet"
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--batch", "--warehouse", str(sparkov_warehouse),
                            "--start", DAY[0].isoformat(), "--end", DAY[1].isoformat(), "--out", str(out)]) == 0
    written = pq.read_table(out)
    at = written.column("txn_id").to_pylist().index(txn)
    assert written.column("reasons")[at].as_py() == full[:5]
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--batch", "--warehouse", str(sparkov_warehouse),
                            "--start", DAY[0].isoformat(), "--end", DAY[1].isoformat(), "--reasons", "0",
                            "--out", str(tmp_path / "q.parquet")]) == 0
    assert "reasons" not in pq.read_table(tmp_path / "q.parquet").column_names
    with pytest.raises(SystemExit):
        _cli(score_cli, ["score", "--model", str(model_dir), "--json", "{}", "--reasons", "-1"])


def test_one_booster_call_gives_the_score_and_margin_bit_for_bit(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """A decision's score comes from its margin through xgboost's own sigmoid (one booster call):
    the same bits as the booster's probability, on each of 4,000 rows; a model of another
    objective keeps two calls and gives the same answer. The rows are random inputs of every scale
    (a tenth missing), so the margins spread far wider than a test day's."""
    scorer = Scorer.load(model_dir)
    assert scorer._sigmoid is not None
    import xgboost as xgb

    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 1.0, (4_000, len(scorer.features))) * rng.choice([1, 10, 1_000, 100_000], len(scorer.features))
    x[rng.random(x.shape) < 0.1] = np.nan
    scores, margins = scorer.score_matrix(x), scorer.score_matrix(x, margin=True)
    assert len(set(scores.tolist())) > 100
    for i in range(len(x)):
        score, margin = scorer.score_one(x[i:i + 1])
        assert score == scores[i] and margin == margins[i], i
    other = xgb.train({"objective": "reg:logistic", "max_depth": 2, "nthread": 1},
                      xgb.DMatrix(x[:500], label=rng.random(500)), num_boost_round=5)
    plain = Scorer(booster=other, features=scorer.features, spec_hash=None, model_id="x", model_dir=tmp_path)
    assert score_cli._logistic_sigmoid(other, len(scorer.features)) is None and plain._sigmoid is None
    assert plain.score_one(x[:1]) == (plain.score_matrix(x[:1])[0], plain.score_matrix(x[:1], margin=True)[0])


def _pred_contribs(booster, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    import xgboost as xgb

    return np.asarray(booster.predict(xgb.DMatrix(x, missing=np.nan, nthread=1), pred_contribs=True,
                                      validate_features=False), dtype=np.float64)


def _assert_same_shap(got: np.ndarray, want: np.ndarray) -> None:
    """Equal to xgboost's float32 tree SHAP within 1e-6 of the larger of 1 and the value."""
    assert got.shape == want.shape
    bad = np.abs(got - want) > 1e-6 * np.maximum(1.0, np.abs(want))
    assert not bad.any(), (np.argwhere(bad)[:5], got[bad][:5], want[bad][:5])


def test_tree_shap_from_tabulated_trees_is_xgboosts_pred_contribs_on_every_row(model_dir: Path,  # noqa: F811
                                                                                 sparkov_warehouse: Path) -> None:
    """The reasons come from the model's trees tabulated in numpy, not from a DMatrix per call:
    every row of the features table, and random rows with missing values, against xgboost's own
    ``pred_contribs``; one row at a time gives the very numbers of the whole matrix."""
    scorer = Scorer.load(model_dir)
    x = feature_matrix(DeltaTable(str(sparkov_warehouse / "features")).to_pyarrow_table(), scorer.features)
    rng = np.random.default_rng(3)
    noise = x[rng.integers(0, len(x), 2_000)] * rng.uniform(0.5, 2.0, (2_000, x.shape[1]))
    noise[rng.random(noise.shape) < 0.2] = np.nan
    x = np.concatenate([x, noise])
    got = scorer.contributions(x)
    assert scorer._tree_shap  # the tables were built: this model is one they cover
    _assert_same_shap(got, _pred_contribs(scorer.booster, x))
    assert (got[:, -1] == _pred_contribs(scorer.booster, x[:1])[0, -1]).all()  # the bias is xgboost's
    for i in rng.integers(0, len(x), 50):
        assert (scorer.contributions(x[i:i + 1])[0] == got[i]).all()


@pytest.mark.parametrize("depth", [8, 9])
def test_tree_shap_on_deep_trees_with_repeated_features_and_missing_values(depth: int, tmp_path: Path) -> None:
    """Few inputs and deep trees (features split on again and again along a path, missing values
    going either way): equal to ``pred_contribs``; deeper than the tables cover (9): xgboost's own."""
    import xgboost as xgb

    rng = np.random.default_rng(depth)
    x = rng.normal(0.0, 1.0, (3_000, 4))
    y = (np.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] > 0.3).astype(float)
    x[rng.random(x.shape) < 0.15] = np.nan
    booster = xgb.train({"objective": "binary:logistic", "max_depth": depth, "eta": 0.3, "nthread": 1,
                         "min_child_weight": 0.1}, xgb.DMatrix(x, label=y, missing=np.nan), num_boost_round=30)
    scorer = Scorer(booster=booster, features=["a", "b", "c", "d"], spec_hash=None, model_id="x", model_dir=tmp_path)
    got = scorer.contributions(x)
    want = _pred_contribs(booster, x)
    if depth <= 8:
        assert scorer._tree_shap
        _assert_same_shap(got, want)
    else:
        assert scorer._tree_shap is False and (got == want).all()


def test_saabas_reasons_also_add_up_and_are_cheaper_per_tree(model_dir: Path, sparkov_warehouse: Path,  # noqa: F811
                                                              capsys: pytest.CaptureFixture) -> None:
    exact = Scorer.load(model_dir)
    approx = Scorer.load(model_dir, reason_method="saabas")
    table = DeltaTable(str(sparkov_warehouse / "features")).to_pyarrow_table(filters=[("event_date", "=", DAY[0])])
    x = feature_matrix(table, exact.features)
    n = len(exact.features)
    a, b = exact.explain_rows(x, top=n), approx.explain_rows(x, top=n)
    for ea, eb in zip(a, b):
        assert ea["margin"] == eb["margin"] and ea["bias"] == pytest.approx(eb["bias"])
        assert eb["bias"] + sum(r["contribution"] for r in eb["reasons"]) == pytest.approx(eb["margin"], abs=1e-4)
    assert any(ea["reasons"] != eb["reasons"] for ea, eb in zip(a, b))  # a different attribution
    with pytest.raises(ValueError, match="reason method"):
        Scorer.load(model_dir, reason_method="lime")
    row = {c: table.column(c)[0].as_py() for c in exact.features}
    assert _cli(score_cli, ["score", "--model", str(model_dir), "--json", json.dumps(row), "--reason-method",
                            "saabas"]) == 0
    assert json.loads(capsys.readouterr().out)["reasons"] == b[0]["reasons"][:5]


def test_explain_writes_a_waterfall_png(model_dir: Path, sparkov_warehouse: Path, tmp_path: Path,  # noqa: F811
                                        capsys: pytest.CaptureFixture) -> None:
    scorer = Scorer.load(model_dir)
    table = DeltaTable(str(sparkov_warehouse / "features")).to_pyarrow_table(
        filters=[("event_date", "=", DAY[0])])
    row = {c: table.slice(3, 1).column(c)[0].as_py() for c in scorer.features}
    png = tmp_path / "why" / "decision.png"
    assert _cli(explain_cli, ["explain", "--model", str(model_dir), "--json", json.dumps(row), "--out", str(png),
                              "--top", "4"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert len(got["reasons"]) == len(scorer.features)
    x = feature_matrix(pa.Table.from_pylist([row]), scorer.features)
    assert got["score"] == scorer.score_matrix(x)[0]
    assert got["bias"] + math.fsum(r["contribution"] for r in got["reasons"]) == pytest.approx(got["margin"], abs=1e-4)
    assert _cli(explain_cli, ["explain", "--model", str(model_dir), "--json", "[1]", "--out", str(png)]) == 2
    assert _cli(explain_cli, ["explain", "--model", str(model_dir), "--json", json.dumps({"amount_minor": 1}),
                              "--out", str(png)]) == 2


# ----------------------------------------------------------------------------------- model selection


def test_tune_picks_by_prequential_mean_ap_and_reports_the_search(sparkov_warehouse: Path,  # noqa: F811
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "tuned"
    # labels arrive 7 days after the transaction: the default gap (the label delay) is 7 days
    info = train(TrainConfig(warehouse=str(sparkov_warehouse), threads=1, tune=True, tune_folds=2, tune_val_days=2,
                             tune_candidates=2, **TRAIN), out)
    search = json.loads((out / "search.json").read_text())
    assert search == json.loads(json.dumps(info["search"]))
    folds = search["folds"]
    # consecutive validation windows ending on the last training day, each after the gap, never overlapping
    assert [f["validate"] for f in folds] == [["2019-01-12", "2019-01-13"], ["2019-01-14", "2019-01-15"]]
    assert [f["fit"] for f in folds] == [["2019-01-01", "2019-01-04"], ["2019-01-01", "2019-01-06"]]
    for f in folds:
        assert f["fit_fraud"] > 0 and 0 < f["validate_fraud"] < f["validate_rows"]
    assert folds[0]["fit_rows"] <= folds[1]["fit_rows"]  # expanding (the data has no 5th and 6th of January)
    cands = search["candidates"]
    from finfeat.jobs.train import TREE_COUNTS

    assert len(cands) == 2 * len({*TREE_COUNTS, TrainConfig.n_estimators})  # structures x tree counts
    for c in cands:
        assert len(c["fold_ap"]) == 2 and all(0 < a <= 1 for a in c["fold_ap"])
        assert c["mean_ap"] == pytest.approx(np.mean(c["fold_ap"])) and c["std_ap"] == pytest.approx(np.std(c["fold_ap"]))
    means = [c["mean_ap"] for c in cands]
    assert means == sorted(means, reverse=True)
    assert len({tuple(c["fold_ap"]) for c in cands}) > 1  # the candidates really differ
    best = cands[0]
    assert search["chosen"] == {k: best[k] for k in ("max_depth", "learning_rate", "min_child_weight", "subsample",
                                                      "class_weight", "n_estimators")}
    params = info["xgboost_params"]
    assert (params["max_depth"], params["learning_rate"], params["num_boost_round"]) == \
           (best["max_depth"], best["learning_rate"], best["n_estimators"])
    # the saved model has the chosen number of trees
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(str(out / "model.json"))
    assert booster.num_boosted_rounds() == best["n_estimators"]
    report = (out / "report.md").read_text()
    assert "## Model selection (prequential)" in report and f"{best['mean_ap']:.4f}" in report
    assert report.count("| balanced |") + report.count("| sqrt |") + report.count("| none |") == len(cands)


def test_tune_fails_fast_when_the_folds_do_not_fit(sparkov_warehouse: Path, tmp_path: Path) -> None:  # noqa: F811
    from finfeat.jobs.train import TrainError

    with pytest.raises(TrainError, match="lower --tune-folds"):
        train(TrainConfig(warehouse=str(sparkov_warehouse), threads=1, tune=True, tune_folds=3, tune_val_days=7,
                          **TRAIN), tmp_path / "x")
