"""`pip install <clone>` the way a user installs the fork: a fresh venv, pip's defaults (build isolation on), no Makefile.

The clone is of the current commit (committed files only: uncommitted edits are not in it). pip builds the package in
an isolated environment that holds only what pyproject.toml's [build-system] declares, and the build fetches the
pinned peft sdist with pip (from the package index, following the user's pip configuration, or PEFT_SDIST). The
installed peft then runs one DISeL training step, saves the adapter and loads it back with plain PEFT.

It needs the package index (torch, peft's dependencies and the peft sdist); pip's cache makes a rerun faster.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "testing_support"))

from disel_testing import gate_tensors  # noqa: E402


def torch_pin() -> str:
    """The Makefile's torch pin (TORCH_PIN), the one place it is spelled."""
    found = re.search(r"^TORCH_PIN := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, "the Makefile no longer sets TORCH_PIN"
    return found.group(1)


# `make TORCH_SPEC=...` passes its own build (the Makefile's variables given on the command line are in the
# environment)
TORCH_SPEC = os.environ.get("TORCH_SPEC") or torch_pin()

# runs inside the fresh venv: one DISeL step on a tiny Llama (its shape from the clone's testing_support/), save, load
# with PeftModel.from_pretrained, compare
CHECK = """
import json, sys
sys.path.insert(0, sys.argv[2])
import peft, torch
from disel_testing import TINY_LLAMA
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_disel_optimizer
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

out = sys.argv[1]


def base():
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA, vocab_size=256)
    return LlamaForCausalLM(config).eval()


ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    base_logits = base()(input_ids=ids).logits
model = get_peft_model(base(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_disel=True))
model.train()
optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2, gate_lr_ratio=5.0)
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
optimizer.step()
model.eval()
with torch.no_grad():
    trained = model(input_ids=ids).logits
model.save_pretrained(out)
saved = load_file(f"{out}/adapter_model.safetensors")
with open(f"{out}/adapter_config.json") as f:
    use_disel = json.load(f)["use_disel"]
loaded = PeftModel.from_pretrained(base(), out).eval()
with torch.no_grad():
    reloaded = loaded(input_ids=ids).logits
print(json.dumps({
    "peft_version": peft.__version__,
    "peft_file": peft.__file__,
    "torch_version": torch.__version__,
    "loss": loss.item(),
    "gate_keys": sorted(k for k in saved if ".lora_disel_gate." in k),
    "use_disel": use_disel,
    "adapter_effect": (trained - base_logits).abs().max().item(),
    "reload_diff": (reloaded - trained).abs().max().item(),
}))
"""


def run(cmd, env, cwd, timeout):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, (
        f"`{' '.join(map(str, cmd))}` failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr}"
    )
    return res.stdout


def test_pip_install_clean_clone_with_build_isolation(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    lines = (ROOT / "UPSTREAM").read_text().splitlines()
    pin = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    version = f"{pin['PEFT_VERSION']}+{pin['LOCAL_VERSION']}"
    # the user's environment and pip configuration, without anything that would switch build isolation off or put
    # this repository's trees on the fresh venv's path
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_NO_BUILD_ISOLATION", "PIP_USER")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    try:
        run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], env, tmp_path, 300)
        run(["git", "checkout", "-q", commit.stdout.strip()], env, clone, 300)
        run([sys.executable, "-m", "venv", str(venv)], env, tmp_path, 300)
        python = venv / "bin" / "python"
        # torch in the same command, or pip resolves peft's `torch>=1.13.0` to a CUDA build; the project's pins as
        # constraints, so the venv gets the versions the other tests run with
        constraints = ROOT / "tooling" / "requirements.txt"
        pip = [str(python), "-m", "pip", "install", "--progress-bar", "off", TORCH_SPEC, "-c", str(constraints)]
        out = run([*pip, str(clone)], env, tmp_path, 1200)
        assert f"peft-{version}" in out.splitlines()[-1], out[-2000:]
        (tmp_path / "check.py").write_text(CHECK)
        check = [str(python), "check.py", "adapter", str(clone / "testing_support")]
        result = json.loads(run(check, env, tmp_path, 600).splitlines()[-1])
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~1.2 GB with torch
    print(json.dumps(result))
    assert result["peft_version"] == version
    assert result["peft_file"].startswith(str(venv)), "peft was not imported from the fresh venv"
    if "==" in TORCH_SPEC:
        assert result["torch_version"].split("+")[0] == TORCH_SPEC.partition("==")[2], "pip changed the torch version"
    assert result["use_disel"], "the saved adapter_config.json is not a DISeL adapter's"
    assert len(result["gate_keys"]) == gate_tensors(modules=2), result["gate_keys"]  # q and v
    assert result["adapter_effect"] > 1e-4, "one step changed nothing: the check would also pass without DISeL"
    assert result["reload_diff"] < 1e-5, "the reloaded adapter does not reproduce the trained model's outputs"
