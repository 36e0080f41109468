"""The declarative feature spec: entity, aggregation, field, window.

The spec is data (``feature_spec.yaml`` beside this file, or a user's own file). Every
computation path (the batch backfill, the streaming job, the online lookup) derives its
columns from it, and its hash is recorded with every Delta commit, so a table always says
which definitions produced it.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from finfeat.schemas.errors import describe

Entity = Literal["card", "merchant", "event"]
Agg = Literal[
    "count", "sum", "avg", "max", "min", "std", "zscore", "distinct", "is_new",
    "seconds_since_last", "geo_velocity", "hour_of_day", "day_of_week", "is_weekend", "fraud_rate",
]

#: Which event column identifies each entity.
ENTITY_COLUMNS: dict[str, str] = {"card": "card_token", "merchant": "merchant_id"}
#: Which event column a spec field name reads.
FIELD_COLUMNS: dict[str, str] = {"amount": "amount_minor", "merchant": "merchant_id", "card": "card_token"}

_WINDOW_UNITS_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_WINDOW_RE = re.compile(r"^(\d+)([smhd])$")

_WINDOWED = {"count", "sum", "avg", "max", "min", "std", "zscore", "distinct", "is_new", "fraud_rate"}
#: Default delay of label-aware features: labels are trusted only this long after the event.
DEFAULT_LABEL_DELAY = "7d"
_NUMERIC_FIELD = {"sum", "avg", "max", "min", "std", "zscore"}
_CALENDAR = {"hour_of_day", "day_of_week", "is_weekend"}

#: Column names: <entity>_<agg>_<field>_<window> unless the aggregation reads better otherwise.
_NAME_TEMPLATES = {
    "count": "{e}_count_{w}",
    "zscore": "{e}_{f}_zscore_{w}",
    "distinct": "{e}_distinct_{f}s_{w}",
    "is_new": "{e}_is_new_{f}_{w}",
    "seconds_since_last": "{e}_seconds_since_last",
    "geo_velocity": "{e}_geo_velocity_kmh",
    "fraud_rate": "{e}_fraud_rate_{w}",
}

#: Bumped whenever the engine's arithmetic changes; part of the spec hash.
ENGINE_VERSION = "1"


class SpecError(ValueError):
    """The feature spec is invalid; the message says which line and how to fix it."""


def window_us(window: str) -> int:
    m = _WINDOW_RE.match(window)
    if not m:
        raise SpecError(f"window {window!r} is not of the form <number><s|m|h|d>, e.g. 24h or 30d")
    return int(m.group(1)) * _WINDOW_UNITS_US[m.group(2)]


class FeatureDef(BaseModel):
    """One feature: ``{entity: card, agg: sum, field: amount, window: 24h}``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entity: Entity
    agg: Agg
    field: Literal["amount", "merchant", "card"] | None = None
    window: str | None = None
    delay: str | None = None  # label-aware features only: the window ends this long before t

    @model_validator(mode="after")
    def _check(self) -> FeatureDef:
        agg = self.agg
        if agg == "fraud_rate":
            if self.field:
                raise ValueError("fraud_rate takes no field (it reads the labels)")
            if not self.window:
                raise ValueError("fraud_rate needs a window such as 7d")
            window_us(self.window)
            if self.delay is None:
                object.__setattr__(self, "delay", DEFAULT_LABEL_DELAY)
            if window_us(self.delay) <= 0:
                raise ValueError("fraud_rate needs a positive delay such as 7d")
            return self
        if self.delay is not None:
            raise ValueError(f"{agg} takes no delay (only label-aware features such as fraud_rate do)")
        if agg in _CALENDAR:
            if self.entity != "event" or self.field or self.window:
                raise ValueError(f"{agg} takes entity: event and no field or window")
            return self
        if self.entity == "event":
            raise ValueError(f"entity 'event' only has calendar features, not {agg}")
        if agg in _WINDOWED:
            if not self.window:
                raise ValueError(f"{agg} needs a window such as 24h or 30d")
            window_us(self.window)
        elif self.window:
            raise ValueError(f"{agg} takes no window")
        if agg in _NUMERIC_FIELD and self.field != "amount":
            raise ValueError(f"{agg} needs field: amount")
        if agg in {"distinct", "is_new"}:
            if self.field not in {"merchant", "card"} or FIELD_COLUMNS[self.field] == ENTITY_COLUMNS[self.entity]:
                raise ValueError(f"{agg} needs a categorical field other than the entity (merchant or card)")
        if agg in {"count", "seconds_since_last", "geo_velocity"} and self.field:
            raise ValueError(f"{agg} takes no field")
        return self

    @cached_property
    def window_us(self) -> int | None:
        return window_us(self.window) if self.window else None

    @cached_property
    def delay_us(self) -> int:
        return window_us(self.delay) if self.delay else 0

    @cached_property
    def reach_us(self) -> int:
        """How far back in event time this feature looks."""
        return (self.window_us or 0) + self.delay_us

    @cached_property
    def name(self) -> str:
        if self.agg in _CALENDAR:
            return self.agg
        template = _NAME_TEMPLATES.get(self.agg, "{e}_{a}_{f}_{w}")
        return template.format(e=self.entity, a=self.agg, f=self.field, w=self.window)

    @cached_property
    def arrow_type(self) -> pa.DataType:
        if self.agg in {"count", "sum", "max", "min", "distinct"}:
            return pa.int64()
        if self.agg in {"is_new", "is_weekend"}:
            return pa.bool_()
        if self.agg in {"hour_of_day", "day_of_week"}:
            return pa.int32()
        return pa.float64()


class FeatureSpec(BaseModel):
    """An ordered, validated list of feature definitions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    features: tuple[FeatureDef, ...]

    @model_validator(mode="after")
    def _unique(self) -> FeatureSpec:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names repeat: {', '.join(dupes)}; remove the duplicate lines")
        if not names:
            raise ValueError("the spec declares no features")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> FeatureSpec:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"feature spec {path} does not exist; pass --feature-spec with a YAML file "
                            "(see transforms/feature_spec.yaml for the format)")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SpecError(f"feature spec {path} is not valid YAML: {exc}") from exc
        return cls.from_dict(raw, origin=str(path))

    @classmethod
    def from_dict(cls, raw: object, *, origin: str = "<dict>") -> FeatureSpec:
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise SpecError(f"feature spec {origin} is invalid: {describe(exc)}") from None

    @classmethod
    def default(cls) -> FeatureSpec:
        text = resources.files("finfeat.transforms").joinpath("feature_spec.yaml").read_text()
        return cls.from_dict(yaml.safe_load(text), origin="finfeat/transforms/feature_spec.yaml")

    @cached_property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def for_entity(self, entity: str) -> tuple[FeatureDef, ...]:
        return tuple(f for f in self.features if f.entity == entity)

    @property
    def entities(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.entity for f in self.features if f.entity != "event"))

    @property
    def max_window_us(self) -> int:
        """How far back in event time any feature looks (window plus label delay)."""
        return max(f.reach_us for f in self.features)

    @property
    def needs_labels(self) -> bool:
        return any(f.agg == "fraud_rate" for f in self.features)

    @cached_property
    def spec_hash(self) -> str:
        canonical = json.dumps(
            {"engine": ENGINE_VERSION, "features": [f.model_dump() for f in self.features]}, sort_keys=True
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def arrow_fields(self) -> list[pa.Field]:
        return [pa.field(f.name, f.arrow_type) for f in self.features]
