# Two entry points for a new machine: `make test` and `make demo`.
# Everything lands in a local virtual environment (.venv): pyproject.toml states the
# supported ranges, constraints.txt the exact versions this environment installs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MAX_JOBS ?= 2
PYTEST_ARGS ?=

# Sources whose change requires rebuilding the extension.
EXT_SOURCES := setup.py pyproject.toml constraints.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: test build clean fashion-mnist cpp-test demo sweep sanitize ptxas-report gpu-check

# torch, ninja and setuptools must be in the venv before the extension builds
# (--no-build-isolation, as usual for torch extensions); read them from pyproject.
$(VENV)/.build-deps: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c constraints.txt $$($(PY) -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
	touch $@

# In CI (CI=true) the CUDA extension must build: a missing toolkit or a CUDA
# compile error fails the run instead of falling back to a CPU-only build.
DCE_FORCE_CUDA ?= $(if $(filter true 1,$(CI)),1,)

$(VENV)/.built: $(VENV)/.build-deps $(EXT_SOURCES)
	DCE_FORCE_CUDA=$(DCE_FORCE_CUDA) MAX_JOBS=$(MAX_JOBS) $(PIP) install --no-build-isolation \
		-c constraints.txt -e ".[test]"
	$(PY) -m dce_kernels  # which backends were built, against which torch and CUDA
	touch $@

build: $(VENV)/.built

# Real Fashion-MNIST (Debian's dataset-fashion-mnist) for the demo and the real-data tests;
# installed when missing and apt is available (needs root), unless DCE_DATA_DIR names a folder
# that holds the IDX files (see dce_kernels/experiments/data.py).
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
fashion-mnist:
	@if [ -z "$$DCE_DATA_DIR" ] && [ ! -d $(FASHION_MNIST_DIR) ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi

test: build fashion-mnist cpp-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The CMake build for C++ users (LibTorch from the venv's torch) and its ctest suite:
# CPU backend and emulated kernels vs a naive reference. CMAKE_ARGS=-DDCE_WITH_CUDA=ON adds CUDA.
CMAKE_BUILD_DIR := build/cmake
cpp-test: $(VENV)/.build-deps
	mkdir -p build
	cmake -S . -B $(CMAKE_BUILD_DIR) $(CMAKE_ARGS) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > $(CMAKE_BUILD_DIR).configure.log 2>&1 || (cat $(CMAKE_BUILD_DIR).configure.log; exit 1)
	cmake --build $(CMAKE_BUILD_DIR) -j $(MAX_JOBS)
	ctest --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

clean:
	rm -rf build dist *.egg-info dce_kernels/*.so $(VENV)/.built

.PHONY: bench
# Benchmarks: interleaved ratios vs dense / narrow / naive, then the table and plot.
# DCE_BENCH_THREADS=1,2 measures both thread counts; DCE_BENCH_ROUNDS sets rounds.
bench: build
	mkdir -p build/bench
	$(PY) -m pytest bench --benchmark-json=build/bench/results.json -q
	$(PY) bench/report.py build/bench/results.json --markdown build/bench/table.md \
		--plot build/bench/layer.png --step-plot build/bench/step.png
	@cat build/bench/table.md

# -- make demo: DCE on real Fashion-MNIST next to the narrow network a user would train
# instead, same epochs (about 3 minutes on 2 CPU cores after the build).
DEMO_DIR ?= runs/demo
DEMO_ARGS ?= --model vgg11 --width 0.25 --fraction 0.25 --train-limit 20000 --test-limit 10000 \
	--explore-epochs 1 --finetune-epochs 3 --batch-size 128 --lr 0.1 --compare narrow-uniform

demo: build fashion-mnist
	rm -rf $(DEMO_DIR)
	$(PY) -m dce_kernels.experiments.cli train --dataset fashion-mnist $(DEMO_ARGS) --run-dir $(DEMO_DIR)

# -- make sweep: the protocol that decides whether DCE is worth it (README, "Results"): on
# full Fashion-MNIST, VGG-11 (width 0.25) at 10/25/50% of the channels and ResNet-20 (width
# 0.5) at 50%, DCE (shrink, global budget) against its random-order control, post-training
# Taylor pruning, the narrow network trained from scratch (at DCE's widths and uniform) and
# the dense network, every method 8 epochs, 3 seeds. Two worker processes share SWEEP_DIR and
# split the runs; rerunning continues a stopped sweep (it takes hours on 2 cores).
# Each worker runs one torch thread: on a shared machine, OpenMP threads competing with
# other processes slow small models down many times over.
SWEEP_DIR ?= runs/sweep-fmnist
SWEEP_WORKERS ?= 2
SWEEP_COMMON ?= --dataset fashion-mnist --methods shrink,shrink-random,prune,narrow,narrow-uniform \
	--seeds 0,1,2 --budget global --reward l2 --lr-schedule continuous --explore-epochs 2 \
	--finetune-epochs 6 --batch-size 128 --lr 0.1 --finetune-lr 0.02
SWEEP_GRIDS ?= "--model vgg11 --width 0.25 --fractions 0.1,0.25,0.5,1.0" \
	"--model resnet20 --width 0.5 --fractions 0.5,1.0"

sweep: build fashion-mnist
	mkdir -p $(SWEEP_DIR)
	for i in $$(seq $(SWEEP_WORKERS)); do \
		( for grid in $(SWEEP_GRIDS); do \
			$(PY) -m dce_kernels.experiments.cli sweep --out $(SWEEP_DIR) $(SWEEP_COMMON) $$grid \
				--threads 1 --no-progress; \
		done ) > $(SWEEP_DIR)/worker$$i.log 2>&1 & \
	done; wait
	for grid in $(SWEEP_GRIDS); do \
		$(PY) -m dce_kernels.experiments.cli sweep --out $(SWEEP_DIR) $(SWEEP_COMMON) $$grid --collect-only; \
	done
	$(PY) -m dce_kernels.experiments.cli plot $(SWEEP_DIR)/fashion-mnist-vgg11
	$(PY) -m dce_kernels.experiments.cli plot $(SWEEP_DIR)/fashion-mnist-resnet20

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

# --- make gpu-check: the prepared run for a GPU machine (bench/README.md, "CUDA"), under 8
# minutes: builds the extension for the present GPU with the torch already installed (no
# downloads), runs python_tests/test_cuda_backend.py, bench/test_cuda_speed.py and a short
# DCE training run, and writes GPU_CHECK_DIR/summary.{json,md}. Without a GPU it stops at
# once with a message and exit status 2. GPU_CHECK_PYTHON: the interpreter whose torch to use.
GPU_CHECK_DIR ?= build/gpu-check
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_CHECK_PYTHON) bench/gpu_check.py --out $(GPU_CHECK_DIR) $(GPU_CHECK_ARGS)
