"""Canonical record kinds of finfeat: transaction events, feature rows, dead letters."""
from __future__ import annotations

SCHEMA_VERSION = "1.0.0"
