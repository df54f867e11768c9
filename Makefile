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

.PHONY: setup quickstart test test-slow test-soak test-all lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Train a character-level GPT on Tiny Shakespeare, then sample from it: on a CUDA GPU nanoGPT's
# shakespeare_char recipe (the seed's 6 x 384 model), elsewhere a CPU recipe sized to finish in
# under 5 minutes on 2 cores. Another recipe: make quickstart RECIPE=recipes/shakespeare_char_cpu.toml
RECIPE ?=
quickstart: setup
	$(VENV)/bin/gpt2 prepare shakespeare_char --out data/shakespeare_char --quiet
	@recipe="$(RECIPE)"; \
	if [ -z "$$recipe" ]; then \
	  if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	    recipe=recipes/shakespeare_char_gpu.toml; else recipe=recipes/shakespeare_char_cpu_quick.toml; fi; \
	fi; \
	echo "recipe: $$recipe"; \
	$(VENV)/bin/gpt2 train --data data/shakespeare_char --out out/shakespeare_char --config $$recipe --overwrite
	$(VENV)/bin/gpt2 sample --model out/shakespeare_char/best --prompt "ROMEO:" --max-new-tokens 300 --seed 1337

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# The serving soak test: 64 concurrent clients for 60 s with disconnects and malformed requests.
test-soak: setup
	$(PY) -m pytest -q -m slow tests/test_server_soak.py

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/run.py
	$(PY) bench/bench_serve.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
