"""Readable messages from configuration validation errors."""
from __future__ import annotations

from pydantic import ValidationError


def describe(exc: ValidationError) -> str:
    """``fields.amount.scale: Input should be less than or equal to 6; ...``"""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'top level'}: {err['msg']}" for err in exc.errors())
