# Every target CI uses. `make test` is the README's test command; `make demo` its demo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench reliability chaos clean

# The package alone (what `make demo` needs, as a user's `pip install -e .` has), then the
# test extra on top for the targets that run tests.
PACKAGE_STAMP := $(VENV)/.installed-package

$(PACKAGE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(PACKAGE_STAMP)

$(STAMP): $(PACKAGE_STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(PACKAGE_STAMP)
	$(BIN)/deltaflush demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check producer workers tests bench
	$(BIN)/mypy producer workers

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench --out bench/results
	$(BIN)/python -m bench.scheduling

# The fault and chaos tests, recorded into docs/reliability.md. `make chaos` is the same at
# ten times the rows and rounds.
RELIABILITY_TESTS := tests/test_fleet.py tests/test_outages.py tests/test_chaos.py \
	tests/test_flusher.py tests/test_producer.py tests/test_evolution.py tests/test_fuzz.py \
	tests/test_layout.py tests/test_lake_fleet.py tests/test_iceberg.py tests/test_maintenance.py \
	tests/test_catalogs.py tests/test_delta.py tests/test_delta_maintenance.py \
	tests/test_delta_fleet.py tests/test_delta_s3.py tests/test_shards_fleet.py \
	tests/test_shards_cluster.py tests/test_cluster_failover.py tests/test_cluster_fleet.py \
	tests/test_read_fleet.py tests/test_batcher.py tests/test_aio.py tests/test_rest_catalog.py \
	tests/test_aio_shards.py tests/test_aio_shards_cluster.py
reliability: $(STAMP)
	rm -f .reliability.jsonl
	DELTAFLUSH_RELIABILITY_LOG=.reliability.jsonl $(BIN)/python -m pytest -q $(RELIABILITY_TESTS)
	$(BIN)/python -m bench.reliability .reliability.jsonl "make reliability" > docs/reliability.md

chaos: $(STAMP)
	rm -f .reliability.jsonl
	DELTAFLUSH_CHAOS_SCALE=10 DELTAFLUSH_RELIABILITY_LOG=.reliability.jsonl \
		$(BIN)/python -m pytest -q $(RELIABILITY_TESTS)
	$(BIN)/python -m bench.reliability .reliability.jsonl "make chaos" > docs/reliability.md

clean:
	rm -rf $(VENV) data .pytest_cache
