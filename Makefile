# Two entry points for a new machine: `make test` and `make demo`.
# Everything lands in a local virtual environment (.venv); pins live in pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MAX_JOBS ?= 2
PYTEST_ARGS ?=

# Sources whose change requires rebuilding the extension.
EXT_SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: test build clean sanitize ptxas-report

# torch, ninja and setuptools must be in the venv before the extension builds
# (--no-build-isolation, as usual for torch extensions); read them from pyproject.
$(VENV)/.build-deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $$($(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
	touch $@

$(VENV)/.built: $(VENV)/.build-deps $(EXT_SOURCES)
	MAX_JOBS=$(MAX_JOBS) $(PIP) install --no-build-isolation -e ".[test]"
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info dce_kernels/*.so $(VENV)/.built

# --- CUDA kernels: sanitizer run of the emulated backend, ptxas resource report.

# The emulated backend (csrc/kernels run by csrc/emu) rebuilt with AddressSanitizer
# and UBSan, then every emulated test (the shared suite's "emulated" backend
# and the emulator's own tests) run against it. Python itself is not
# instrumented, so the ASan runtime is preloaded.
# libstdc++ is preloaded too: ASan intercepts __cxa_throw only if it is present at start-up.
SANITIZE_PRELOAD = $(shell g++ -print-file-name=libasan.so) $(shell g++ -print-file-name=libstdc++.so)
SANITIZE_ENV = LD_PRELOAD="$(SANITIZE_PRELOAD)" \
	ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
sanitize: build
	MAX_JOBS=$(MAX_JOBS) $(SANITIZE_ENV) $(PY) csrc/emu/build_sanitized.py build/sanitize
	$(SANITIZE_ENV) DCE_EMU_LIBRARY=$(CURDIR)/build/sanitize/dce_emu_sanitized.so \
		$(PY) -m pytest -p no:cacheprovider -q python_tests -k "emulated or emulator" $(PYTEST_ARGS)

# ptxas register / spill / shared-memory report of every CUDA kernel, per
# architecture, in build/ptxas-report.txt (nvcc -Xptxas -v on the launchers).
PTXAS_ARCHS ?= 80 90
ptxas-report: build
	mkdir -p build
	$(PY) csrc/cuda/ptxas_report.py build/ptxas-report.txt $(PTXAS_ARCHS)
