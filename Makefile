# make run   - create .venv if needed, install, run the default experiment (task=digits optim=sgdp)
# make test  - create .venv if needed, install, run the test suite (CPU only, < 10 minutes on 2 cores)
# Extra arguments: make run ARGS="task=toy optim=sgd"   make test PYTEST_ARGS="-k optim"
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,launchers]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m projbench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench_optim.py --out results/bench_optim.md

clean:
	rm -rf outputs multirun .pytest_cache
