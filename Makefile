# Two entry points for a newcomer: `make test` and `make demo`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.croc-installed
INSTALL_DEPS := setup.py pyproject.toml scripts/setup_env.sh $(wildcard csrc/*)

.PHONY: setup test test-multiprocess lint format demo clean

setup: $(STAMP)

$(STAMP): $(INSTALL_DEPS)
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -q -m "not multiprocess and not wheel"  # wheel: its own .ci/run step

test-multiprocess: $(STAMP)  # torchrun with 2 CPU processes: ZeRO-2/3, sequence parallelism, faults (~8 min)
	$(PY) -m pytest -q -m multiprocess

demo: $(STAMP)
	$(VENV)/bin/croc demo

clean:
	rm -rf build *.egg-info croc/_C*.so runs/demo
