"""Composite Beam transforms (source-agnostic); importing this package registers the Arrow IPC
pickler (:mod:`finfeat.schemas.arrow_pickle`), so every job and worker that runs them has it."""
from finfeat.schemas import arrow_pickle as _arrow_pickle  # noqa: F401
