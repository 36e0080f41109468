# finfeat: `make demo` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WAREHOUSE ?= warehouse

.PHONY: help setup demo test bench generate clean

help:
	@echo "make demo   - set up, then run the backfill end to end on the bundled public data"
	@echo "make test   - set up, then run the test suite"
	@echo "make bench  - backfill of 1M generated events vs DuckDB (prints rates, ratio, peak memory)"
	@echo "make clean  - remove the virtualenv, caches and demo output"

setup: $(STAMP)

# The default install is lean (Beam, delta-rs, pyarrow); versions come from constraints.txt.
$(STAMP): setup.py constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==26.3"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

demo: $(STAMP)
	$(BIN)/finfeat demo --warehouse $(WAREHOUSE)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_backfill.py --events 1000000

generate: $(STAMP)
	$(BIN)/finfeat generate --events 1000000 --out out/generated_1m.parquet

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(WAREHOUSE) out build *.egg-info
