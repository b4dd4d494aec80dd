# Two commands for a new user: `make demo` and `make test`. Both set themselves up.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { \
	  echo "python3 -m venv failed: on Debian run 'apt-get install -y python3-venv'"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check trolley_tasks tests workers bench testbed scripts
	$(BIN)/ruff format --check trolley_tasks tests workers bench testbed scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

demo: install
	$(BIN)/python -m scripts.demo

# make bench: the full comparison (about 10 minutes); make bench BENCH_SIZE=smoke: about 100 instances (a few minutes)
bench: install
	BENCH_SIZE=$(BENCH_SIZE) $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
