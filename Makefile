# The README's quick start: `make demo` and `make test`, each complete on a fresh machine
# (x86_64, Python 3.11). Both install what they need first; the install is skipped while the
# sources are unchanged.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch's CUDA build runs on the CPU too; curvkern supports torch 2.11 to 2.14.
TORCH ?= torch==2.14.1 torchvision==0.29.1
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.* csrc/cpu/*.* csrc/cuda/*.*)

# Debian packages the tests use: a browser and its driver for the report's test, and the
# fortunes corpus of the text examples. Installed when missing and run as root (CI, fresh
# machines); otherwise named, and the tests that need them skip.
DEBIAN_PACKAGES := chromium chromium-driver fortunes

.PHONY: install system demo test lint format bench mutants

install: system .install.stamp

system:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages:" $$missing; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "note: tests that need" $$missing "skip; install them with: sudo apt-get install" $$missing; \
	fi

.install.stamp: $(SOURCES)
	$(PIP) install --quiet $(TORCH) ninja setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"
	@touch .demo.stamp $@

# The demo installs only what it needs: torch, the extension and the examples' extra (no
# browser, no Debian packages, no test or lint tools).
.demo.stamp: $(SOURCES)
	$(PIP) install --quiet $(TORCH) ninja setuptools wheel
	$(PIP) install --quiet --no-build-isolation -e ".[examples]"
	@touch $@

demo: .demo.stamp
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

# Mutation testing: the curated mutants of tools/mutants.toml (see docs/DEV.md).
mutants: install
	$(PYTHON) tools/mutate.py
