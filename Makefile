# kvcal: `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvcal-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install test demo bench proto clean

install: $(STAMP)

# Re-installs only when the dependency files change: quick when already done.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest

demo: install
	bash scripts/demo.sh

bench: install
	$(BIN)/python scripts/bench.py

proto: install
	$(BIN)/python -m grpc_tools.protoc -Isrc --python_out=src src/kvcal/proto/*.proto

clean:
	rm -rf $(VENV) demo_out .pytest_cache
