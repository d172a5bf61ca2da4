#!/usr/bin/env bash
# `make gpu-check`: the checks that need a CUDA GPU, in one command. Never part of `make test` or CI.
#
#   1. the DISeL tests (tests/test_disel*.py) under the CUDA build of torch. They build their models on the CPU (they
#      take no device), so this step checks that they pass with that build, not DISeL's CUDA path
#   2. DISeL on CUDA (integration/test_cuda.py): fused vs plain path, fp32 and autocast, train/save/reload
#   3. QLoRA on bitsandbytes' CUDA kernels: integration/test_qlora.py with DISEL_TEST_DEVICE=cuda, and the demo's
#      smoke tests (QLoRA included) with DEMO_TEST_DEVICE=cuda
#   4. `make bench` on the GPU (bench/disel_overhead.py --device cuda), which prints its ratios and the JSON line
#
# Without a GPU it says so and does nothing else (exit 0). Logs go to build/gpu-check/. It needs the venv of `make
# install` with a CUDA build of torch (TORCH_SPEC, see README.md); another Python can be named, e.g. on a machine whose
# own python3 has CUDA torch and the other packages: PYTHON=python3 PYTHONPATH=build/peft/src bash bench/gpu_check.sh
# (build/peft from `make tree`). --dry-run prints the steps without running them or looking for a GPU.
# The tests run through tooling/run_tests.py's pytest (build/peft's configuration and rootdir, offline), one at a time
# on the GPU (PYTEST_WORKERS=0; set it to run them in that many processes).

set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
LOGS=$ROOT/build/gpu-check

nvidia_gpus() {  # the number of GPUs nvidia-smi lists (0 without nvidia-smi or without a GPU)
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')  # grep -c prints 0 (and fails) when nothing matches
    fi
    echo "${n:-0}"
}

if [[ $DRY == 0 ]]; then
    if ! [[ -x $PY ]] && ! command -v "$PY" >/dev/null 2>&1; then
        if [[ $(nvidia_gpus) -gt 0 ]]; then
            echo "gpu-check: a GPU is there, but no Python at $PY: run \`make install\` with a CUDA build of torch (TORCH_SPEC, see README.md)" >&2
            exit 1
        fi
        echo "gpu-check: no CUDA GPU on this machine (and no $PY); nothing to do."
        exit 0
    fi
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        build=$("$PY" -c 'import torch; print(torch.__version__, "(CUDA " + torch.version.cuda + ")" if torch.version.cuda else "(a CPU build)")' 2>/dev/null || echo "not importable")
        if [[ $(nvidia_gpus) -gt 0 ]]; then
            echo "gpu-check: nvidia-smi lists a GPU, but torch $build in $PY does not see it: install torch's CUDA build (TORCH_SPEC, see README.md)" >&2
            exit 1
        fi
        echo "gpu-check: no CUDA GPU visible to torch $build ($PY); nothing to do."
        exit 0
    fi
    "$PY" -c 'import torch; print("gpu-check: torch", torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name(0))'
    if ! "$PY" -c 'import peft, sys; sys.exit(0 if "disel" in peft.__version__ else 1)' 2>/dev/null; then
        echo "gpu-check: $PY does not import this project's peft (run \`make install\`, or set PYTHONPATH=build/peft/src)" >&2
        exit 1
    fi
    [[ -d $ROOT/build/peft/tests ]] || { echo "gpu-check: build/peft is missing: run \`make tree\`" >&2; exit 1; }
    mkdir -p "$LOGS"
fi

# tooling/run_tests.py's runner with this Python: `gpu_pytest.py JUNIT FILES...` (files relative to build/peft or absolute)
PYTEST=("$PY" "$ROOT/bench/gpu_pytest.py")
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT/tooling" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTEST_WORKERS=${PYTEST_WORKERS:-0}

declare -a SUMMARY
FAILED=0

step() {  # step NAME LOG DIR COMMAND...: run COMMAND in DIR, its output on the terminal and in LOG
    local name=$1 log=$2 dir=$3
    shift 3
    echo
    echo "=== gpu-check: $name"
    local rel=${dir#"$ROOT"}
    rel=${rel#/}
    echo "+ (cd ${rel:-.}) $*"
    if [[ $DRY == 1 ]]; then
        SUMMARY+=("$name: not run (--dry-run)")
        return
    fi
    local start=$SECONDS
    (cd "$dir" && "$@") 2>&1 | tee "$LOGS/$log"
    local rc=${PIPESTATUS[0]}
    SUMMARY+=("$name: $([[ $rc == 0 ]] && echo passed || echo "FAILED (exit $rc)") in $((SECONDS - start)) s, log build/gpu-check/$log")
    [[ $rc == 0 ]] || FAILED=1
}

# our test files, linked into build/peft at the same paths
mapfile -t DISEL_TESTS < <(cd "$ROOT" && ls tests/test_disel*.py)
step "DISeL tests (tests/test_disel*.py, models on the CPU) under the CUDA build of torch" disel-tests.log "$ROOT" \
    "${PYTEST[@]}" "$LOGS/disel-tests.xml" "${DISEL_TESTS[@]}"
# selecting no test fails the step (pytest's exit 5)
step "DISeL on CUDA: fused vs plain path, fp32 and autocast, train/save/reload" cuda-tests.log "$ROOT" \
    "${PYTEST[@]}" "$LOGS/cuda-tests.xml" "$ROOT/integration/test_cuda.py"
step "QLoRA: DISeL on bitsandbytes' CUDA kernels" qlora-tests.log "$ROOT" \
    env DISEL_TEST_DEVICE=cuda "${PYTEST[@]}" "$LOGS/qlora-tests.xml" "$ROOT/integration/test_qlora.py"
step "demo smoke tests on CUDA (QLoRA included)" demo-tests.log "$ROOT" \
    env DEMO_TEST_DEVICE=cuda "${PYTEST[@]}" "$LOGS/demo-tests.xml" "$ROOT/demo/test_demo.py"
step "make bench on CUDA" bench.log "$ROOT" "$PY" bench/disel_overhead.py --device cuda

echo
echo "=== gpu-check summary"
printf '  %s\n' "${SUMMARY[@]}"
if [[ $DRY == 0 ]]; then
    echo "  bench ratios (DISeL/LoRA, JSON): $(tail -n 1 "$LOGS/bench.log")"
fi
exit $FAILED
