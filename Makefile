# Two commands on a fresh Debian machine:
#   make demo   installs everything it needs and runs the simulated deployment
#   make test   runs the whole test suite
# Also: make bench (benchmarks -> bench/results.json), make deps, make clean.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-stamp
DEMO_SECONDS ?= 90
DEMO_METERS ?= 3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND := noninteractive

.PHONY: deps mosquitto demo test bench firmware-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# Mosquitto is the one system package: the tests and the demo start their own
# broker on a loopback port, so the service Debian starts is not used.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends mosquitto >/dev/null; }

deps: $(STAMP) mosquitto

demo: deps
	$(BIN)/python -m tools.demo --seconds $(DEMO_SECONDS) --meters $(DEMO_METERS)

firmware-check: deps
	$(BIN)/python -m tools.firmware_check compile
	$(BIN)/python -m tools.firmware_check typecheck

test: deps firmware-check
	$(BIN)/pytest -q

bench: deps
	$(BIN)/python -m tools.bench

clean:
	rm -rf build run bench/results.json bench/results.md .pytest_cache
