# Set-up is part of every target: a fresh clone needs only `make test` or `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The pinned pair `make` installs; pyproject.toml declares ranges for users.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: install demo test typecheck bench-engine gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_PINS)
	$(PIP) install -q --disable-pip-version-check -e '.[test,peers]'
	@touch $(STAMP)

# The main job on the embedded default. Until the harness lands, that is the engine
# benchmark: plain model vs GPipe vs torchgpipe, and the pipeline over virtual CPU devices.
demo: $(STAMP)
	$(PY) -m gpipe_bench.bench.engine --quiet

test: $(STAMP)
	$(PY) -m pytest -q

typecheck: $(STAMP)
	$(PY) -m mypy

# The engine's CPU benchmark (plain model, our GPipe, torchgpipe 0.0.7, two virtual CPU devices).
bench-engine: $(STAMP)
	$(PY) -m gpipe_bench.bench.engine

# Everything a lent GPU machine should check, in one call: CUDA tests and a short timing.
gpu-check: $(STAMP)
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)"
	$(PY) -m pytest -q -m cuda
	$(PY) -m gpipe_bench.bench.engine --device cuda

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .hypothesis
