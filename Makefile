# Set-up is part of every target: a fresh clone needs only `make test` or `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The pinned pair `make` installs; pyproject.toml declares ranges for users.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: install data readme demo demo-distributed resnet101-speed resnet101-accuracy amoebanetd-speed amoebanetd-memory tables compare test lint typecheck bench-engine gpu-check clean

install: $(STAMP)

# VENV=DIR puts the environment elsewhere; make creates it there. An existing one that make did not create
# (no stamp) is refused: installing the pins would replace the torch it holds.
$(STAMP): pyproject.toml Makefile
	@if [ -e $(VENV) ] && [ ! -e $(STAMP) ] && [ "$(VENV)" != .venv ]; then \
	  echo "VENV=$(VENV) exists and was not made by make: installing here would replace its torch with $(TORCH_PINS);" \
	    "name a new directory (make creates it), or run pip install -e . inside that environment"; exit 2; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_PINS)
	$(PIP) install -q --disable-pip-version-check -e '.[test,peers,plot]'
	@if [ ! -d $(FASHION) ] && [ "$$(id -u)" = 0 ]; then \
	  { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } >/dev/null 2>&1 || \
	  echo "note: could not install dataset-fashion-mnist; the accuracy table needs it (make data)"; fi
	@touch $(STAMP)

# Fashion-MNIST for the accuracy table: Debian's package (root), or say how to get it.
FASHION := /usr/share/datasets/fashion-mnist
data:
	@if [ -d $(FASHION) ]; then echo "Fashion-MNIST: $(FASHION)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	else echo "Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist, or pass --data DIR (the four IDX files)"; exit 2; fi

# The accuracy table, quick profile: Fashion-MNIST, data-parallel processes vs pipeline rows.
resnet101-accuracy: $(STAMP) data
	$(VENV)/bin/gpipe-bench accuracy resnet101

# The main job on the embedded default: the ResNet-101 speed table, quick profile, on
# virtual CPU devices, printed beside the published table (a few minutes on 2 cores).
CPU8 := cpu:0,cpu:1,cpu:2,cpu:3,cpu:4,cpu:5,cpu:6,cpu:7
demo: $(STAMP)
	$(VENV)/bin/gpipe-bench speed resnet101 --profile quick --devices $(CPU8)

# The quick ResNet-101 speed rows on torch.distributed.pipelining on two CPU processes:
# naive-2 and pipeline-2 (one stage per process), pipeline-4 and pipeline-8 interleaved
# (2 and 4 stages per process), then the plain model in one process on all cores beside
# them; under 5 minutes on 2 cores.
demo-distributed: $(STAMP)
	$(VENV)/bin/gpipe-bench launch --nproc 2 -- speed resnet101 --engine distributed --profile quick
	$(VENV)/bin/gpipe-bench launch --nproc 2 -- speed resnet101 --engine distributed --schedule interleaved --profile quick
	$(VENV)/bin/gpipe-bench speed resnet101 --naive 1 --profile quick --devices cpu

# The published tables at their published sizes: made for a machine with 8 GPUs.
resnet101-speed: $(STAMP)
	$(VENV)/bin/gpipe-bench speed resnet101 --profile published

amoebanetd-speed: $(STAMP)
	$(VENV)/bin/gpipe-bench speed amoebanetd --profile published

# The AmoebaNet-D memory table: every row measured and predicted at this machine's profile
# (quick without CUDA), per device too, and a PNG beside the results. Without CUDA, the
# published rows are also sized from the meta device alone (--predict-only).
amoebanetd-memory: $(STAMP)
	$(VENV)/bin/gpipe-bench memory amoebanetd --per-device
	@if ! $(PY) -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then \
	  echo "No CUDA device: sizing the published rows from the meta device (nothing is run)"; \
	  $(VENV)/bin/gpipe-bench memory amoebanetd --profile published --predict-only --per-device --quiet; fi

# Saved results as tables, and against the published numbers.
tables: $(STAMP)
	@for t in resnet101-speed amoebanetd-speed amoebanetd-memory resnet101-accuracy; do $(VENV)/bin/gpipe-bench table $$t; echo; done

compare: $(STAMP)
	$(VENV)/bin/gpipe-bench compare

test: $(STAMP)
	$(PY) -m pytest -q

# README.md's sample outputs, run again and written into their blocks (scripts/readme.py says which and how;
# tests/scripts/test_readme.py fails on a stale one). Nothing is measured: under a minute.
readme: $(STAMP)
	$(PY) scripts/readme.py

typecheck: $(STAMP)
	$(PY) -m mypy

# ruff (lint and format) and mypy --strict over the package, its tests, benchmarks/ and scripts/; .ci/run runs it.
lint: $(STAMP)
	$(VENV)/bin/ruff check gpipe_bench tests benchmarks scripts
	$(VENV)/bin/ruff format --check gpipe_bench tests benchmarks scripts
	$(PY) -m mypy

# The engine's CPU benchmark (plain model, our GPipe, torchgpipe 0.0.7, two virtual CPU devices),
# then the host-bound suite (369 tiny layers, 32 micro-batches of 2, 8 partitions on one device).
bench-engine: $(STAMP)
	$(PY) benchmarks/engine.py

# Everything a lent GPU machine should check (benchmarks/gpu_check.py lists the steps), in one
# call that installs nothing: the Python on PATH (override with PY=...), the package from this
# tree, a cap on every step, one screen of results at the end; the steps' logs and the summary
# go to GPU_CHECK_OUT=DIR, else $OUT, else a new temporary folder. Under 8 minutes on one GPU:
# the check keeps to 450 s from its start and then stops what runs (SIGTERM, 5 s, SIGKILL);
# the timeout is the backstop, and its SIGTERM still gets the summary so far (SIGKILL 10 s
# later). Without CUDA it exits 2 at once.
gpu-check: PY = python3
gpu-check:
	PYTHONPATH=. timeout -k 10 470 $(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
