"""What other peft releases do with a DISeL adapter: the measurement behind the "elsewhere" rows of README.md's table.

Run with the Axolotl venv's Python (the DISeL-enabled peft, transformers 5.20.1), from the repository root:

    .venv-axolotl/bin/python axolotl_disel/measure_elsewhere.py OUT_DIR [PEFT_SPEC ...]

It saves a tiny DISeL adapter (the tests' tiny Llama, random B and gates, so that it changes the logits) and its logits
with the DISeL peft, then, for each PEFT_SPEC (default: peft==0.21.2, upstream's release the fork is built on, and
peft==0.18.1, the newest that LLaMA-Factory 0.9.5 accepts), installs that release with `pip install --no-deps --target`
and loads the adapter with it in a subprocess (the release first on sys.path), and prints what it said (warnings and
log records) and the max |diff| of its logits from the DISeL model's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tests"))

LOAD = r"""
import json, logging, sys, warnings
import torch
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="log %(name)s: %(message)s")
warnings.simplefilter("always")
warnings.showwarning = lambda msg, cat, *a, **k: print(f"warning {cat.__name__}: {msg}")
# peft 0.18.1 does not import with the torchao that Axolotl pins; the tiny model does not need it
sys.modules["torchao"] = None
import peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
out = sys.argv[1]
base = AutoModelForCausalLM.from_pretrained(out + "/base", dtype=torch.float32)
try:
    model = PeftModel.from_pretrained(base, out + "/adapter").eval()
except Exception as exc:
    print(f"peft {peft.__version__}: loading failed: {type(exc).__name__}: {exc}")
    raise SystemExit(0)
ids = torch.load(out + "/ids.pt")
with torch.no_grad():
    logits = model(input_ids=ids).logits
diff = (logits - torch.load(out + "/logits.pt")).abs().max().item()
gates = sum("lora_disel_gate" in n for n, _ in model.named_parameters())
print(f"peft {peft.__version__}: loaded; gate parameters in the model: {gates}; max |diff| from DISeL: {diff:.3g}")
"""


def save_adapter(out: Path) -> None:
    from make_fixtures import write_base
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_base(out / "base")
    torch.manual_seed(1)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_disel=True, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_disel_gate" in name:
                param.normal_(0.0, 0.5)
    model.eval().save_pretrained(out / "adapter")
    ids = AutoTokenizer.from_pretrained(out / "base")(["the cat sat on the mat ."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            change = (logits - model(input_ids=ids).logits).abs().max().item()
    torch.save(ids, out / "ids.pt")
    torch.save(logits, out / "logits.pt")
    print(f"DISeL adapter saved; its max change of the logits from the base model: {change:.3g}")
    print(
        "adapter_config.json use_disel:",
        json.loads((out / "adapter" / "adapter_config.json").read_text())["use_disel"],
    )


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    specs = sys.argv[2:] or ["peft==0.21.2", "peft==0.18.1"]
    save_adapter(out)
    for spec in specs:
        target = out / spec.replace("==", "-")
        if not target.exists():
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), spec], check=True
            )
        env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", LOAD, str(out)], env=env, capture_output=True, text=True, check=False
        )
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "peft" in line.lower()]
        print(f"--- {spec} (exit {proc.returncode})")
        print("\n".join(lines[-12:]))


if __name__ == "__main__":
    main()
