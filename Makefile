# make run   - create .venv if needed, install, run the default experiment (task=digits optim=sgdp)
# make test  - create .venv if needed, install, run the test suite (CPU only, < 10 minutes on 2 cores)
# make results - create .venv if needed, install, run the toy and digits sweeps afresh (CPU is enough) and
#              rebuild results/tables/{toy2d,toy3d,digits}.{md,tex,csv} and their figures in results/figures/
# make figure  - the same for the project page's ResNet18 figure on digits (results/figures/resnet18_figure_digits.png)
# make beyond  - the same for the "beyond the paper" table: every optimizer with and without the projection
#              on digits and the toy (results/tables/beyond.*, results/figures/beyond-*; 5-11 minutes on 2 CPU cores)
# Extra arguments: make run ARGS="task=toy optim=sgd"   make test PYTEST_ARGS="-k optim"
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test results figure beyond bench device-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,launchers]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m projbench $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The runs behind the committed tables, each target in its own runs directory (paths.log_dir):
# removed and redone every time. Separate directories because the digits table takes any digits
# run (its selectors accept any model), including those of the figure and beyond sweeps.
RESULTS_RUNS := outputs/results
results: $(STAMP)
	rm -rf $(RESULTS_RUNS) results/figures/toy* results/figures/digits_*
	$(BIN)/python -m projbench -m +experiment=toy paths.log_dir=$(RESULTS_RUNS)
	$(BIN)/python -m projbench -m +experiment=digits logger=none trainer.progress=false hydra/launcher=basic \
		paths.log_dir=$(RESULTS_RUNS)
	$(BIN)/python -m projbench.tables --runs $(RESULTS_RUNS) --table toy2d toy3d digits --format md latex csv --out results

# The project page's ResNet18 figure, on digits (results/figures/resnet18_figure_digits.png).
FIGURE_RUNS := outputs/results_figure
figure: $(STAMP)
	rm -rf $(FIGURE_RUNS) results/figures/resnet18_figure_digits*
	$(BIN)/python -m projbench -m +experiment=resnet18_figure_digits trainer.progress=false hydra/launcher=basic \
		paths.log_dir=$(FIGURE_RUNS)
	$(BIN)/python -m projbench.tables --runs $(FIGURE_RUNS) --table resnet18_figure_digits --format md --out results

# Its figures are the table's own (results/paper.yaml `figure:`).
BEYOND_RUNS := outputs/results_beyond
beyond: $(STAMP)
	rm -rf $(BEYOND_RUNS) results/figures/beyond-*
	$(BIN)/python -m projbench -m +experiment=beyond hydra/launcher=basic paths.log_dir=$(BEYOND_RUNS)
	$(BIN)/python -m projbench.tables --runs $(BEYOND_RUNS) --table beyond --format md latex csv --out results

bench: $(STAMP)
	$(BIN)/python scripts/bench_optim.py --rounds 30 --out results/bench_optim.md

# Wheels that scripts/device_checks.sh installs on a GPU machine whose image lacks them (pure
# Python: they install under any Python 3 there). Versions: those of this venv.
DEVICE_WHEELS := adamp|hydra-core|omegaconf|antlr4-python3-runtime
device-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip wheel --quiet --no-deps -w .whl $$($(BIN)/python -m pip list --format=freeze 2>/dev/null \
		| grep -iE '^($(DEVICE_WHEELS))==')
	ls .whl

clean:
	rm -rf outputs multirun .pytest_cache
