"""The one place that touches Great Expectations: a process-wide ephemeral context, reused.

GX Core has a fixed cost per process (the import, ~2-4 s) and a small one per validation. The
context, its pandas data source, the data-frame asset and its batch definition are built once per
process (per Beam worker) on first use and reused; GX suites are built once per finfeat suite and
cached by fingerprint. Validations are serialized with a lock: GX contexts are not documented as
thread-safe and Beam may run several bundles of one worker on threads.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

# No usage statistics leave the machine (GX reads this when a context is created).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

_LOCK = threading.RLock()
_STATE: dict[str, Any] = {}
_SUITES: dict[str, Any] = {}

#: First pass over the whole suite: success or not, nothing else (the cheapest GX format).
SCREEN_FORMAT: dict[str, Any] = {"result_format": "BOOLEAN_ONLY"}
#: Second pass, only for the expectations the first pass found broken: counts and the row numbers
#: of every offending row, nothing else that grows with the data (no unexpected values: finfeat
#: samples them from the table itself; no index query string).
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "exclude_unexpected_values": True,
    "return_unexpected_index_query": False,
    "partial_unexpected_count": 0,
}


def gx() -> Any:
    """The ``great_expectations`` module, imported once, quietly."""
    mod = _STATE.get("gx")
    if mod is None:
        with _LOCK:
            mod = _STATE.get("gx")
            if mod is None:
                started = time.monotonic()
                import great_expectations as mod  # noqa: PLC0415  (2-4 s: only when a suite is used)

                for name in ("great_expectations", "great_expectations.data_context"):
                    logging.getLogger(name).setLevel(logging.WARNING)
                _STATE["gx"] = mod
                _STATE["import_seconds"] = round(time.monotonic() - started, 2)
    return mod


def expectation_class(type_name: str) -> type:
    """The GX expectation class of a snake-case type name; KeyError if GX has none."""
    gx()
    from great_expectations.expectations.registry import get_expectation_impl

    try:
        return get_expectation_impl(type_name)
    except Exception:
        raise KeyError(type_name) from None


def is_row_level(cls: type) -> bool:
    """Whether an expectation judges single rows (so offending rows can be named)."""
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
    )

    return issubclass(cls, (ColumnMapExpectation, ColumnPairMapExpectation, MulticolumnMapExpectation))


def quiet_context(context: Any) -> Any:
    """No progress bars on stderr for every metric batch."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _batch_definition() -> Any:
    bd = _STATE.get("batch_definition")
    if bd is None:
        context = quiet_context(gx().get_context(mode="ephemeral"))
        source = context.data_sources.add_pandas("finfeat")
        asset = source.add_dataframe_asset("frame")
        bd = asset.add_batch_definition_whole_dataframe("whole")
        _STATE["context"], _STATE["batch_definition"] = context, bd
    return bd


def gx_suite(suite: Any) -> Any:
    """The GX ``ExpectationSuite`` of a finfeat :class:`~finfeat.validation.suite.Suite`, cached."""
    key = suite.fingerprint
    built = _SUITES.get(key)
    if built is None:
        with _LOCK:
            built = _SUITES.get(key)
            if built is None:
                built = _SUITES[key] = _build(suite)
    return built


#: Expectation types that read a column only through null checks and equality (hashing): an
#: integer code per distinct value (null where null) gets exactly their answer.
CODE_SAFE = frozenset({
    "expect_column_values_to_not_be_null", "expect_column_values_to_be_null",
    "expect_column_values_to_be_unique",
})
#: ... and those that also compare with a set of values, which a pandas Categorical answers exactly
#: as an object column.
CATEGORICAL_SAFE = CODE_SAFE | {"expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"}


def to_frame(table: Any, columns: list[str], *, suite: Any = None) -> pd.DataFrame:
    """The columns of an Arrow table as the pandas frame GX validates.

    Narrow integers and floats are widened to 64 bits first: GX's pandas ``between`` check is
    vectorized only for int64 / float64 columns and calls a Python function per value for any
    other dtype (``hour_of_day`` and ``day_of_week`` are int32: two million calls per million
    rows). With a ``suite``, a text column that its expectations read only through null,
    uniqueness and set checks is dictionary-encoded (in Arrow, in C++) instead of becoming a
    Python string per row: as the codes themselves where only nulls and uniqueness are checked
    (a million-row ``txn_id``), as a pandas Categorical where set membership is checked too.
    Dates stay datetime64 instead of a ``datetime.date`` per row. None of this changes which rows
    meet an expectation; offending values are reported from the Arrow table, not the frame.
    """
    import pyarrow as pa

    codes, categorical = _encodable(suite) if suite is not None else (set(), set())
    table = table.select(columns)
    for i, field in enumerate(table.schema):
        t = field.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            if field.name in codes:
                table = table.set_column(i, field.name, table.column(i).combine_chunks().dictionary_encode().indices)
            elif field.name in categorical:
                table = table.set_column(i, field.name, table.column(i).dictionary_encode())
            continue
        wide = (pa.int64() if pa.types.is_integer(t) and t != pa.int64() and not (
                    pa.types.is_uint64(t)) else
                pa.float64() if pa.types.is_floating(t) and t != pa.float64() else None)
        if wide is not None:
            table = table.set_column(i, field.name, table.column(i).cast(wide))
    # pandas metadata ignored: the frame gets a RangeIndex, so GX's row index == row number
    return table.to_pandas(ignore_metadata=True, date_as_object=False)


def _encodable(suite: Any) -> tuple[set[str], set[str]]:
    """Columns of ``suite`` read only by :data:`CODE_SAFE` and only by :data:`CATEGORICAL_SAFE`
    expectations."""
    read = {c for r in suite.rules for c in r.columns}
    not_code = {c for r in suite.rules if r.type not in CODE_SAFE for c in r.columns}
    not_cat = {c for r in suite.rules if r.type not in CATEGORICAL_SAFE for c in r.columns}
    return read - not_code, read - not_cat - (read - not_code)


def validate_frame(frame: pd.DataFrame, suite: Any, *, result_format: dict[str, Any] | None = None,
                   cache: bool = True) -> Any:
    """Validate a pandas frame (RangeIndex: row numbers) with the shared ephemeral context.

    ``cache=False`` builds the GX suite afresh (for the small, varying suites of a second pass).
    """
    with _LOCK:
        bd = _batch_definition()
        batch = bd.get_batch(batch_parameters={"dataframe": frame})
        built = gx_suite(suite) if cache else _build(suite)
        return batch.validate(built, result_format=dict(result_format or RESULT_FORMAT))


def _build(suite: Any) -> Any:
    built = gx().ExpectationSuite(name=suite.name)
    for rule in suite.rules:
        built.add_expectation(rule.to_gx())
    return built


def import_seconds() -> float | None:
    return _STATE.get("import_seconds")
