"""The declarative column mapping: how a user's file becomes canonical events.

A mapping is a small YAML file (see ``jobs/mappings/sparkov.yaml`` and the README section
"Mapping your own data"). It is validated when it is loaded, so a broken mapping fails
before any data is read, with a message that names the offending key.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finfeat.schemas.currencies import ISO_4217
from finfeat.schemas.errors import describe
from finfeat.schemas.events import CHANNELS

Format = Literal["csv", "jsonl", "parquet"]


class MappingError(ValueError):
    """A mapping file is missing, unreadable or invalid; the message says how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColumnField(_Strict):
    column: str


class IdField(ColumnField):
    """A text column that reaches the feature table. A value holding a card-number-like run
    (see :mod:`finfeat.schemas.redaction`) is refused as a dead letter, unless ``numeric_ids``
    says the column's values are long numbers by design (e.g. 15-digit merchant ids)."""

    numeric_ids: bool = False


class OptionalColumnField(_Strict):
    column: str | None = None
    constant: str | None = None

    @model_validator(mode="after")
    def _one(self) -> OptionalColumnField:
        if (self.column is None) == (self.constant is None):
            raise ValueError("give exactly one of 'column' or 'constant'")
        return self


class AmountField(_Strict):
    column: str
    scale: int = Field(default=0, ge=0, le=6, description="decimal digits: minor units = value * 10**scale")


class CurrencyField(OptionalColumnField):
    @field_validator("constant")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and v not in ISO_4217:
            raise ValueError(f"{v!r} is not an ISO-4217 currency code (e.g. USD, EUR, GBP)")
        return v


class EventTimeField(_Strict):
    column: str
    format: str = Field(default="iso8601", description="iso8601, epoch_s, epoch_ms, epoch_us or a strptime format")
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)") from None
        return v


class ChannelField(_Strict):
    column: str | None = None
    constant: str | None = None
    map: dict[str, str] = Field(default_factory=dict, description="exact source value -> channel")
    suffix_map: dict[str, str] = Field(default_factory=dict, description="source value suffix -> channel")
    default: str = "unknown"

    @model_validator(mode="after")
    def _channels(self) -> ChannelField:
        if (self.column is None) == (self.constant is None):
            raise ValueError("give exactly one of 'column' or 'constant'")
        used = [self.default, *self.map.values(), *self.suffix_map.values()]
        if self.constant is not None:
            used.append(self.constant)
        bad = sorted({c for c in used if c not in CHANNELS})
        if bad:
            raise ValueError(f"unknown channel(s) {bad}; use one of {list(CHANNELS)}")
        return self


class LabelField(_Strict):
    column: str
    true_values: list[str] = Field(default_factory=lambda: ["1", "true", "True", "TRUE"])
    false_values: list[str] = Field(default_factory=lambda: ["0", "false", "False", "FALSE"])


class CsvOptions(_Strict):
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quotechar: str = Field(default='"', min_length=1, max_length=1)


class Fields(_Strict):
    txn_id: IdField
    card_number: ColumnField | None = None
    card_token: IdField | None = None
    merchant_id: IdField
    merchant_category: IdField | None = None
    amount: AmountField
    currency: CurrencyField
    event_time: EventTimeField
    channel: ChannelField | None = None
    card_lat: ColumnField | None = None
    card_lon: ColumnField | None = None
    merchant_lat: ColumnField | None = None
    merchant_lon: ColumnField | None = None
    is_fraud: LabelField | None = None

    @model_validator(mode="after")
    def _card(self) -> Fields:
        if (self.card_number is None) == (self.card_token is None):
            raise ValueError("map exactly one of 'card_number' (raw, tokenized on ingest) or 'card_token' "
                             "(already tokenized upstream)")
        return self


class Mapping(_Strict):
    format: Format | None = None
    csv: CsvOptions = CsvOptions()
    fields: Fields
    pii_columns: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _pii_not_mapped(self) -> Mapping:
        pii = set(self.pii_columns)
        card = self.fields.card_number.column if self.fields.card_number is not None else None
        for name in Fields.model_fields:
            spec = getattr(self.fields, name)
            col = getattr(spec, "column", None) if spec is not None else None
            if col is not None and col in pii and col != card:
                raise ValueError(
                    f"column {col!r} is listed in pii_columns and mapped onto fields.{name}, which is written "
                    "to the feature table: personal data is never written; map another column, or remove "
                    f"{col!r} from pii_columns if it holds no personal data")
        return self

    def source_columns(self) -> list[str]:
        """Every source column the mapping reads."""
        cols: list[str] = []
        for name in Fields.model_fields:
            spec = getattr(self.fields, name)
            col = getattr(spec, "column", None) if spec is not None else None
            if col and col not in cols:
                cols.append(col)
        return cols

    def redacted_columns(self) -> set[str]:
        cols = set(self.pii_columns)
        if self.fields.card_number is not None:
            cols.add(self.fields.card_number.column)
        return cols

    def safe_columns(self) -> list[str]:
        """The only source columns ever copied out of a raw record (into dead-letter payloads):
        those mapped onto event fields, the raw card number excepted (it is copied as its token)."""
        hidden = self.redacted_columns()
        return [c for c in self.source_columns() if c not in hidden]

    def id_columns(self) -> dict[str, IdField]:
        """Mapped text columns that reach the feature table, by event field name."""
        f = self.fields
        return {name: spec for name, spec in (("txn_id", f.txn_id), ("card_token", f.card_token),
                                              ("merchant_id", f.merchant_id),
                                              ("merchant_category", f.merchant_category)) if spec is not None}

    def format_for(self, path: str | Path) -> Format:
        if self.format:
            return self.format
        suffix = Path(path).suffix.lower()
        known: dict[str, Format] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
                                    ".parquet": "parquet", ".pq": "parquet"}
        if suffix not in known:
            raise MappingError(f"cannot tell the format of {path}: name it .csv, .jsonl or .parquet, "
                               "or set 'format:' in the mapping")
        return known[suffix]

    @classmethod
    def load(cls, path: str | Path) -> Mapping:
        """A mapping from a YAML file, or a built-in one by name (``sparkov``, ``generated``)."""
        text = _read_mapping_text(path)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MappingError(f"mapping {path} is not valid YAML: {exc}") from None
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise MappingError(f"mapping {path} is invalid: {describe(exc)}") from None


BUILTIN_MAPPINGS = ("sparkov", "generated", "canonical")


def _read_mapping_text(path: str | Path) -> str:
    if str(path) in BUILTIN_MAPPINGS:
        return resources.files("finfeat.jobs").joinpath("mappings", f"{path}.yaml").read_text()
    p = Path(path)
    if not p.is_file():
        raise MappingError(f"mapping file {p} does not exist; pass --mapping with a YAML file or one of the "
                           f"built-in names {', '.join(BUILTIN_MAPPINGS)}")
    return p.read_text()
