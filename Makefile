# The two commands of the README: `make demo` (the quickstart run) and `make test` (the test suite).
# Both create or reuse the virtual environment in .venv: the CPU build of torch on machines without an
# NVIDIA GPU, the default (CUDA) build where `nvidia-smi` sees one.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.memft-installed

.PHONY: demo test bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(VENV)/bin/python -m pip install -q "torch>=2.4"; \
	else \
		$(VENV)/bin/python -m pip install -q torch==2.13.0; \
	fi
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memft finetune quickstart --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15 tests

bench: $(STAMP)
	for script in bench/*.py; do $(VENV)/bin/python $$script || exit 1; done
