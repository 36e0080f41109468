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

# The Flink engine: its own venv (PyFlink's pins clash with the main install), the Kafka connector jar.
FLINK_VENV  := .venv-flink
FLINK_BIN   := $(FLINK_VENV)/bin
FLINK_STAMP := $(FLINK_VENV)/.installed
FLINK_LIB   := $(CACHE)/flink/lib
FLINK_JAR   := $(FLINK_LIB)/flink-sql-connector-kafka-5.0.0-2.2.jar
FLINK_CLUSTER_DIR := .flink/cluster


.PHONY: help setup setup-full jars prism demo stream-demo test dq bench bench-online bench-train bench-models \
        bench-stream bench-serve kafka generate clean airflow flink flink-cluster flink-cluster-stop flink-demo \
        test-flink-engine

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
	@echo "make flink        - the Flink environment (.venv-flink with PyFlink, the Kafka connector jar)"
	@echo "make flink-demo   - make stream-demo through a local Flink cluster instead of Prism"
	@echo "make flink-cluster - a local Flink cluster on 127.0.0.1 (web UI :8081); make flink-cluster-stop stops it"
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

# The same through a local Flink cluster (free ports, started and stopped by the demo) instead of Prism.
flink-demo: $(FULL) jars flink
	test -d $(WAREHOUSE)/features || $(MAKE) demo
	$(BIN)/python -m finfeat.jobs.stream_demo --warehouse $(WAREHOUSE) --engine flink

# PyFlink's own virtualenv: exactly the versions of constraints-flink.txt (a pip freeze of a working
# install), no resolution; finfeat itself without its dependencies (the shared code needs only these).
flink: $(FLINK_STAMP) $(FLINK_JAR)
$(FLINK_STAMP): constraints-flink.txt setup.py
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(FLINK_BIN)/python || $(PYTHON) -m venv $(FLINK_VENV)
	$(FLINK_BIN)/pip install --quiet --upgrade "pip==26.3"
	$(FLINK_BIN)/pip install --quiet --no-deps -r constraints-flink.txt
	$(FLINK_BIN)/pip install --quiet --no-deps -e .
	@touch $@

$(FLINK_JAR): jobs/flink/pom.xml
	@command -v mvn >/dev/null || { echo "the Flink Kafka connector is fetched with Maven (mvn); install it and retry"; exit 1; }
	mvn -B -q -f jobs/flink/pom.xml dependency:copy-dependencies -DexcludeTransitive=true -DoutputDirectory=$(CURDIR)/$(FLINK_LIB)
	@touch $@

flink-cluster: flink
	$(FLINK_BIN)/python -m finfeat.jobs.flink.cluster start --dir $(FLINK_CLUSTER_DIR) --rest-port 8081

flink-cluster-stop:
	$(FLINK_BIN)/python -m finfeat.jobs.flink.cluster stop --dir $(FLINK_CLUSTER_DIR)

# The engine's oracle tests in the Flink venv (other pyarrow, numpy, pandas): the same features there.
test-flink-engine: flink
	$(FLINK_BIN)/python -m pytest -q -p no:cacheprovider tests/test_features_oracle.py tests/test_oracle.py

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

test: $(FULL) jars prism flink airflow
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
	rm -rf $(VENV) $(AIRFLOW_VENV) $(FLINK_VENV) .flink .pytest_cache .hypothesis $(WAREHOUSE) $(WAREHOUSE)-stream $(WAREHOUSE)-flink out build *.egg-info
