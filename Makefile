# finfeat: `make demo` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FULL   := $(VENV)/.installed-full
CACHE  := .cache
PRISM  := $(CACHE)/prism/bin/prism
BEAM_VERSION := 2.77.0
WAREHOUSE ?= warehouse
# Airflow lives in its own virtualenv with its own pins, so its dependencies never reach the lean install.
AIRFLOW_VENV    := .venv-airflow
AIRFLOW_STAMP   := $(AIRFLOW_VENV)/.installed
AIRFLOW_VERSION := 3.3.2

.PHONY: help setup setup-full jars prism demo stream-demo test dq bench bench-online bench-train bench-models \
        bench-stream bench-serve kafka generate clean airflow

help:
	@echo "prerequisites: Python 3.11 for make demo and make setup-full; make test and make stream-demo also need"
	@echo "               Go (builds Prism), a JDK 17+ and Maven (Kafka, Spark jars) and redis-server"
	@echo "make demo         - set up, then run the backfill end to end on the bundled public data"
	@echo "make setup-full   - install every extra (train, score, serve, stream, spark, online) into .venv"
	@echo "make test         - set up everything the tests need (Spark, Kafka, Prism), then run them"
	@echo "make stream-demo  - the stream job on a local Kafka broker and Prism, checked against the demo"
	@echo "make airflow      - Apache Airflow $(AIRFLOW_VERSION) with finfeat in $(AIRFLOW_VENV) (the DAG's own environment)"
	@echo "make dq           - data-quality checks of the demo output (exit 1 on failure)"
	@echo "make kafka        - a local Kafka broker on 127.0.0.1:19092 (Ctrl-C stops it)"
	@echo "make bench        - backfill of 1M generated events vs DuckDB"
	@echo "make bench-serve  - load test of finfeat serve (concurrent HTTP clients)"
	@echo "make bench-models - tuned vs default xgboost vs logistic baseline on generated data, scoring latency"
	@echo "make clean        - remove the virtualenv, caches and demo output"
	@echo "finfeat on the PATH: . .venv/bin/activate   (or run .venv/bin/finfeat)"

setup: $(STAMP)

# The default install is lean: Beam, delta-rs, pyarrow, GX. Versions come from constraints.txt.
$(STAMP): setup.py constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==26.3"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

# Heavy parts only for the targets that need them: Spark + xgboost, the JVM jars, Prism.
setup-full: $(FULL)
$(FULL): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,online,train,spark,stream,serve]"
	@touch $@

jars: $(FULL)
	bash jobs/spark/fetch_jars.sh
	$(BIN)/python -m finfeat.jobs.kafka.broker fetch

# Prism, Beam's local portable runner, built for the pinned Beam version with `go install`.
prism: $(PRISM)
$(PRISM):
	@command -v go >/dev/null || { echo "Prism needs Go (https://go.dev); install it and retry"; exit 1; }
	GOBIN=$(CURDIR)/$(CACHE)/prism/bin go install github.com/apache/beam/sdks/v2/go/cmd/prism@v$(BEAM_VERSION)

demo: $(STAMP)
	$(BIN)/finfeat demo --warehouse $(WAREHOUSE)

# Apache Airflow and finfeat in a virtualenv of their own, pinned by constraints-airflow.txt.
airflow: $(AIRFLOW_STAMP)
$(AIRFLOW_STAMP): setup.py constraints-airflow.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install --quiet --upgrade "pip==26.3"
	$(AIRFLOW_VENV)/bin/pip install --quiet -c constraints-airflow.txt "apache-airflow==$(AIRFLOW_VERSION)" -e ".[online]"
	@touch $@

test: $(FULL) jars prism airflow
	$(BIN)/python -m pytest -q tests

dq: $(STAMP)
	test -d $(WAREHOUSE)/features || $(MAKE) demo
	$(BIN)/finfeat validate --table $(WAREHOUSE)/features --suite features --docs out/dq

kafka: jars
	$(BIN)/python -m finfeat.jobs.kafka.broker run --port 19092 --controller-port 19093

# The stream job end to end: a local Kafka broker, Prism, an online store; checked against the demo's backfill.
stream-demo: $(FULL) jars prism
	test -d $(WAREHOUSE)/features || $(MAKE) demo
	$(BIN)/python -m finfeat.jobs.stream_demo --warehouse $(WAREHOUSE)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_backfill.py --events 1000000

bench-online: $(FULL)
	$(BIN)/python benchmarks/bench_online.py

bench-serve: $(FULL)
	$(BIN)/python benchmarks/bench_serve.py

bench-train: $(FULL) jars
	$(BIN)/python benchmarks/bench_train.py

bench-models: $(FULL)
	$(BIN)/python benchmarks/bench_models.py

bench-stream: $(FULL) jars prism
	$(BIN)/python benchmarks/bench_stream.py

generate: $(STAMP)
	$(BIN)/finfeat generate --events 1000000 --out out/generated_1m.parquet

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) .pytest_cache .hypothesis $(WAREHOUSE) $(WAREHOUSE)-stream out build *.egg-info
