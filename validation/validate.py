"""Validate an Arrow table against a suite: keep, quarantine, count warnings, or fail.

``validate_table(table, suite)`` runs every expectation of the suite once over whole columns of
the table (a few GX validations per table, bundle or partition, never per row) and splits the
result by policy:

* ``warn``: offending rows are counted in ``outcome.warnings``; they stay in ``passed``;
* ``drop``: offending rows leave ``passed`` and go to ``quarantined`` with the names of every
  expectation they broke (``broken_expectations``) and the run metadata of
  :mod:`finfeat.schemas.quarantine`;
* ``fail``: a broken expectation adds a message to ``outcome.failures``.

With a :class:`QuarantinePolicy`, quarantining more than its fraction of the rows is a failure
too. The caller commits nothing when ``outcome.failures`` is non-empty:
``outcome.raise_for_failures()`` raises :class:`ValidationFailed` naming the expectations.

Rows are matched to expectations by row number: the table goes to GX as a pandas frame with a
``RangeIndex``, in packs of a few whole columns (:data:`PACK_COLUMNS`; GX copies the frame per
expectation, so narrow frames are cheaper). A first pass over the whole suite asks only whether
each expectation holds (``BOOLEAN_ONLY``); a second pass runs just the broken ones with
``result_format: COMPLETE``, whose ``unexpected_index_list`` holds the row number of every
offending row of a row-level expectation (for uniqueness: every copy). A clean table costs one
cheap pass.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from finfeat.schemas.quarantine import BROKEN_EXPECTATIONS, quarantine_schema
from finfeat.validation import _gx
from finfeat.validation.suite import Rule, Suite

_EXAMPLES = 3
_US_PER_DAY = 86_400_000_000


class ValidationFailed(RuntimeError):
    """A ``fail`` expectation broke, or too many rows were quarantined: commit nothing."""

    def __init__(self, failures: Sequence[str], *, suite: str | None = None) -> None:
        self.failures = list(failures)
        self.suite = suite
        label = f"suite {suite!r}" if suite else "validation"
        super().__init__(f"{label} failed ({len(self.failures)} check(s)): " + "; ".join(self.failures))


@dataclass(frozen=True)
class QuarantinePolicy:
    """Fail the run when more than ``max_fraction`` of its rows were quarantined."""

    max_fraction: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_fraction {self.max_fraction} must be between 0 and 1")

    def check(self, outcome: ValidationOutcome) -> str | None:
        """A failure message when the outcome quarantined too many rows, else None."""
        if outcome.rows == 0 or outcome.quarantined.num_rows <= self.max_fraction * outcome.rows:
            return None
        by_rule = {r.name: r.unexpected_count for r in outcome.results
                   if r.policy == "drop" and r.unexpected_count}
        top = ", ".join(f"{n}: {c:,}" for n, c in sorted(by_rule.items(), key=lambda kv: -kv[1])[:5])
        return (f"quarantine: {outcome.quarantined.num_rows:,} of {outcome.rows:,} rows "
                f"({outcome.quarantined_fraction:.2%}) broke drop expectations, above the allowed "
                f"{self.max_fraction:.2%} ({top})")


@dataclass(frozen=True)
class ExpectationResult:
    """What one expectation found."""

    name: str
    policy: str
    type: str
    success: bool
    unexpected_count: int | None = None     # offending rows (row-level expectations)
    element_count: int | None = None
    observed: str | None = None             # observed value (table-level expectations)
    examples: tuple[str, ...] = ()          # a few offending values, e.g. "currency='XXX'"
    error: str | None = None                # the expectation could not be evaluated
    skipped: bool = False                   # left out: a column it reads is absent (missing_columns="skip")

    @property
    def broken(self) -> bool:
        return not self.skipped and (not self.success or bool(self.unexpected_count))

    def reason(self, rows: int) -> str:
        """A one-line message naming the expectation."""
        if self.error:
            return f"{self.name}: could not be evaluated: {self.error}"
        if self.unexpected_count is not None:
            eg = f", e.g. {'; '.join(self.examples)}" if self.examples else ""
            return f"{self.name}: {self.unexpected_count:,} of {rows:,} rows unexpected ({self.type}){eg}"
        return f"{self.name}: not met ({self.type}, observed {self.observed})"


@dataclass(frozen=True)
class ValidationOutcome:
    """The result of :func:`validate_table`."""

    suite: str
    rows: int
    passed: pa.Table                           # rows to keep
    quarantined: pa.Table                      # rows + broken_expectations + run metadata
    warnings: dict[str, int]                   # warn expectation -> offending rows (only those > 0)
    failures: list[str]                        # one message per broken fail expectation (+ quarantine policy)
    results: tuple[ExpectationResult, ...] = ()
    seconds: float = 0.0
    failed_expectations: list[str] = field(default_factory=list)   # names only
    #: rows kept, when ``passed`` was left out (:meth:`without_passed`: the rows went elsewhere)
    passed_rows: int | None = None

    @property
    def passed_count(self) -> int:
        return self.passed.num_rows if self.passed_rows is None else self.passed_rows

    def without_passed(self) -> ValidationOutcome:
        """This outcome with an empty ``passed`` table (``passed_count`` still counts its rows)."""
        return replace(self, passed=self.passed.schema.empty_table(), passed_rows=self.passed_count)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def quarantined_fraction(self) -> float:
        return self.quarantined.num_rows / self.rows if self.rows else 0.0

    def raise_for_failures(self) -> None:
        if self.failures:
            raise ValidationFailed(self.failures, suite=self.suite)

    def summary(self) -> dict[str, Any]:
        """Counts for a run report (JSON-serializable)."""
        return {
            "suite": self.suite, "rows": self.rows, "passed": self.passed_count,
            "quarantined": self.quarantined.num_rows,
            "quarantined_by_expectation": {r.name: r.unexpected_count for r in self.results
                                           if r.policy == "drop" and r.unexpected_count},
            "warnings": dict(self.warnings), "failures": list(self.failures),
            "skipped": [r.name for r in self.results if r.skipped], "seconds": self.seconds,
        }

    @classmethod
    def combine(cls, outcomes: Sequence[ValidationOutcome], *, policy: QuarantinePolicy | None = None
                ) -> ValidationOutcome:
        """One outcome for a run validated bundle by bundle (outcomes validated without a policy).

        Counts add up; a ``fail`` expectation is broken if it broke in any bundle; the policy is
        applied to the whole run. Cross-bundle properties (e.g. uniqueness across bundles) are not
        seen this way: validate the gathered table for those.
        """
        if not outcomes:
            raise ValueError("no outcomes to combine")
        suite = outcomes[0].suite
        rows = sum(o.rows for o in outcomes)
        merged: dict[str, ExpectationResult] = {}
        for o in outcomes:
            for r in o.results:
                m = merged.get(r.name)
                if m is None:
                    merged[r.name] = r
                    continue
                merged[r.name] = replace(
                    m, success=m.success and r.success,
                    unexpected_count=_add(m.unexpected_count, r.unexpected_count),
                    element_count=_add(m.element_count, r.element_count),
                    examples=(m.examples + r.examples)[:_EXAMPLES], error=m.error or r.error,
                    observed=m.observed if not m.success else r.observed, skipped=m.skipped and r.skipped)
        results = tuple(merged.values())
        passed = pa.concat_tables([o.passed for o in outcomes], promote_options="permissive")
        quarantined = pa.concat_tables([o.quarantined for o in outcomes], promote_options="permissive")
        passed_rows = None if all(o.passed_rows is None for o in outcomes) else sum(o.passed_count for o in outcomes)
        return _finish(suite, rows, passed, quarantined, results, policy,
                       seconds=round(sum(o.seconds for o in outcomes), 4), passed_rows=passed_rows)

    @classmethod
    def merge_split(cls, suite: Suite, parts: ValidationOutcome, rest: ValidationOutcome | None, *,
                    policy: QuarantinePolicy | None = None) -> ValidationOutcome:
        """The outcome of ``suite`` on a whole table validated as :func:`split_row_local` cut it:
        ``parts``, the row-local expectations combined over the table's parts, and ``rest``, the
        others on the whole table's columns, which quarantined nothing. Results in suite order."""
        if rest is not None and rest.quarantined.num_rows:
            raise ValueError("the whole-table expectations quarantined rows: validate the gathered table")
        found = {r.name: r for o in (parts, rest) if o is not None for r in o.results}
        results = tuple(found[r.name] for r in suite.rules if r.name in found)
        return _finish(suite.name, parts.rows, parts.passed, parts.quarantined, results, policy,
                       seconds=round(parts.seconds + (rest.seconds if rest is not None else 0.0), 4),
                       passed_rows=parts.passed_rows)


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


def _finish(suite: str, rows: int, passed: pa.Table, quarantined: pa.Table, results: tuple[ExpectationResult, ...],
            policy: QuarantinePolicy | None, *, seconds: float, passed_rows: int | None = None) -> ValidationOutcome:
    warnings: dict[str, int] = {}
    failures: list[str] = []
    failed: list[str] = []
    for r in results:
        if r.skipped:
            continue
        if r.error:  # whatever the policy: an expectation that cannot run cannot vouch for the data
            failures.append(r.reason(rows))
            failed.append(r.name)
        elif r.policy == "warn" and r.broken:
            warnings[r.name] = r.unexpected_count if r.unexpected_count is not None else 1
        elif r.policy == "fail" and not r.success:
            failures.append(r.reason(rows))
            failed.append(r.name)
    outcome = ValidationOutcome(suite=suite, rows=rows, passed=passed, quarantined=quarantined, warnings=warnings,
                                failures=failures, results=results, seconds=seconds, failed_expectations=failed,
                                passed_rows=passed_rows)
    if policy is not None:
        message = policy.check(outcome)
        if message:
            failures.append(message)
            failed.extend(r.name for r in results if r.policy == "drop" and r.unexpected_count)
    return outcome


#: Row-level expectations whose verdict on a row reads that row alone: evaluated on parts of a
#: table, their counts add up to those of the whole table (uniqueness, for one, is not among them).
ROW_LOCAL_TYPES = frozenset({
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_null",
    "expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set",
    "expect_column_values_to_be_between", "expect_column_value_lengths_to_be_between",
    "expect_column_value_lengths_to_equal", "expect_column_values_to_match_regex",
    "expect_column_values_to_not_match_regex", "expect_column_values_to_match_regex_list",
    "expect_column_values_to_not_match_regex_list", "expect_column_values_to_match_like_pattern",
    "expect_column_values_to_not_match_like_pattern", "expect_column_values_to_match_strftime_format",
    "expect_column_pair_values_a_to_be_greater_than_b", "expect_column_pair_values_to_be_equal",
    "expect_column_pair_values_to_be_in_set", "expect_multicolumn_sum_to_equal",
    "expect_select_column_values_to_be_unique_within_record",
})


def split_row_local(suite: Suite | str | Path) -> tuple[Suite, Suite]:
    """``suite`` cut in two: the expectations that judge each row by itself (a type of
    :data:`ROW_LOCAL_TYPES` without ``mostly``), which can run on any part of a table, and the
    rest (uniqueness, table-level, ``mostly``), which need the whole table's columns."""
    suite = as_suite(suite)
    local = tuple(r for r in suite.rules if r.type in ROW_LOCAL_TYPES and r.kwargs.get("mostly") is None)
    rest = tuple(r for r in suite.rules if r not in local)
    return (Suite(name=suite.name, rules=local, origin=suite.origin),
            Suite(name=suite.name, rules=rest, origin=suite.origin))


@lru_cache(maxsize=32)
def _load_cached(name_or_path: str) -> Suite:
    return Suite.load(name_or_path)


def as_suite(suite: Suite | str | Path) -> Suite:
    """A :class:`Suite` as it is, or a built-in name or YAML path loaded (once per process)."""
    return suite if isinstance(suite, Suite) else _load_cached(str(suite))


def validate_table(
    table: pa.Table,
    suite: Suite | str | Path,
    *,
    policy: QuarantinePolicy | None = None,
    run_id: str = "",
    quarantined_at_us: int | None = None,
    missing_columns: Literal["fail", "skip"] = "fail",
) -> ValidationOutcome:
    """Validate ``table`` against ``suite`` (a :class:`Suite`, a built-in name or a YAML path).

    ``run_id`` and ``quarantined_at_us`` (default: now) fill the quarantine metadata columns.
    ``missing_columns``: an expectation reading a column the table lacks is a failure ("fail",
    the default) or is left out and listed as skipped ("skip").
    """
    started = time.monotonic()
    suite = as_suite(suite)
    n = table.num_rows
    if quarantined_at_us is None:
        quarantined_at_us = int(time.time() * 1_000_000)

    present = set(table.column_names)
    missing = {r.name: [c for c in r.columns if c not in present] for r in suite.rules}
    missing = {k: v for k, v in missing.items() if v}
    runnable, _ = suite.restricted_to(present)
    results: dict[str, ExpectationResult] = {}
    for r in suite.rules:
        if r.name in missing:
            cols = ", ".join(missing[r.name])
            results[r.name] = ExpectationResult(
                name=r.name, policy=r.policy, type=r.type, success=False, skipped=missing_columns == "skip",
                error=None if missing_columns == "skip" else f"column(s) {cols} missing from the table")

    offending: dict[str, np.ndarray] = {}
    if runnable.rules:
        frame = _gx.to_frame(table, runnable.columns, suite=runnable)
        # Pass 1, the whole suite, success only (about half the cost of COMPLETE). Pass 2, COMPLETE
        # (counts, row numbers) for what broke, and for whatever a `mostly` lets pass with bad rows.
        second: list[Rule] = []
        for er in _validate_packed(frame, runnable, _gx.SCREEN_FORMAT):
            rule = runnable.rule(er.expectation_config.meta["finfeat_name"])
            if _exception(er) is not None:
                results[rule.name], _ = _read_result(rule, er, table)
            elif not er.success or (rule.row_level and rule.kwargs.get("mostly") is not None):
                second.append(rule)
            else:
                results[rule.name] = ExpectationResult(
                    name=rule.name, policy=rule.policy, type=rule.type, success=True,
                    unexpected_count=0 if rule.row_level else None, element_count=n if rule.row_level else None)
        if second:
            broken = Suite(name=suite.name, rules=tuple(second), origin=suite.origin)
            for er in _validate_packed(frame, broken, _gx.RESULT_FORMAT, cache=False):
                rule = broken.rule(er.expectation_config.meta["finfeat_name"])
                result, rows_idx = _read_result(rule, er, table)
                results[rule.name] = result
                if rows_idx is not None and len(rows_idx):
                    offending[rule.name] = rows_idx
    ordered = tuple(results[r.name] for r in suite.rules if r.name in results)

    drop_mask = np.zeros(n, dtype=bool)
    for r in suite.rules:
        if r.policy == "drop" and r.name in offending:
            drop_mask[offending[r.name]] = True
    passed = table.filter(pa.array(~drop_mask)) if drop_mask.any() else table
    quarantined = _quarantine(table, drop_mask, offending, suite, run_id=run_id, at_us=quarantined_at_us)
    return _finish(suite.name, n, passed, quarantined, ordered, policy,
                   seconds=round(time.monotonic() - started, 4))


#: Most columns in one GX validation. GX's pandas engine copies the whole frame for almost every
#: expectation (dropping the rows it ignores: nulls, or a pair's missing values), so the cost of a
#: suite grows with expectations x columns; a few narrow frames cost less than one wide one
#: (measured on a million feature rows: 4-8 columns per frame about 1.1 s, all 30 in one 1.6-2.2 s,
#: one frame per expectation 1.5-1.9 s, as GX adds ~50 ms per validation).
PACK_COLUMNS = 6


def _packs(rules: Sequence[Rule], width: int = PACK_COLUMNS) -> list[tuple[list[str] | None, list[Rule]]]:
    """Row-level rules grouped (first fit, in suite order) so that each group reads at most
    ``width`` columns (a rule that reads more gets a group of its own), with the group's columns
    in first-use order; table-level rules together, on the whole frame (columns ``None``), as
    they judge the table as a whole."""
    packs: list[tuple[dict[str, None], list[Rule]]] = []
    whole: list[Rule] = []
    for rule in rules:
        if not rule.row_level:
            whole.append(rule)
            continue
        cols = dict.fromkeys(rule.columns)
        for have, members in packs:
            if len(have | cols) <= width:
                have.update(cols)
                members.append(rule)
                break
        else:
            packs.append((cols, [rule]))
    out: list[tuple[list[str] | None, list[Rule]]] = [(list(cols), members) for cols, members in packs]
    return out + ([(None, whole)] if whole else [])


def _validate_packed(frame: Any, suite: Suite, result_format: dict[str, Any], *, cache: bool = True
                     ) -> list[Any]:
    """GX results of every rule of ``suite``, validated pack by pack on whole columns."""
    out: list[Any] = []
    for cols, members in _packs(suite.rules):
        part = Suite(name=suite.name, rules=tuple(members), origin=suite.origin)
        sub = frame if cols is None else frame[cols]
        out.extend(_gx.validate_frame(sub, part, result_format=result_format, cache=cache).results)
    return out


def _exception(er: Any) -> str | None:
    """The message of an exception GX caught while evaluating the expectation, if any.

    GX reports it either flat (``{"raised_exception": True, "exception_message": ...}``) or per
    metric (``{"MetricConfigurationID(...)": {"raised_exception": True, ...}}``).
    """
    info = er.exception_info or {}
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for entry in entries:
        if entry.get("raised_exception"):
            return " ".join(str(entry.get("exception_message") or "error").split())[:300]
    return None


def _read_result(rule: Rule, er: Any, table: pa.Table) -> tuple[ExpectationResult, np.ndarray | None]:
    error = _exception(er)
    if error is not None:
        return ExpectationResult(name=rule.name, policy=rule.policy, type=rule.type, success=False,
                                 error=error), None
    res = er.result or {}
    if not rule.row_level:
        observed = res.get("observed_value")
        return ExpectationResult(name=rule.name, policy=rule.policy, type=rule.type, success=bool(er.success),
                                 observed=None if observed is None else str(observed)[:200]), None
    index = res.get("unexpected_index_list")
    count = res.get("unexpected_count")
    rows_idx = None
    if index is not None:
        rows_idx = np.unique(np.asarray(index, dtype=np.int64))
    elif count or not er.success:  # not expected from COMPLETE on pandas: be loud, never keep bad rows silently
        return ExpectationResult(name=rule.name, policy=rule.policy, type=rule.type, success=False,
                                 unexpected_count=count, error="not met, and GX returned no row numbers for "
                                                               "the offending rows"), None
    examples = _examples(table, rule.columns, rows_idx) if rows_idx is not None and len(rows_idx) else ()
    return ExpectationResult(
        name=rule.name, policy=rule.policy, type=rule.type, success=bool(er.success),
        unexpected_count=int(count) if count is not None else (len(rows_idx) if rows_idx is not None else None),
        element_count=res.get("element_count"), examples=examples), rows_idx


def _examples(table: pa.Table, columns: list[str], rows_idx: np.ndarray) -> tuple[str, ...]:
    sample = table.select(columns).take(pa.array(rows_idx[:_EXAMPLES]))
    out = []
    for row in sample.to_pylist():
        out.append(", ".join(f"{k}={_short(v)}" for k, v in row.items()))
    return tuple(out)


def _short(v: object) -> str:
    if isinstance(v, datetime):
        return v.isoformat()
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _quarantine(table: pa.Table, drop_mask: np.ndarray, offending: dict[str, np.ndarray], suite: Suite, *,
                run_id: str, at_us: int) -> pa.Table:
    schema = quarantine_schema(table.schema)
    q_rows = np.flatnonzero(drop_mask)
    if not len(q_rows):
        return schema.empty_table()
    # (row, rule position) for every rule (any policy) each quarantined row broke, in suite order
    row_parts, rule_parts = [], []
    for pos, rule in enumerate(suite.rules):
        idx = offending.get(rule.name)
        if idx is None:
            continue
        idx = idx[drop_mask[idx]]
        row_parts.append(idx)
        rule_parts.append(np.full(len(idx), pos, dtype=np.int64))
    rows_all, rules_all = np.concatenate(row_parts), np.concatenate(rule_parts)
    order = np.lexsort((rules_all, rows_all))
    rows_all, rules_all = rows_all[order], rules_all[order]
    offsets = np.searchsorted(rows_all, q_rows, side="left").astype(np.int32)
    offsets = np.append(offsets, np.int32(len(rows_all)))
    names = pa.array(suite.names, pa.string()).take(pa.array(rules_all))
    broken = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), names)

    rows = table.take(pa.array(q_rows))
    k = len(q_rows)
    day = date(1970, 1, 1).toordinal() + at_us // _US_PER_DAY
    meta = {
        BROKEN_EXPECTATIONS: broken,
        "suite": pa.array([suite.name] * k, pa.string()),
        "run_id": pa.array([run_id] * k, pa.string()),
        "quarantined_at": pa.array([at_us] * k, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "quarantined_date": pa.array([date.fromordinal(day)] * k, pa.date32()),
    }
    arrays = [rows.column(name) for name in table.column_names] + [meta[f.name] for f in schema
                                                                   if f.name not in table.column_names]
    return pa.Table.from_arrays(arrays, schema=schema)


def validate_tables(tables: Iterable[pa.Table], suite: Suite | str | Path, *,
                    policy: QuarantinePolicy | None = None, **kwargs: Any) -> ValidationOutcome:
    """Validate bundles one by one (one GX validation each) and combine the outcomes."""
    outcomes = [validate_table(t, suite, **kwargs) for t in tables]
    return ValidationOutcome.combine(outcomes, policy=policy)
