"""What may be copied out of a raw record, and the card-number pattern masked wherever text is.

Redaction is by construction: dead letters and outputs copy only the columns a mapping declares
safe (the ones it maps onto event fields, the card number excepted: it becomes its token), and
every piece of text copied into a dead letter goes through :func:`mask_card_numbers`.

A *card-number-like* value is a run of 12 to 19 digits, either contiguous or grouped the way
cards are printed (groups of four, or 4-6-4/4-6-5), separated by single spaces or dashes, touching
no other letter or digit (so that a hexadecimal id or token with a long stretch of digits is
not taken for a card). Luhn validity is not required: masking a number that is not a card
costs a dead letter a detail, keeping a card number leaks it. In the id columns that reach the
feature table (txn id, merchant id and category, card token) a value holding such a run is a
``card_number_in_field`` dead letter, unless the mapping marks the column ``numeric_ids: true``.
"""
from __future__ import annotations

import json
import re

#: The pattern without its boundaries (the same text in Python ``re`` and RE2 syntax).
CARD_RUN = (r"[0-9]{12,19}"
            r"|[0-9]{4}(?:[ -][0-9]{4}){2,3}(?:[ -][0-9]{1,3})?"
            r"|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5}")
#: Arrow (RE2, no look-around) test of an id column: a run that touches no letter or digit.
CARD_IN_ID_RE2 = rf"(?:^|[^0-9A-Za-z])(?:{CARD_RUN})(?:[^0-9A-Za-z]|$)"

_RUN = re.compile(rf"(?<![0-9A-Za-z])(?:{CARD_RUN})(?![0-9A-Za-z])")
CARD_MASK = "<card-number>"
#: Longest piece of one field copied into a dead letter's detail.
MAX_SHOWN_CHARS = 200
#: Longest dead-letter payload kept (characters).
MAX_PAYLOAD_CHARS = 4000


def mask_card_numbers(text: str) -> str:
    """``text`` with every card-number-like run replaced by ``<card-number>``."""
    return _RUN.sub(CARD_MASK, text) if text else text


def looks_like_card_number(value: str) -> bool:
    """An id that holds a card-number-like run touching no letter or digit."""
    return bool(_RUN.search(value))


def shown(value: object) -> str:
    """A field value as quoted in a dead letter's detail: masked, and cut to a few hundred chars."""
    text = repr(value)
    if len(text) > MAX_SHOWN_CHARS:
        text = f"{text[:MAX_SHOWN_CHARS]}... ({len(text):,} chars)"
    return mask_card_numbers(text)


def opaque_payload(*, chars: int, card_tokens: list[str] | None = None, **facts: object) -> str:
    """The payload of a record whose fields cannot be told apart (wrong field count, not JSON,
    invalid UTF-8): no value of it, only its size, the tokens of the card-number-like runs it
    held (so the card can still be found) and the given facts."""
    body: dict[str, object] = {"unreadable_record": True, "chars": chars, **facts}
    if card_tokens:
        body["card_tokens"] = card_tokens
    return json.dumps(body, sort_keys=True)


def card_runs(text: str) -> list[str]:
    """The digits of every card-number-like run in ``text`` (separators removed)."""
    return [re.sub(r"[ -]", "", m.group(0)) for m in _RUN.finditer(text)]
