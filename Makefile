# The README's quick start: `make demo` and `make test`, each complete on a fresh machine
# (x86_64, Python 3.11). Both install what they need first; the install is skipped while the
# sources are unchanged.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch's CUDA build runs on the CPU too; curvkern supports torch 2.11 to 2.14.
TORCH ?= torch==2.14.1 torchvision==0.29.1
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.* csrc/cpu/*.* csrc/cuda/*.*)

.PHONY: install demo test lint format bench

install: .install.stamp

.install.stamp: $(SOURCES)
	$(PIP) install --quiet $(TORCH) ninja setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"
	@touch $@

demo: install
	$(PYTHON) examples/find_mislabeled.py

test: install
	$(PYTHON) -m pytest tests

lint: install
	ruff check .
	ruff format --check .
	clang-format --dry-run --Werror csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*

format:
	ruff format .
	clang-format -i csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*

bench: install
	$(PYTHON) -m pytest benchmarks
