# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-deps bench-quick docker-smoke clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Peers for bench/ (sentence-transformers, setfit, ...); not needed by the tests.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'

bench-quick: bench-deps
	$(PY) bench/probe.py --quick
	$(PY) bench/pretrain_speed.py --quick
	$(PY) bench/accuracy.py --quick
	$(PY) bench/finetune_speed.py --quick
	$(PY) bench/compress.py --quick
	$(PY) bench/serve.py --quick

# Build deploy/Dockerfile and check the image end to end (needs a Docker engine and `make demo`'s model;
# SMOKE_ARGS for closed networks, see docs/deploy.md).
docker-smoke: $(STAMP)
	$(PY) deploy/docker_smoke.py $(SMOKE_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
