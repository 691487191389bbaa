# Two commands on a fresh Debian machine:
#   make demo   installs everything it needs and runs the simulated deployment
#   make test   runs the whole test suite
# Also: make bench (benchmarks -> bench/results.json, includes the accuracy
# report), make accuracy (docs/accuracy.md), make deps, make clean.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-stamp
DEMO_SECONDS ?= 90
DEMO_METERS ?= 3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND := noninteractive

.PHONY: deps system-packages demo test bench accuracy firmware-check clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# System packages: Mosquitto (the tests and the demo start their own broker on
# a loopback port, so the service Debian starts is not used), Node.js (the
# type checker, and the ChirpStack payload codec's tests) and systemd for its
# systemd-analyze (the tests verify the gateway's unit file and score its
# sandbox; installing the package does not make systemd the init).
system-packages:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends mosquitto >/dev/null; }
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; }
	@command -v systemd-analyze >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends systemd >/dev/null; }

# Type checking uses pyright (pinned in tools/typecheck/package-lock.json) and
# one stub folder per board: the ESP32 and RP2 stub packages ship files with
# the same names, so they cannot share one environment.
TYPECHECK_STAMP := build/stubs/.stamp
$(TYPECHECK_STAMP): $(STAMP) tools/typecheck/package-lock.json tools/typecheck/stubs-esp32.txt tools/typecheck/stubs-rp2.txt | system-packages
	npm ci --prefix tools/typecheck --no-audit --no-fund --silent
	for b in esp32 rp2; do \
	  $(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-user --only-binary :all: \
	    --require-hashes --upgrade --target build/stubs/$$b -r tools/typecheck/stubs-$$b.txt || exit 1; \
	done
	touch $@

deps: $(STAMP) system-packages $(TYPECHECK_STAMP)

demo: deps
	$(BIN)/python -m tools.demo --seconds $(DEMO_SECONDS) --meters $(DEMO_METERS)

firmware-check: deps
	$(BIN)/python -m tools.firmware_check compile
	$(BIN)/python -m tools.firmware_check typecheck

test: deps firmware-check
	$(BIN)/pytest -q

bench: deps
	$(BIN)/python -m tools.bench

# The metering accuracy report: docs/accuracy.md and docs/accuracy.png.
accuracy: deps
	$(BIN)/python -m tools.accuracy

clean:
	rm -rf build run bench/results.json bench/results.md .pytest_cache
