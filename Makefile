# The two quickstart commands, each setting up its own virtual environment in .venv:
#   make train  the main job: `fastpo grpo` on the built-in task (SFT warm start, then GRPO)
#   make test   the test suite
# and `make demo`: fused vs eager log-probs on a real vocabulary, with peak memory;
# `make bench`: the benchmark suite (python -m fastpo.bench), tables and plots in bench/out.
#
# On a machine without an NVIDIA GPU the CPU build of torch is installed, never the
# multi-GB CUDA build: TORCH_CPU names it (pip finds it on a local wheel directory or on
# the PyTorch CPU index, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_GPU ?= torch>=2.4

STAMP := $(VENV)/.fastpo-installed

.PHONY: train demo test bench

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(VENV)/bin/pip install "$(TORCH_GPU)"; \
	else \
		$(VENV)/bin/pip install "$(TORCH_CPU)" || { \
			echo "error: could not install $(TORCH_CPU) (the CPU build of torch)."; \
			echo "Point pip at the PyTorch CPU wheels (PIP_EXTRA_INDEX_URL) or set TORCH_CPU=..."; \
			exit 1; }; \
	fi
	$(VENV)/bin/pip install -e ".[test]"
	touch $@

train: $(STAMP)
	$(VENV)/bin/fastpo grpo

demo: $(STAMP)
	$(VENV)/bin/python -m fastpo.bench.demo

# Two worker processes, each test file whole on one of them (a module's shared
# training run stays in one process), in the order tests/conftest.py sorts them (the
# longest first), not xdist's (the most tests first); conftest.py also gives each worker
# its share of the cores.
test: $(STAMP)
	$(VENV)/bin/pytest -n 2 --dist loadfile --no-loadscope-reorder

# the benchmark suite with its CPU-capable peers (TRL, Liger-Kernel); see docs/benchmarks.md
bench: $(STAMP)
	$(VENV)/bin/pip install -e ".[bench]"
	$(VENV)/bin/python -m fastpo.bench --out bench/out
