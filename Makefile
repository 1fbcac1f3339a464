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

.PHONY: test build clean demo demo-data

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

# -- make demo: the paper's pipeline on real Fashion-MNIST, a few minutes on 2 CPU cores --
# Debian's dataset-fashion-mnist ships the IDX files; installed with apt when missing.
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
DEMO_ARGS ?= --model vgg11 --width 0.25 --fraction 0.5 --train-limit 6000 --test-limit 2000 \
	--dense-epochs 2 --explore-epochs 1 --finetune-epochs 1 --tau 20 --batch-size 64

demo-data:
	@if [ -n "$$DCE_DATA_DIR" ] || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] \
	    || [ -f $(FMNIST_DIR)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST IDX files not found in $(FMNIST_DIR) and no apt-get: put them in a" \
	       "folder and set DCE_DATA_DIR" >&2; exit 1; \
	fi

demo: build demo-data
	rm -rf $(DEMO_DIR)
	$(PY) -m dce_kernels.cli train --dataset fashion-mnist $(DEMO_ARGS) --run-dir $(DEMO_DIR)
