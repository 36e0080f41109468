"""``finfeat score``: fraud scores from a model folder, in batch or for one transaction.

* ``--batch``: every feature row of an ``event_date`` range of the Delta features table (a
  pinned or the latest version) -> predictions as Parquet (one file) or Delta (partitioned by
  ``event_date``; re-scoring a range replaces exactly that range).
* ``--json '{...}'``: one transaction. With ``--store`` the request-time features come from the
  online store (:mod:`finfeat.jobs.online`: the card's and merchant's stored history plus this
  transaction, through the batch engine): the JSON has ``card_token``, ``merchant_id``,
  ``amount_minor``, ``at`` (ISO-8601 or ``at_us``) and optionally ``txn_id``, ``currency``,
  ``merchant_lat``/``merchant_lon``, validated by :mod:`finfeat.schemas.requests` (the parser's
  bounds). Without ``--store`` the JSON is the feature row itself (every model input, flat or
  under ``"features"``; finite numbers, booleans or null). Results are strict JSON (no NaN).

Both paths go through :class:`Scorer`: an Arrow table (:func:`feature_matrix`) or a feature dict
(:func:`feature_vector`) -> the same float64 matrix (booleans 0/1, nulls NaN) -> the same booster
call (``inplace_predict``, no DMatrix per call), so a row scores identically either way. A
serving process keeps one :class:`Scorer` and one open store and passes the store to
:func:`score_request`; the CLI opens the store per call.
Output columns (batch): ``txn_id, card_token, event_time, event_date, score, model_id,
features_version`` and, unless ``--reasons 0``, ``margin, bias, reasons``.

Reason codes: every decision carries its top ``--reasons`` (default 5) contributions to the
log-odds by exact tree SHAP (xgboost's ``pred_contribs`` definition, computed from the model's
tabulated trees: :mod:`finfeat.jobs.tree_shap`) as feature, value and contribution, largest
absolute contribution first; ``bias`` + every input's contribution = ``margin`` (the log-odds).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finfeat.schemas.requests import RequestError, check_amount, parse_request

# See finfeat.jobs.train: OpenMP threads that spin while waiting crawl on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LOG = logging.getLogger(__name__)

MODEL_FILE = "model.json"
#: Reason codes per decision by default: the largest contributions by absolute value.
DEFAULT_REASONS = 5
REASON_METHODS = ("shap", "saabas")
FEATURES_FILE = "features.json"
#: Model inputs beyond the spec's feature columns: known at request time, from the transaction.
EXTRA_INPUTS = ("amount_minor",)

EXIT_OK, EXIT_USAGE, EXIT_MISSING, EXIT_UNAVAILABLE, EXIT_NOT_EXACT = 0, 2, 3, 4, 5

PREDICTION_SCHEMA = pa.schema([
    pa.field("txn_id", pa.string(), nullable=False),
    pa.field("card_token", pa.string(), nullable=False),
    pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("event_date", pa.date32(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("features_version", pa.int64()),
])
#: One reason code: a model input, its value (null when missing) and its contribution to the log-odds.
REASON_TYPE = pa.struct([pa.field("feature", pa.string()), pa.field("value", pa.float64()),
                         pa.field("contribution", pa.float64())])


class ScoringError(ValueError):
    """The model or the input does not fit; the message says what is missing."""


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinity) as None: results are strict JSON."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON (never NaN or Infinity) of a result."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def model_inputs(feature_columns: Sequence[str]) -> list[str]:
    """The model's input columns: the spec's feature columns, then :data:`EXTRA_INPUTS`."""
    return [*feature_columns, *(c for c in EXTRA_INPUTS if c not in feature_columns)]


def feature_matrix(table: pa.Table, columns: Sequence[str]) -> np.ndarray:
    """Columns -> a float64 matrix; booleans are 0/1, nulls NaN (xgboost's missing value)."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ScoringError(f"the input lacks model feature(s) {missing}")
    out = np.empty((table.num_rows, len(columns)), dtype=np.float64)
    for j, name in enumerate(columns):
        col = table.column(name)
        if pa.types.is_null(col.type) or pa.types.is_boolean(col.type) or col.type != pa.float64():
            col = pc.cast(col, pa.float64())
        out[:, j] = col.to_numpy(zero_copy_only=False) if table.num_rows else []
    return out


def feature_vector(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> np.ndarray:
    """Feature dicts -> the float64 matrix :func:`feature_matrix` gives for the same values
    (booleans 0/1, None NaN), without building an Arrow table (the online path scores one row)."""
    out = np.empty((len(rows), len(columns)), dtype=np.float64)
    for i, row in enumerate(rows):
        for j, c in enumerate(columns):
            try:
                v = row[c]
            except KeyError:
                absent = [c for c in columns if c not in row]
                raise ScoringError(f"row {i} lacks model feature(s) {absent} (give null for an unknown value)") from None
            if v is None:
                out[i, j] = np.nan
            elif isinstance(v, (bool, int, float, np.number, np.bool_)):
                try:
                    out[i, j] = float(v)
                except OverflowError:
                    raise ScoringError(f"feature {c!r}: {v!r} is too large for a number") from None
                if not np.isfinite(out[i, j]):
                    raise ScoringError(f"feature {c!r}: {v!r} is not finite (give null for an unknown value)")
            else:
                raise ScoringError(f"feature {c!r}: {v!r} is not a number or a boolean")
    return out


@dataclass
class Scorer:
    """An xgboost model folder (``finfeat train`` output) as a scoring function."""

    booster: Any
    features: list[str]
    spec_hash: str | None
    model_id: str
    model_dir: Path
    #: ``shap``: exact tree SHAP; ``saabas``: xgboost's approximate contributions (``approx_contribs``,
    #: one path per tree, about half the time per decision of a 200-tree depth-6 model; also sums to the margin)
    reason_method: str = "shap"
    #: xgboost's own float32 sigmoid (margin -> score), when the model is binary:logistic and it
    #: reproduces the booster's scores bit for bit (checked at load); else None
    _sigmoid: Any = field(default=None, repr=False, compare=False)
    #: exact tree SHAP from the model's tabulated trees (:mod:`finfeat.jobs.tree_shap`), built at the
    #: first explanation; False when the model is not one it covers (xgboost computes it then)
    _tree_shap: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def load(cls, model_dir: str | Path, *, reason_method: str = "shap") -> Scorer:
        import xgboost as xgb

        folder = Path(model_dir)
        model_path, meta_path = folder / MODEL_FILE, folder / FEATURES_FILE
        if not model_path.is_file() or not meta_path.is_file():
            raise ScoringError(f"{folder} is not a finfeat model folder (needs {MODEL_FILE} and {FEATURES_FILE}; "
                               "`finfeat train` writes them)")
        meta = json.loads(meta_path.read_text())
        booster = xgb.Booster()
        booster.load_model(str(model_path))
        booster.set_param({"nthread": 1})
        model_id = hashlib.sha256(model_path.read_bytes()).hexdigest()[:16]
        if reason_method not in REASON_METHODS:
            raise ScoringError(f"reason method {reason_method!r}: choose one of {', '.join(REASON_METHODS)}")
        features = list(meta["features"])
        return cls(booster=booster, features=features, spec_hash=meta.get("spec_hash"),
                   model_id=model_id, model_dir=folder, reason_method=reason_method,
                   _sigmoid=_logistic_sigmoid(booster, len(features)))

    def score_matrix(self, x: np.ndarray, *, margin: bool = False) -> np.ndarray:
        """Probabilities of fraud (float64), or with ``margin`` the log-odds (which rank the same
        way but do not tie at 1.0 where float32 probabilities saturate)."""
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ScoringError(f"expected {len(self.features)} model inputs per row, got shape {x.shape}")
        got = self.booster.inplace_predict(x, missing=np.nan, predict_type="margin" if margin else "value")
        return np.asarray(got, dtype=np.float64)

    def score_one(self, x: np.ndarray) -> tuple[float, float]:
        """(score, margin) of a one-row matrix. With one booster call where the model allows it
        (the score is then xgboost's float32 sigmoid of the margin: the same bits as
        :meth:`score_matrix`), else two."""
        if x.shape[0] != 1:
            raise ScoringError(f"score_one takes one row, got shape {x.shape}")
        margin = float(self.score_matrix(x, margin=True)[0])
        score = self._sigmoid(margin) if self._sigmoid is not None else float(self.score_matrix(x)[0])
        return score, margin

    def prepare_reasons(self) -> None:
        """Tabulate the trees for exact tree SHAP now (a service does it before its first request;
        otherwise the first explanation does, in a fraction of a second for a 200-tree model)."""
        if self._tree_shap is None and self.reason_method == "shap":
            from finfeat.jobs.tree_shap import TreeShap

            self._tree_shap = TreeShap.from_booster(self.booster, len(self.features)) or False

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """Tree SHAP contributions to the log-odds: one column per model input, then the bias;
        each row sums to the row's margin (up to float32 rounding). Exact tree SHAP, xgboost's
        ``pred_contribs`` definition, computed from the model's tabulated trees (equal to xgboost's
        own float32 values within 1e-6 of the larger of 1 and the value; tested), or by xgboost
        itself for a model the tables do not cover; saabas: xgboost's ``approx_contribs``."""
        import xgboost as xgb

        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ScoringError(f"expected {len(self.features)} model inputs per row, got shape {x.shape}")
        if x.shape[0] == 0:
            return np.empty((0, len(self.features) + 1), dtype=np.float64)
        if self.reason_method == "shap":
            self.prepare_reasons()
            if self._tree_shap:
                return self._tree_shap.contributions(x)
        got = self.booster.predict(xgb.DMatrix(x, missing=np.nan, nthread=1), pred_contribs=True,
                                   approx_contribs=self.reason_method == "saabas", validate_features=False)
        return np.asarray(got, dtype=np.float64)

    def reasons(self, x: np.ndarray, contribs: np.ndarray, *, top: int) -> list[list[dict[str, Any]]]:
        """The ``top`` largest contributions (by absolute value; ties by input order) of each row as
        ``{"feature", "value", "contribution"}`` (value None when missing)."""
        out = []
        k = min(top, len(self.features))
        for row, c in zip(x, contribs):
            order = np.argsort(-np.abs(c[:-1]), kind="stable")[:k]
            out.append([{"feature": self.features[j], "value": None if np.isnan(row[j]) else float(row[j]),
                         "contribution": float(c[j])} for j in order])
        return out

    def explain_rows(self, x: np.ndarray, *, top: int = DEFAULT_REASONS, margins: np.ndarray | None = None
                     ) -> list[dict[str, Any]]:
        """Per row: ``margin`` (the log-odds the score comes from), ``bias`` (the model's base
        log-odds) and ``reasons``; ``bias`` + every input's contribution = ``margin`` (float32 rounding).
        ``margins``: the rows' margins when the caller has them already (one booster call fewer)."""
        contribs = self.contributions(x)
        if margins is None:
            margins = self.score_matrix(x, margin=True)
        return [{"margin": float(m), "bias": float(c[-1]), "reasons": r}
                for m, c, r in zip(margins, contribs, self.reasons(x, contribs, top=top))]

    def score_table(self, table: pa.Table) -> np.ndarray:
        """One score (probability of fraud, float64) per row of ``table``."""
        return self.score_matrix(feature_matrix(table, self.features))

    def score_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[float]:
        """One score per feature dict (every model input as a key; None for null)."""
        return self.score_matrix(feature_vector(rows, self.features)).tolist()


# ----------------------------------------------------------------------------------- batch


def score_batch(scorer: Scorer, features_path: str, *, start: date, end: date, version: int | None = None,
                check_spec: bool = True, reasons: int = DEFAULT_REASONS) -> tuple[pa.Table, int]:
    """Predictions for the ``event_date`` range of a features table; returns (table, version read).
    ``reasons`` > 0 adds the columns ``margin``, ``bias`` and ``reasons`` (the top contributions)."""
    from deltalake import DeltaTable

    from finfeat.jobs.training import read_features, spec_hash_at

    if not DeltaTable.is_deltatable(features_path):
        raise ScoringError(f"no Delta features table at {features_path}")
    v = version if version is not None else DeltaTable(features_path).version()
    table_hash = spec_hash_at(features_path, v)
    if check_spec and scorer.spec_hash and table_hash and table_hash != scorer.spec_hash:
        raise ScoringError(f"the model was trained on feature spec {scorer.spec_hash} but {features_path} "
                           f"(version {v}) was written with spec {table_hash}: re-backfill or retrain")
    keys = ["txn_id", "card_token", "event_time", "event_date"]
    table = read_features(features_path, v, start, end, columns=[*keys, *(c for c in scorer.features if c not in keys)])
    table = table.sort_by([("event_time", "ascending"), ("txn_id", "ascending")])
    x = feature_matrix(table, scorer.features)
    scores = scorer.score_matrix(x)
    out = pa.Table.from_arrays(
        [*(table.column(k).combine_chunks() for k in keys), pa.array(scores, pa.float64()),
         pa.array([scorer.model_id] * table.num_rows, pa.string()),
         pa.array([v] * table.num_rows, pa.int64())], schema=PREDICTION_SCHEMA)
    if reasons > 0:
        explained = scorer.explain_rows(x, top=reasons)
        out = (out.append_column("margin", pa.array([e["margin"] for e in explained], pa.float64()))
               .append_column("bias", pa.array([e["bias"] for e in explained], pa.float64()))
               .append_column("reasons", pa.array([e["reasons"] for e in explained], pa.list_(REASON_TYPE))))
    return out, v


def write_predictions(table: pa.Table, out: str | Path, *, fmt: str, start: date, end: date) -> str:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, compression="zstd")
        return str(path)
    from deltalake import CommitProperties, DeltaTable, write_deltalake

    path = str(out)
    exists = DeltaTable.is_deltatable(path)
    predicate = f"event_date >= '{start.isoformat()}' AND event_date <= '{end.isoformat()}'"
    meta = {"finfeat.operation": "score", "finfeat.model_id": table.column("model_id")[0].as_py()
            if table.num_rows else "", "finfeat.range": f"{start.isoformat()}..{end.isoformat()}"}
    write_deltalake(path, table, partition_by=["event_date"], mode="overwrite",
                    predicate=predicate if exists else None, commit_properties=CommitProperties(custom_metadata=meta))
    return path


# ----------------------------------------------------------------------------------- one transaction


def _online_available() -> bool:
    try:
        import finfeat.jobs.online  # noqa: F401
    except ImportError:
        return False
    return True


def score_request(scorer: Scorer, request: Mapping[str, Any], *, store_url: str | None = None,
                  allow_missing: bool = False, namespace: str | None = None, spec: Any = None,
                  store: Any = None, reasons: int = DEFAULT_REASONS, audit: Any = None,
                  request_id: str | None = None, caller: str | None = None) -> dict[str, Any]:
    """Score one JSON request (see the module docstring); raises the online store's errors.

    ``reasons`` > 0 adds ``margin``, ``bias`` and ``reasons``: the decision's top contributions
    (tree SHAP) as ``{"feature", "value", "contribution"}``, largest absolute value first.
    ``audit``: an open :class:`finfeat.jobs.audit.AuditTrail`; the decision is returned (with its
    ``request_id``) only after its record is in the trail, else ``AuditUnavailable`` is raised.
    ``store``: an open online store to look features up in (a serving process opens it once);
    else ``store_url`` is opened for this call; with neither, the request is the feature row.
    """
    if store_url is None and store is None:
        row = dict(request.get("features", request))
        amount = row.get("amount_minor")
        if amount is not None:  # a model input from the transaction: the parser's bounds (a feature
            # row may carry it as a float, e.g. read back from a matrix: integral values only)
            check_amount(int(amount) if isinstance(amount, float) and amount.is_integer() else amount)
        x = feature_vector([row], scorer.features)
        score, margin = scorer.score_one(x)
        out = {"score": score, "model_id": scorer.model_id, "features": {c: row.get(c) for c in scorer.features}}
        return _audited(_with_reasons(out, scorer, x, margin, reasons), scorer, request, audit, request_id, caller)
    if not _online_available():
        raise ScoringError("--store needs the online store (finfeat.jobs.online), which is not installed")
    from finfeat.jobs.online import CANDIDATE_TXN_ID, Candidate, lookup, open_store
    from finfeat.jobs.training import iso
    from finfeat.transforms.spec import FeatureSpec

    req = parse_request(request)  # the same bounds as the batch parser's; RequestError names the field
    at_us = req.at_us
    cand = Candidate(card_token=req.card_token, merchant_id=req.merchant_id, amount_minor=req.amount_minor,
                     at_us=at_us, currency=req.currency, merchant_lat=req.merchant_lat,
                     merchant_lon=req.merchant_lon, txn_id=req.txn_id or CANDIDATE_TXN_ID)
    spec = spec or FeatureSpec.default()
    if scorer.spec_hash and spec.spec_hash != scorer.spec_hash:
        raise ScoringError(f"the model was trained on feature spec {scorer.spec_hash}, the store serves "
                           f"{spec.spec_hash}: pass the matching --feature-spec")
    on_missing = "empty" if allow_missing else "raise"
    if store is not None:
        result = lookup(store, spec, cand, on_missing=on_missing)
    else:
        with open_store(store_url, spec, create=False, namespace=namespace) as opened:
            result = lookup(opened, spec, cand, on_missing=on_missing)
    row = {**result.features, "amount_minor": cand.amount_minor}
    x = feature_vector([row], scorer.features)
    score, margin = scorer.score_one(x)
    from datetime import datetime, timezone

    out = {"score": score, "model_id": scorer.model_id, "txn_id": req.txn_id,
           "at": iso(datetime.fromtimestamp(at_us / 1e6, tz=timezone.utc)), "at_us": at_us,
           "features": {c: row.get(c) for c in scorer.features},
           "as_of_us": result.as_of_us, "age_s": result.age_s, "missing": result.missing}
    return _audited(_with_reasons(out, scorer, x, margin, reasons), scorer, request, audit, request_id, caller)


def _audited(out: dict[str, Any], scorer: Scorer, request: Mapping[str, Any], audit: Any, request_id: str | None,
             caller: str | None) -> dict[str, Any]:
    if audit is None:
        return out
    from finfeat.jobs.audit import decision_record, new_request_id

    rid = request_id or new_request_id()
    rec = json_safe(decision_record(out, request_id=rid, caller=caller or audit.caller, spec_hash=scorer.spec_hash,
                                    request=request))  # strict JSON: a non-finite value is recorded as null
    if "reasons" in out:
        rec["reason_method"] = scorer.reason_method
    audit.record(rec)
    return {"request_id": rid, **out}


def _with_reasons(out: dict[str, Any], scorer: Scorer, x: np.ndarray, margin: float, reasons: int
                  ) -> dict[str, Any]:
    if reasons > 0:
        out.update(scorer.explain_rows(x, top=reasons, margins=np.array([margin]))[0])
    return out


def _logistic_sigmoid(booster: Any, n_features: int) -> Any:
    """xgboost's margin -> probability for a ``binary:logistic`` model as a Python function
    (``1 / (1 + expf(-margin))`` in float32, with the C library's ``expf``, as xgboost computes it),
    or None when the model has another objective or the function does not give the booster's own
    scores bit for bit on a check at load (4,000 margins from -30 to 30, set through
    ``base_margin``). Then a score costs one booster call instead of two."""
    import ctypes
    import ctypes.util

    try:
        objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    except (KeyError, TypeError, ValueError):
        return None
    name = ctypes.util.find_library("m")
    if objective != "binary:logistic" or name is None:
        return None
    try:
        expf = ctypes.CDLL(name).expf
    except (OSError, AttributeError):
        return None
    expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
    one = np.float32(1.0)

    def sigmoid(margin: float) -> float:
        return float(one / (np.float32(expf(-margin)) + one))

    # the booster's scores for margins spread over the range that matters (and beyond, where they saturate)
    offsets = np.concatenate([np.linspace(-30.0, 30.0, 2_000), np.random.default_rng(0).normal(0.0, 6.0, 2_000)])
    x = np.zeros((len(offsets), n_features), dtype=np.float64)
    margins = booster.inplace_predict(x, missing=np.nan, predict_type="margin", base_margin=offsets)
    values = booster.inplace_predict(x, missing=np.nan, predict_type="value", base_margin=offsets)
    if any(sigmoid(float(m)) != float(v) for m, v in zip(margins, values)):
        _LOG.info("the model's scores are not reproduced from its margins: two booster calls per decision")
        return None
    return sigmoid


# ----------------------------------------------------------------------------------- CLI


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from finfeat.jobs.training import _date, _version

    p = subparsers.add_parser("score", help="score transactions with a trained model (batch or one JSON)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
    p.add_argument("--model", required=True, help="model folder written by `finfeat train`")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--batch", action="store_true", help="score an event-date range of the features table")
    mode.add_argument("--json", help="one transaction as JSON (see above)")
    mode.add_argument("--jsonl", metavar="PATH",
                      help="many transactions, one JSON object per line ('-' for stdin): one JSON result per "
                           "line on stdout, in order, the model and the store opened once (a scoring loop); a "
                           "line that fails gets an {\"error\": ...} result and the rest go on (exit 1 if any did)")
    p.add_argument("--warehouse", default="warehouse", help="folder of the Delta tables (default ./warehouse)")
    p.add_argument("--start", type=_date, help="batch: first event date, UTC, inclusive")
    p.add_argument("--end", type=_date, help="batch: last event date, UTC, inclusive")
    p.add_argument("--features-version", type=_version, help="batch: Delta version of the features table")
    p.add_argument("--out", help="batch: output path (a .parquet file, or a Delta folder with --format delta)")
    p.add_argument("--format", choices=["parquet", "delta"], help="batch output format (default: parquet if --out "
                                                                  "ends in .parquet, else delta)")
    p.add_argument("--store", help="--json: the online store, sqlite:PATH or redis://HOST:PORT/DB")
    p.add_argument("--namespace", help="--json: Redis key namespace")
    p.add_argument("--allow-missing", action="store_true",
                   help="--json: score a card or merchant without stored state as having no history")
    p.add_argument("--feature-spec", help="--json: feature spec YAML of the store (default: built-in v1)")
    p.add_argument("--audit", metavar="DIR",
                   help="--json/--jsonl: append every decision to the hash-chained audit trail in DIR (e.g. "
                        "warehouse/audit; see `finfeat audit --help`); a decision is printed only once recorded")
    p.add_argument("--caller", help="--audit: who asks (default cli:<user name>)")
    p.add_argument("--reason-method", choices=REASON_METHODS, default="shap",
                   help="shap: exact tree SHAP; saabas: xgboost's approximate contributions, much cheaper per "
                        "decision (both add up to the log-odds)")
    p.add_argument("--reasons", type=_nonneg, default=DEFAULT_REASONS, metavar="N",
                   help=f"reason codes per decision: the N largest tree-SHAP contributions (default "
                        f"{DEFAULT_REASONS}; 0: none)")
    return p


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return n


def run(args: argparse.Namespace) -> int:
    try:
        scorer = Scorer.load(args.model, reason_method=args.reason_method)
    except ScoringError as exc:
        print(f"finfeat score: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.batch:
        if args.audit:
            print("finfeat score: error: --audit records online decisions (--json, --jsonl); batch scores are "
                  "kept in the --out table", file=sys.stderr)
            return EXIT_USAGE
        return _run_batch(args, scorer)
    audit = None
    if args.audit:
        from finfeat.jobs.audit import AuditTrail, AuditUnavailable, cli_caller

        try:
            audit = AuditTrail.open(args.audit, caller=args.caller or cli_caller())
        except (OSError, AuditUnavailable) as exc:
            print(f"finfeat score: error: --audit {args.audit}: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
    args.audit_trail = audit
    try:
        if args.jsonl:
            return _run_jsonl(args, scorer)
        return _run_json(args, scorer)
    finally:
        if audit is not None:
            audit.close()


def _run_batch(args: argparse.Namespace, scorer: Scorer) -> int:
    from finfeat.jobs import delta

    if args.start is None or args.end is None or not args.out:
        print("finfeat score: error: --batch needs --start, --end and --out", file=sys.stderr)
        return EXIT_USAGE
    if args.end < args.start:
        print(f"finfeat score: error: --end {args.end} is before --start {args.start}", file=sys.stderr)
        return EXIT_USAGE
    fmt = args.format or ("parquet" if str(args.out).endswith(".parquet") else "delta")
    try:
        table, version = score_batch(scorer, delta.table_path(args.warehouse, delta.FEATURES), start=args.start,
                                     end=args.end, version=args.features_version, reasons=args.reasons)
        where = write_predictions(table, args.out, fmt=fmt, start=args.start, end=args.end)
    except ScoringError as exc:
        print(f"finfeat score: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"scored {table.num_rows:,} transactions {args.start}..{args.end} (features v{version}, model "
          f"{scorer.model_id}) -> {where} ({fmt})")
    return EXIT_OK


def _load_spec(args: argparse.Namespace) -> Any:
    if not args.feature_spec:
        return None
    from finfeat.transforms.spec import FeatureSpec

    return FeatureSpec.from_yaml(args.feature_spec)


def _classify(exc: Exception) -> tuple[int, str] | None:
    """Exit code and error kind of a failed online request (None: not an online-store error)."""
    from finfeat.jobs.audit import AuditUnavailable

    if isinstance(exc, AuditUnavailable):
        return EXIT_UNAVAILABLE, "audit_unavailable"
    from finfeat.jobs.online import (
        CandidateBeforeState,
        KeyNotFound,
        OnlineStoreError,
        StoreSpecMismatch,
        StoreUnavailable,
    )

    if isinstance(exc, (ScoringError, RequestError, StoreSpecMismatch, ValueError)):
        return EXIT_USAGE, "bad_request"
    if isinstance(exc, KeyNotFound):
        return EXIT_MISSING, exc.reason
    if isinstance(exc, CandidateBeforeState):
        return EXIT_NOT_EXACT, "candidate_before_state"
    if isinstance(exc, StoreUnavailable):
        return EXIT_UNAVAILABLE, "store_unavailable"
    if isinstance(exc, OnlineStoreError):
        return EXIT_UNAVAILABLE, "store_error"
    return None


def _run_json(args: argparse.Namespace, scorer: Scorer) -> int:
    try:
        request = json.loads(args.json)
        if not isinstance(request, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        print(f"finfeat score: error: --json is not a JSON object: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        spec = _load_spec(args)
    except ValueError as exc:
        print(f"finfeat score: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.store is None:
        try:
            out = score_request(scorer, request, reasons=args.reasons, audit=args.audit_trail)
        except Exception as exc:  # noqa: BLE001 - mapped to exit codes below, anything else re-raised
            got = _classify(exc)
            if got is None:
                raise
            print(f"finfeat score: error: {exc}", file=sys.stderr)
            return got[0]
        print(dumps(out, indent=2))
        return EXIT_OK
    try:
        out = score_request(scorer, request, store_url=args.store, allow_missing=args.allow_missing,
                            namespace=args.namespace, spec=spec, reasons=args.reasons, audit=args.audit_trail)
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes below, anything else re-raised
        got = _classify(exc)
        if got is None:
            raise
        code, kind = got
        if code == EXIT_USAGE:
            print(f"finfeat score: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(dumps({"error": kind, "message": str(exc)}))
        print(f"finfeat score: {exc}", file=sys.stderr)
        return code
    print(dumps(out, indent=2))
    return EXIT_OK


def _run_jsonl(args: argparse.Namespace, scorer: Scorer) -> int:
    try:
        spec = _load_spec(args)
        source = sys.stdin if args.jsonl == "-" else open(args.jsonl, encoding="utf-8")  # noqa: SIM115
    except (ValueError, OSError) as exc:
        print(f"finfeat score: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = None
    if args.store is not None:
        from finfeat.jobs.online import open_store
        from finfeat.transforms.spec import FeatureSpec

        spec = spec or FeatureSpec.default()
        try:
            store = open_store(args.store, spec, create=False, namespace=args.namespace)
        except Exception as exc:  # noqa: BLE001 - mapped to an exit code, anything else re-raised
            got = _classify(exc)
            if got is None:
                raise
            print(f"finfeat score: error: {exc}", file=sys.stderr)
            return got[0]
    lines = failed = 0
    try:
        for n, line in enumerate(source, 1):
            if not line.strip():
                continue
            lines += 1
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ScoringError("not a JSON object")
                out = score_request(scorer, request, store=store, allow_missing=args.allow_missing, spec=spec,
                                    reasons=args.reasons, audit=args.audit_trail)
            except json.JSONDecodeError as exc:
                out, failed = {"line": n, "error": "bad_request", "message": f"not JSON: {exc}"}, failed + 1
            except Exception as exc:  # noqa: BLE001 - one line's failure is that line's result
                got = _classify(exc)
                if got is None:  # not a known kind: still that line's error, the loop goes on
                    _LOG.error("line %d: unexpected %s", n, type(exc).__name__, exc_info=exc)
                    got = (1, "internal_error")
                out, failed = {"line": n, "error": got[1], "message": str(exc)}, failed + 1
            try:
                text = dumps(out)
            except (TypeError, ValueError) as exc:
                text, failed = dumps({"line": n, "error": "internal_error", "message": str(exc)}), failed + 1
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
    finally:
        if store is not None:
            store.close()
        if source is not sys.stdin:
            source.close()
    print(f"finfeat score: {lines:,} requests, {lines - failed:,} scored, {failed:,} failed", file=sys.stderr)
    return EXIT_OK if failed == 0 else 1
