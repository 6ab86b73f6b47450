# Two commands do all the set-up: `make demo` and `make test`.
# Torch is installed first and pinned so pip never pulls a CUDA build on a CPU machine;
# on a GPU machine override it, e.g. `make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR    ?= demo-run
FAMILY      ?= ace-step-1.5
# ACE-Step v1's lyric vocab.json (upstream's acestep/models/lyrics_utils/vocab.json); default: an installed ACE-Step's
LYRICS_VOCAB ?=
BIN         := $(VENV)/bin
PIP         := $(BIN)/python -m pip

export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu

.PHONY: demo test install install-v1 install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.installed

# ACE-Step v1's lyric tokenizer needs its language packages (the `v1` extra)
$(VENV)/.installed-v1: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e ".[v1]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-v1: $(VENV)/.installed-v1
install-test: $(VENV)/.installed-test

demo: install $(if $(filter ace-step-v1,$(FAMILY)),install-v1)
	$(BIN)/python -m acestep_dist.demo --out $(DEMO_DIR) --family $(FAMILY) $(if $(LYRICS_VOCAB),--lyrics-vocab $(LYRICS_VOCAB))

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
