# Two set-up commands (see README):  `make quickstart`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Data files (Tiny Shakespeare, GPT-2 BPE): ../shared/data when it exists, else the per-user cache
# (downloaded with a sha256 check where a network exists).
ifneq ($(wildcard ../shared/data/tinyshakespeare/input.txt),)
export GPT2MODEL_DATA ?= $(abspath ../shared/data)
endif
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup quickstart test test-slow test-all lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Train the seed's character-level model on Tiny Shakespeare (~10 min on a 2-core CPU), then sample.
quickstart: setup
	$(VENV)/bin/gpt2 prepare shakespeare_char --out data/shakespeare_char
	$(VENV)/bin/gpt2 train --data data/shakespeare_char --out out/shakespeare_char --config recipes/shakespeare_char_cpu.toml --overwrite
	$(VENV)/bin/gpt2 sample --model out/shakespeare_char --prompt "ROMEO:" --max-new-tokens 300 --seed 1337

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
