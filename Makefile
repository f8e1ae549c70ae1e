# onehop — the single entry point. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU machines pin the CPU torch wheel; GPU users: `make install CONSTRAINTS=` and bring your torch.
CONSTRAINTS ?= constraints-cpu.txt
PROTO_SRC := $(wildcard protos/inference/*.proto protos/onehop/v1/*.proto)

.DEFAULT_GOAL := help
.PHONY: help install protos protos-check test test-e2e lint demo up bench
.PHONY: images k8s-validate
.PHONY: reliability

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install onehop with its dev tools

protos: $(VENV)/.installed  ## regenerate protos/**/_pb2*.py(i) from the .proto files
	PATH="$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --mypy_out=. \
	    --mypy_grpc_out=. $(PROTO_SRC)

test: install  ## run the test suite (unit, service, end to end)
	@# pytest exits 5 when it collected no tests: that is not a failure of the suite.
	$(PY) -m pytest -q -p no:cacheprovider || [ $$? -eq 5 ]

lint: install  ## ruff and mypy over the hand-written code
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy onehop cache_service shard_service trainer_service gateway

up: install  ## start the mesh in the foreground (Ctrl-C stops it)
	$(VENV)/bin/onehop up

demo: install  ## the main job: ingest, train, predict twice, report
	$(VENV)/bin/onehop demo

# The whole reliability suite (faults, hostile input, soak) at full length; `make test` runs
# its bounded subset. Prints the table and writes artifacts/reliability.json.
reliability: install  ## run the full reliability suite and write artifacts/reliability.json
	ONEHOP_RELIABILITY=full $(PY) -m pytest -q -p no:cacheprovider -m reliability tests/reliability

images: install  ## build the container image (docker, else podman; deploy/build-images.sh)
	deploy/build-images.sh

k8s-validate: install  ## render every deploy/k8s overlay, validate offline and check policy
	deploy/k8s/validate.sh

# `make bench BENCH_ARGS=--quick` for the two-minute smoke run.
BENCH_ARGS ?=
bench: install  ## the measured report: table, docs/bench/ (JSON, plots, the README's section)
	$(VENV)/bin/onehop bench $(BENCH_ARGS) --json docs/bench/report.json --plots docs/bench \
	    --markdown docs/bench/performance.md
