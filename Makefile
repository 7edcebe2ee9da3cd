# The two commands of the README, each doing all of its set-up on a fresh machine.
#   make demo   -- the quick continual-VQA comparison of naive, mm-ewc, aim, joint (one seed, 2 jobs)
#   make test   -- the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.aim-installed

.PHONY: demo test bench clean venv

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

# make wheel CUDA=13.0 | CUDA=13.2 | CUDA=cpu  -> dist/aim_kernels-<v>+cu130|+cu132|+cpu-*.whl
# (a CUDA version without an nvcc here gets NVIDIA's compiler from PyPI in build/)
CUDA ?= auto
.PHONY: wheel
wheel: $(STAMP)
	$(PY) python/build_wheel.py --cuda $(CUDA)
