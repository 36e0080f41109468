"""Expectation suites as data: YAML files of GX Core expectations, each with a policy.

A suite file (``validation/suites/events.yaml``, ``features.yaml``, or a user's own file) lists
expectations by name::

    name: features
    description: one row per transaction, the v1 feature set
    expectations:
      - name: currency_iso_4217
        policy: fail                        # warn | drop | fail (Delta Live Tables' expect,
        type: expect_column_values_to_be_in_set   #  expect_or_drop, expect_or_fail)
        kwargs: {column: currency, value_set: $iso_4217}
      - name: count_non_negative
        policy: drop
        type: expect_column_values_to_be_between
        columns: [card_count_1h, card_count_24h]  # one expectation per column,
        kwargs: {min_value: 0}                    # named count_non_negative[card_count_1h], ...

* ``name``: unique and stable; it is what quarantined rows, run summaries and error messages carry.
* ``policy``: ``warn`` counts offending rows, ``drop`` quarantines them (and keeps the rest),
  ``fail`` stops the run when the expectation is not met (GX's ``mostly`` is honoured for
  ``fail``; ``drop`` quarantines every offending row whatever ``mostly`` says).
* ``type``: any GX Core 1.x expectation in snake case (``expect_column_values_to_be_between``,
  ``expect_column_pair_values_a_to_be_greater_than_b``, ...). ``drop`` needs a row-level (map)
  expectation: column, column-pair or multicolumn; table-level ones can only ``warn`` or ``fail``.
* ``kwargs``: the expectation's arguments. A string value ``$iso_4217`` or ``$channels`` is the
  built-in value set of that name.

A suite is checked completely when it is loaded (unknown keys, unknown expectation types, bad
arguments, duplicate names), so a broken suite fails before any data is read.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finfeat.schemas.currencies import ISO_4217
from finfeat.schemas.errors import describe
from finfeat.schemas.events import CHANNELS

Policy = Literal["warn", "drop", "fail"]
POLICIES: tuple[str, ...] = ("warn", "drop", "fail")

BUILTIN_SUITES = ("events", "features")

#: Value sets a suite can name as ``$<name>`` instead of listing them.
VALUE_SETS: dict[str, list[Any]] = {
    "iso_4217": sorted(ISO_4217),
    "channels": list(CHANNELS),
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]*$")
_COLUMN_KEYS = ("column", "column_A", "column_B")


class SuiteError(ValueError):
    """A suite file is missing, unreadable or invalid; the message names the offending entry."""


class _RuleSpec(BaseModel):
    """One entry of a suite file, before ``columns`` expansion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    policy: Policy
    type: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    columns: list[str] | None = None
    description: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid expectation name: use letters, digits, _ . : -")
        return v

    @model_validator(mode="after")
    def _columns(self) -> _RuleSpec:
        if self.columns is not None:
            if not self.columns:
                raise ValueError("'columns' is empty; list at least one column or use kwargs.column")
            if "column" in self.kwargs:
                raise ValueError("give either 'columns' (one expectation per column) or kwargs.column, not both")
        return self


class _SuiteSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str | None = None
    expectations: list[_RuleSpec]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid suite name: use letters, digits, _ . : -")
        return v


@dataclass(frozen=True)
class Rule:
    """One expectation of a suite, after expansion: a GX expectation, its name and its policy."""

    name: str
    policy: Policy
    type: str
    kwargs: dict[str, Any]
    description: str | None = None
    row_level: bool = True     # a column / column-pair / multicolumn map expectation (rows can be named)

    @property
    def columns(self) -> list[str]:
        """The columns the expectation reads."""
        cols = [self.kwargs[k] for k in _COLUMN_KEYS if isinstance(self.kwargs.get(k), str)]
        cols += list(self.kwargs.get("column_list") or [])
        return cols

    def to_gx(self) -> Any:
        """A fresh GX expectation object for this rule (its name rides along in ``meta``)."""
        from finfeat.validation import _gx

        return _gx.expectation_class(self.type)(**self.kwargs, meta={"finfeat_name": self.name,
                                                                      "finfeat_policy": self.policy})


@dataclass(frozen=True)
class Suite:
    """A named, ordered list of :class:`Rule`; load one with :meth:`Suite.load`."""

    name: str
    rules: tuple[Rule, ...]
    description: str | None = None
    origin: str = "<dict>"
    _by_name: dict[str, Rule] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {r.name: r for r in self.rules})

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path) -> Suite:
        """A built-in suite by name (``events``, ``features``) or a suite YAML file."""
        text, origin = _read_suite_text(name_or_path)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SuiteError(f"suite {origin} is not valid YAML: {exc}") from None
        return cls.from_dict(raw, origin=origin)

    @classmethod
    def from_dict(cls, raw: object, *, origin: str = "<dict>") -> Suite:
        try:
            spec = _SuiteSpec.model_validate(raw)
        except ValidationError as exc:
            raise SuiteError(f"suite {origin} is invalid: {describe(exc)}") from None
        rules: list[Rule] = []
        for i, entry in enumerate(spec.expectations):
            where = f"suite {origin}, expectation {entry.name!r} (entry {i})"
            kwargs = _resolve_value_sets(entry.kwargs, where)
            expanded = ([(f"{entry.name}[{c}]", {**kwargs, "column": c}) for c in entry.columns]
                        if entry.columns is not None else [(entry.name, kwargs)])
            for name, kw in expanded:
                rules.append(_checked_rule(name, entry.policy, entry.type, kw, entry.description, where))
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SuiteError(f"suite {origin}: expectation names repeat: {', '.join(dupes)}; names must be unique")
        return cls(name=spec.name, rules=tuple(rules), description=spec.description, origin=origin)

    # -- inspection ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def rule(self, name: str) -> Rule:
        return self._by_name[name]

    @property
    def columns(self) -> list[str]:
        """Every column some expectation reads, in first-use order."""
        return list(dict.fromkeys(c for r in self.rules for c in r.columns))

    @cached_property
    def fingerprint(self) -> str:
        canonical = json.dumps({"name": self.name, "rules": [[r.name, r.policy, r.type, r.kwargs] for r in self.rules]},
                               sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def restricted_to(self, columns: list[str] | set[str]) -> tuple[Suite, list[str]]:
        """This suite without the expectations that read a column not in ``columns``.

        Returns the smaller suite and the names of the expectations left out (e.g. for a table
        computed with a custom feature spec that lacks some of the v1 features).
        """
        have = set(columns)
        keep = tuple(r for r in self.rules if set(r.columns) <= have)
        skipped = [r.name for r in self.rules if not set(r.columns) <= have]
        return Suite(name=self.name, rules=keep, description=self.description, origin=self.origin), skipped


def _read_suite_text(name_or_path: str | Path) -> tuple[str, str]:
    if str(name_or_path) in BUILTIN_SUITES:
        res = resources.files("finfeat.validation").joinpath("suites", f"{name_or_path}.yaml")
        return res.read_text(), f"finfeat/validation/suites/{name_or_path}.yaml"
    p = Path(name_or_path)
    if not p.is_file():
        raise SuiteError(f"suite {p} does not exist; give a suite YAML file or a built-in suite name "
                         f"({', '.join(BUILTIN_SUITES)})")
    return p.read_text(), str(p)


def _resolve_value_sets(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and value.startswith("$"):
            ref = value[1:]
            if ref not in VALUE_SETS:
                raise SuiteError(f"{where}: kwargs.{key} names an unknown value set {value!r}; "
                                 f"built-in sets: {', '.join('$' + k for k in VALUE_SETS)}")
            value = list(VALUE_SETS[ref])
        out[key] = value
    return out


def _checked_rule(name: str, policy: str, type_: str, kwargs: dict[str, Any], description: str | None,
                  where: str) -> Rule:
    """Build the GX expectation once, so a wrong type or argument fails at load with its name."""
    from finfeat.validation import _gx

    for reserved in ("meta", "result_format", "catch_exceptions", "id"):
        if reserved in kwargs:
            raise SuiteError(f"{where}: kwargs.{reserved} is set by finfeat; remove it")
    try:
        cls = _gx.expectation_class(type_)
    except KeyError:
        raise SuiteError(f"{where}: {type_!r} is not a GX Core expectation type "
                         "(e.g. expect_column_values_to_be_between); see greatexpectations.io/expectations") from None
    try:
        cls(**kwargs)
    except Exception as exc:  # pydantic's ValidationError or GX's own InvalidExpectationConfigurationError
        message = " ".join(str(exc).split())
        raise SuiteError(f"{where}: invalid arguments for {type_}: {message}") from None
    row_level = _gx.is_row_level(cls)
    if policy == "drop" and not row_level:
        raise SuiteError(f"{where}: policy 'drop' needs a row-level expectation (column, column pair or "
                         f"multicolumn values); {type_} judges the whole table: use 'warn' or 'fail'")
    return Rule(name=name, policy=policy, type=type_, kwargs=kwargs, description=description,  # type: ignore[arg-type]
                row_level=row_level)
