# The two commands a newcomer types: `make up` and `make test` (`make unit`: the in-process layer alone).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEBIAN_PACKAGES := curl openssl ca-certificates etcd-server espeak-ng sox docker-compose chromium ffmpeg lame flac opus-tools
BENCH_PACKAGES := wrk nginx
COMPOSE_PACKAGES := docker.io debootstrap

.PHONY: up test test-soak unit fuzz test-vllm test-compose images bench bench-full deps bench-deps venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[cpu,test]'
	touch $@

venv: $(BIN)/.installed

# Debian packages the tests call (installed only when missing; needs root).
deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && apt-get install -y -q $$missing; fi

# Envoy + control plane + engines from the embedded default config, in the foreground.
up: venv
	$(BIN)/whisper-gateway up --run-dir .gateway-run

# Every test in tests/: the unit layer and the e2e one (real Envoy, engines, control planes, etcd, encoders).
test: deps venv
	$(BIN)/pytest -q

# The usage soak alone (engine, control plane and Envoy restarted under load; /usage against what
# the clients were served), which `make test` runs too.
test-soak: deps venv
	$(BIN)/pytest -q -m soak

# The unit layer alone: tests not marked e2e, which start no process (tests/conftest.py fails one
# that tries), the Lua filter's in-process tests (tests/test_lua_filter.py, lupa) among them.
# About 7 s on 2 cores; needs no Debian package.
unit: venv
	$(BIN)/pytest -q -m "not e2e"

# The Lua filter's parsers on a million mutated inputs each (tests/test_lua_fuzz.py; `make test`
# runs 1,000,000 and 120,000): about 100 s on 2 cores.
fuzz: deps venv
	LUA_FUZZ_CASES=1000000 $(BIN)/pytest -q --timeout 900 tests/test_lua_fuzz.py

# The gateway against real vLLM engines (CPU build, tiny checkpoint); builds them once (~2 min).
test-vllm: deps venv
	PYTHON=$(BIN)/python bash engines/vllm/setup_cpu.sh
	$(BIN)/pytest -q tests_vllm

# The images compose runs, built locally (a Debian base by debootstrap where no registry answers).
images: deps
	@missing=""; for p in $(COMPOSE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && apt-get install -y -q $$missing; fi
	bash tests_compose/dockerd.sh bash deploy/images.sh

# compose.yaml for real: dockerd (started if none runs, stopped after), the images, the compose suite.
test-compose: deps venv images
	bash tests_compose/dockerd.sh $(BIN)/pytest -q tests_compose

# The load generator and the reverse proxy the data-path benchmark compares, and plotting.
bench-deps: deps venv
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && apt-get install -y -q $$missing; fi
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install -q -e '.[cpu,test,bench]'

# Benchmarks (not tests): numbers for the docs and the release notes; results in bench/results/.
bench: bench-deps
	$(BIN)/python -m bench.datapath --quick
	$(BIN)/python -m bench.routing
	$(BIN)/python -m bench.parse_cost
	$(BIN)/python -m bench.reaction_time --trials 20

# The long versions, for docs/benchmarks.md (about an hour on 2 cores).
bench-full: bench-deps
	$(BIN)/python -m bench.datapath --full
	$(BIN)/python -m bench.routing --full
	$(BIN)/python -m bench.parse_cost
	$(BIN)/python -m bench.reaction_time --trials 20
	$(BIN)/python -m bench.cpu_engine
	$(BIN)/python -m bench.soak --seconds 120

clean:
	rm -rf $(VENV) .pytest_cache .gateway-run
