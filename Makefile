# The two commands of the README, each doing all of its set-up on a fresh machine.
#   make demo   -- the quick continual-VQA comparison of every method (one seed)
#   make test   -- the test suite
#   make gpu-check [DRY=1] -- the one-shot GPU check (benchmarks/gpu_check.py): on a GPU
#                  machine with the image's python3; DRY=1 here on the CPU at small sizes
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.aim-installed

.PHONY: demo test bench clean venv gpu-check

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml setup.py CMakeLists.txt $(shell find csrc python -type f -not -name '*.pyc')
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(PY) -m aim_kernels.continual.demo

test: $(STAMP)
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_backends.py tests/test_triton.py -k triton
	AIM_TRITON_AOT=1 $(PY) -m pytest -q tests/test_triton.py -k compile

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=mean,ops \
		--benchmark-json=$$($(PY) -c "from benchmarks.conftest import results_path; print(results_path())")

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks

# make wheel CUDA=12.4 | CUDA=13.0 | CUDA=13.2 | CUDA=cpu  -> dist/aim_kernels-<v>+cu124|+cu130|+cu132|+cpu-*manylinux*.whl
# (a CUDA version without an nvcc here gets NVIDIA's compiler from PyPI in build/)
CUDA ?= auto
.PHONY: wheel
# WHEEL_PYTHON=python3.12: the wheel for another interpreter (the GPU image's is 3.12)
WHEEL_PYTHON ?=
wheel: $(STAMP)
	$(PY) python/build_wheel.py --cuda $(CUDA) $(if $(WHEEL_PYTHON),--python $(WHEEL_PYTHON))

# On a GPU machine (no registry there): the image's python3, _C built in place if needed.
# DRY=1: the same script on this machine's CPU at small sizes (tests/test_gpu_check.py
# runs it as part of make test).
GPU_PYTHON ?= python3
gpu-check:
ifdef DRY
	$(MAKE) venv
	$(PY) benchmarks/gpu_check.py --dry
else
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py
endif
