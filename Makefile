# `make test` and `make demo` set everything up on a fresh machine (Python 3.11, make, apt).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Headless OpenGL for MuJoCo (MUJOCO_GL=osmesa), Qt 5 for Procgen (envpool).
APT_PACKAGES := libosmesa6 libgl1 libglfw3 libqt5gui5
# MuJoCo renders headless through OSMesa unless told otherwise (e.g. MUJOCO_GL=egl on a GPU).
export MUJOCO_GL ?= osmesa
PYTEST_FLAGS ?=

.PHONY: test test-slow demo install system-deps lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || { echo "apt-get install failed for:" $$missing; exit 1; }; \
	else \
	  echo "warning: missing Debian packages:" $$missing; \
	  echo "  install them with: sudo apt-get install" $$missing "(MuJoCo rendering, Procgen)"; \
	fi

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_FLAGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_FLAGS)

# The quickstart: a small sweep (toy-grid transfer with 5 seeds, a short real-Crafter leg),
# then its report (results/quickstart/report.md, CSVs and plots). 42 trials; see the README for
# the measured time. `mbxfer demo` runs `mbxfer sweep benchmarks/configs/quickstart.yaml --out
# results/quickstart`, then (if every trial finished) `mbxfer report results/quickstart`.
demo: $(STAMP)
	$(VENV)/bin/mbxfer demo

lint: $(STAMP)
	$(PY) -m ruff check mbxfer agents envs exploration benchmarks tests
	$(PY) -m ruff format --check mbxfer agents envs exploration benchmarks tests

format: $(STAMP)
	$(PY) -m ruff format mbxfer agents envs exploration benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info
