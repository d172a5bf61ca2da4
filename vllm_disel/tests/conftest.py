"""Shared fixtures of the vLLM tests: they run in the vLLM venv (`make test-vllm`); the reference data comes from the
project's main venv, with the patched PEFT, through `make_reference.py` in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "testing_support"))
sys.path.insert(0, str(HERE))

from disel_testing import launch_env  # noqa: E402


# vLLM on the CPU: a small KV cache; offline
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the engine of the tests: 3 LoRA slots for the 4 adapters, float32 like the PEFT reference, no CUDA graphs or compile
ENGINE_ARGS = {
    "enable_lora": True,
    "max_lora_rank": 8,
    "max_loras": 3,
    "max_cpu_loras": 3,
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 128,
    "max_num_seqs": 8,
    "seed": 0,
}

# per-token log-probabilities of vLLM and PEFT + transformers (float32) must agree to this (measured: < 5e-6)
LOGPROB_ATOL = 1e-4


def main_python() -> Path:
    """The main venv's Python (patched PEFT), from DISEL_MAIN_PYTHON or `.venv/` of this repository."""
    path = Path(os.environ.get("DISEL_MAIN_PYTHON", ROOT / ".venv" / "bin" / "python"))
    if not path.exists():
        pytest.fail(f"No main venv Python at {path}: run `make install` (or set DISEL_MAIN_PYTHON).")
    return path


def run_main_python(args: list[str], timeout: int) -> str:
    """Runs the main venv's Python with `args` and returns what it printed; fails the test if it exits with an error."""
    proc = subprocess.run(
        [str(main_python()), *args],
        env=launch_env(hide_gpus=False),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"{args[0]} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc.stdout


def expected_source() -> str:
    """make_reference.py's hash of its inputs, from the main venv: the PEFT that runs there is part of them."""
    return run_main_python([str(HERE / "make_reference.py"), "--source-hash"], timeout=300).strip()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The tiny model, the adapters and reference.json; rebuilt when make_reference.py, the shared test support or any
    Python file of the main venv's PEFT changes."""
    out = Path(os.environ.get("DISEL_VLLM_REFERENCE", ROOT / "build" / "vllm-disel" / "reference"))
    ref = out / "reference.json"
    if not ref.exists() or json.loads(ref.read_text()).get("source") != expected_source():
        run_main_python([str(HERE / "make_reference.py"), str(out)], timeout=900)
    return out


@pytest.fixture(scope="session")
def reference(reference_dir) -> dict:
    return json.loads((reference_dir / "reference.json").read_text())
