# Two entry points for a new user: `make demo` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tests.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# mypy needs the `sfs` package layout, which setuptools builds from the three folders:
# mirror it with symlinks in .mypy-root.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -rf .mypy-root && mkdir -p .mypy-root/sfs
	for part in common broker peer; do ln -s ../../$$part .mypy-root/sfs/$$part; done
	cd .mypy-root && ../$(VENV)/bin/mypy --config-file ../pyproject.toml \
		--namespace-packages --explicit-package-bases -p sfs

# sfs against scp and magic-wormhole on loopback, folders, the broker and search, written
# to bench/results.md: `make bench`, `make bench SIZE=4GiB`, BENCH_ARGS='--rounds 5'.
# Installs what the anchors need on first use: openssh-server (apt-get), and magic-wormhole
# with its mailbox and relay from PyPI into .venv/bench/wormhole.
.PHONY: bench
bench: $(STAMP)
	$(PY) -m bench $(if $(SIZE),--size $(SIZE)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .mypy-root var

# The broker's section alone: lookups and searches against the echo server, SQLite and
# PostgreSQL, one and two brokers (`make bench-broker BENCH_ARGS='--seconds 5'`).
.PHONY: bench-broker
bench-broker: $(STAMP)
	$(PY) -m bench.broker_load $(BENCH_ARGS)
