# StationThis core. `make run` and `make test` are the two commands; both set up what they need.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
GEN := gen
GEN_STAMP := $(GEN)/.generated-stamp
PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

export PYTHONPATH := $(CURDIR):$(CURDIR)/$(GEN)

.PHONY: venv protos run test lint bench buf clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "stationthis-core.pth").write_text("$(CURDIR)\n$(CURDIR)/$(GEN)\n")'
	@touch $@

protos: $(GEN_STAMP)

$(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos -I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		--python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) \
		--descriptor_set_out=$(GEN)/descriptors.binpb --include_source_info --include_imports $(PROTOS)
	@touch $@

run: protos
	$(PY) -m devtools.launcher

test: protos
	$(PY) -m pytest $(PYTEST_ARGS)

bench: protos
	$(PY) -m bench

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

buf: $(BUF) $(STAMP)
	rm -rf .build/third_party && mkdir -p .build/third_party/google
	cp -r "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/google/api" .build/third_party/google/api
	$(BUF) lint

lint: protos buf
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(GEN) .tools .build
