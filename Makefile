# The two quickstart commands, each setting up its own virtual environment in .venv:
#   make train  the main job: `fastpo grpo` on the built-in task (SFT warm start, then GRPO)
#   make test   the test suite
# and `make demo`: fused vs eager log-probs on a real vocabulary, with peak memory;
# `make bench`: the benchmark suite (python -m fastpo.bench), tables and plots in bench/out.
#
# On a machine without an NVIDIA GPU the CPU build of torch is installed (TORCH_CPU,
# about 190 MB), not the CUDA build (about 2.7 GB with its NVIDIA libraries): from pip's
# configured sources (a wheel folder, an index) when one has it, else from PyTorch's CPU
# index (TORCH_CPU_INDEX). Only when neither has it does the setup fall back to the default
# build of the same version (TORCH_DEFAULT), saying so and how big it is. Each try's pip
# errors go to $(VENV)/torch-install.log.
PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_DEFAULT ?= $(subst +cpu,,$(TORCH_CPU))
TORCH_GPU ?= torch>=2.4

STAMP := $(VENV)/.fastpo-installed
TEST_STAMP := $(VENV)/.fastpo-test-installed

.PHONY: train demo test bench

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	@log=$(VENV)/torch-install.log; \
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(VENV)/bin/pip install "$(TORCH_GPU)"; \
	else \
		echo "fastpo: installing $(TORCH_CPU), the CPU build of torch, from pip's configured sources"; \
		if ! $(VENV)/bin/pip install "$(TORCH_CPU)" 2>$$log; then \
			echo "fastpo: not there ($$(tail -n 1 $$log)); trying PyTorch's CPU index $(TORCH_CPU_INDEX)"; \
			if ! $(VENV)/bin/pip install "$(TORCH_CPU)" --extra-index-url "$(TORCH_CPU_INDEX)" 2>$$log; then \
				case "$$(uname -s)" in \
					Linux) size="on Linux the CUDA build, about 2.7 GB to download with its NVIDIA libraries";; \
					*) size="on $$(uname -s) a CPU-only build of a few hundred MB";; \
				esac; \
				grep -q "NewConnectionError\|ConnectTimeout\|ReadTimeout" $$log && why="unreachable" || why=$$(tail -n 1 $$log); \
				echo "fastpo: not there either ($$why); installing the default build $(TORCH_DEFAULT) instead: $$size (make TORCH_CPU=... or PIP_FIND_LINKS=DIR to use a CPU build)"; \
				$(VENV)/bin/pip install "$(TORCH_DEFAULT)" || { \
					echo "fastpo: error: no torch could be installed; give pip a source of $(TORCH_CPU) (PIP_FIND_LINKS=DIR of wheels, PIP_EXTRA_INDEX_URL=URL) or set TORCH_CPU=..."; \
					exit 1; }; \
			fi; \
		fi; \
	fi
	$(VENV)/bin/pip install -e .
	touch $@

# The test dependencies, the peers among them, on top of the package.
$(TEST_STAMP): $(STAMP)
	$(VENV)/bin/pip install -e ".[test]"
# verl and OpenRLHF for tests/test_integrations_*.py, without their dependencies (flash-attn,
# vLLM-era pins, transformers<5.11); the [test] extra has the few that their loss modules import
	$(VENV)/bin/pip install --no-deps "verl==0.9.1" "openrlhf==0.11.2"
	touch $@

train: $(STAMP)
	$(VENV)/bin/fastpo grpo

demo: $(STAMP)
	$(VENV)/bin/python -m fastpo.bench.demo

# Two worker processes, each test file whole on one of them (a module's shared
# training run stays in one process), in the order tests/conftest.py sorts them (the
# longest first), not xdist's (the most tests first); conftest.py also gives each worker
# its share of the cores.
test: $(TEST_STAMP)
	$(VENV)/bin/pytest -n 2 --dist loadfile --no-loadscope-reorder

# the benchmark suite with its CPU-capable peers (TRL, Liger-Kernel); see docs/benchmarks.md
bench: $(STAMP)
	$(VENV)/bin/pip install -e ".[bench]"
	$(VENV)/bin/python -m fastpo.bench --out bench/out
