# make fit / make test: each does all set-up on a fresh machine, re-running only
# the steps whose inputs changed (one stamp file per step under .venv/).
PYTHON ?= python3
# Capped at the newest torch the project is tested with; a newer release would be
# fetched whole from the registry (several GB of CUDA packages) on every fresh machine.
TORCH_SPEC ?= torch>=2.5,<=2.14.1
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := $(VENV)/.stamps
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k conv2d -x"
PYTEST_ARGS ?=

.PHONY: fit test fuzz bench install clean gpu-check

fit: install
	$(PY) -m lightning_hw fit

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The property tests with 5,000 examples each instead of the test run's 100 (about 12 minutes on 2 cores).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_fuzz_ops.py $(PYTEST_ARGS)

# The op benchmarks and the end-to-end epoch, in float32 and under CPU autocast to bfloat16.
bench: install
	$(PY) benchmarks/bench_ops.py --markdown
	$(PY) benchmarks/bench_ops.py --autocast bfloat16 --markdown
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_train.py --precision bf16-mixed

# Every GPU step of issue 17 in one command, for a bare GPU machine (its own python3; no venv):
# benchmarks/gpu_check.sh, whose header says how to run it there and how to check it on a CPU
# (GPU_CHECK_ALLOW_CPU=1 make gpu-check). Output folder: GPU_CHECK_OUT (runs/gpu_check).
gpu-check:
	bash benchmarks/gpu_check.sh

install: $(STAMPS)/extension

$(STAMPS)/venv:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	mkdir -p $(STAMPS) && touch $@

# The torch spec is part of the stamp's name: a new TORCH_SPEC re-installs torch.
TORCH_STAMP := $(STAMPS)/torch-$(shell printf '%s' '$(TORCH_SPEC)' | md5sum | cut -c1-12)
$(TORCH_STAMP): $(STAMPS)/venv
	$(PIP) install '$(TORCH_SPEC)'
	rm -f $(STAMPS)/torch-* && touch $@

# Runtime, dev, transfer and export dependencies as pyproject.toml lists them, with the
# installed torch as a constraint: pip keeps it, and resolves torchvision to the
# release built for it (without it, pip would upgrade torch). PyPI's torchvision is a
# CUDA build that does not load with a CPU-only torch (and then breaks
# torchmetrics' imports): it is removed again, and TransferNet's tests skip.
$(STAMPS)/deps: $(TORCH_STAMP) pyproject.toml
	$(PY) -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/constraints.txt
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; e = p["optional-dependencies"]; print("\n".join(p["dependencies"] + e["dev"] + e["transfer"] + e["export"]))' > $(VENV)/requirements.txt
	$(PIP) install -r $(VENV)/requirements.txt -c $(VENV)/constraints.txt
	$(PY) -c 'import torchvision' 2>/dev/null || { echo "torchvision does not load with this torch: removed (TransferNet needs it)"; $(PIP) uninstall -y torchvision; }
	touch $@

$(STAMPS)/extension: $(STAMPS)/deps setup.py $(shell find csrc -type f 2>/dev/null)
	$(PIP) install --no-build-isolation -e '.[dev]'
	touch $@

clean:
	rm -rf build lightning_hw/_C*.so lightning_hw.egg-info
