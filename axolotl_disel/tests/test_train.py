"""`axolotl train` on a DISeL YAML (the CLI, offline, on the CPU), then what the trainer used and what it saved."""

import json

import pytest
import torch
from conftest import GATE_LR_RATIO, LR, STEPS, WEIGHT_DECAY, make_config, run_axolotl
from disel_probe import GATE, PROBE_TEXT


def test_saved_adapter_is_disel(trained):
    out, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_disel"] not in (None, False)
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    gates = [name for name in weights if GATE in name]
    # 2 layers x 7 projections, a weight and a bias each
    assert len(gates) == 2 * 7 * 2, sorted(weights)


def test_optimizer_groups(trained):
    """The optimizer the trainer stepped: the LoRA weights at lr (with weight decay but for biases and norms), the gates
    alone in a group at disel_gate_lr_ratio x lr without weight decay."""
    out, log = trained
    record = json.loads((out / "probe" / "optimizer.json").read_text())
    for group in record["groups"]:
        kind = "gates" if any(GATE in n for n in group["names"]) else "other"
        print(
            f"group ({kind}): lr={group['lr']:.4g} weight_decay={group['weight_decay']} "
            f"tensors={len(group['names'])} numel={group['numel']}"
        )
    assert record["class"] == "AdamW"
    gate_groups = [g for g in record["groups"] if any(GATE in n for n in g["names"])]
    assert len(gate_groups) == 1
    gates = gate_groups[0]
    assert all(GATE in n for n in gates["names"])
    assert len(gates["names"]) == 2 * 7 * 2
    assert gates["lr"] == pytest.approx(LR * GATE_LR_RATIO)
    assert gates["weight_decay"] == 0.0
    others = [g for g in record["groups"] if g is not gates]
    assert others and all(g["lr"] == pytest.approx(LR) for g in others)
    lora_a = [g for g in others if any("lora_A" in n for n in g["names"])]
    assert len(lora_a) == 1 and lora_a[0]["weight_decay"] == WEIGHT_DECAY
    assert "DISeL optimizer AdamW" in log


def test_gates_moved_by_gradient(trained):
    """The gates moved from their initialisation, by different amounts per gate (no constant shift or decay), and
    about GATE_LR_RATIO times as far as LoRA's A at most: Adam moves a parameter by about its lr per step."""
    out, _ = trained
    before = torch.load(out / "probe" / "gates_before.pt")
    after = torch.load(out / "probe" / "gates_after.pt")
    assert before.keys() == after.keys() and before
    biases = [n for n in before if n.endswith(".bias")]
    assert all(torch.allclose(before[n], torch.full_like(before[n], -3.0)) for n in biases)
    moves = torch.cat([(after[n] - before[n]).flatten() for n in before])
    mean_before = torch.cat([before[n] for n in biases]).mean().item()
    mean_after = torch.cat([after[n] for n in biases]).mean().item()
    print(f"mean gate bias before {mean_before:.4f}, after {mean_after:.4f}; max |move| {moves.abs().max():.4g}")
    assert moves.abs().max() > 0
    assert moves.abs().max() <= STEPS * LR * GATE_LR_RATIO * 1.05
    assert moves.std() > 0
    lora_before = torch.load(out / "probe" / "lora_before.pt")
    lora_after = torch.load(out / "probe" / "lora_after.pt")
    lora_moves = torch.cat([(lora_after[n] - lora_before[n]).flatten() for n in lora_before])
    ratio = (moves.abs().max() / lora_moves.abs().max()).item()
    print(f"max |move| of a gate parameter / of a lora_A weight: {ratio:.3f}")
    assert GATE_LR_RATIO / 2 < ratio < GATE_LR_RATIO * 2, ratio


def test_fused_kernels_off(trained):
    out, log = trained
    kernels = json.loads((out / "probe" / "kernels.json").read_text())
    assert kernels["flags"] == dict.fromkeys(kernels["flags"], False)
    assert kernels["patched_modules"] == []
    assert "Axolotl's fused LoRA kernels" in log and "are switched off" in log


def test_saved_adapter_reloads_with_plain_peft(trained, fixtures):
    """`PeftModel.from_pretrained` on the saved adapter gives the logits of the model Axolotl trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    base = AutoModelForCausalLM.from_pretrained(fixtures / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    assert model.peft_config["default"].use_disel
    batch = AutoTokenizer.from_pretrained(fixtures / "base")([PROBE_TEXT], return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=batch["input_ids"]).logits
    trained_logits = torch.load(out / "probe" / "logits.pt")
    diff = (logits - trained_logits).abs().max().item()
    change = (trained_logits - base_logits).abs().max().item()
    print(f"reload max |diff| {diff:.3g}; the adapter's change of the logits: {change:.3g}")
    assert change > 1e-3
    assert diff < 1e-5


def test_qlora(fixtures, tmp_path):
    """`adapter: qlora` with `load_in_4bit`: the base's linear layers in bitsandbytes 4-bit (here on the CPU), DISeL
    around them with the same optimizer groups, and gates that moved."""
    out = tmp_path / "out"
    proc = run_axolotl("train", make_config(fixtures, out, adapter="qlora", load_in_4bit=True), tmp_path)
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert json.loads((out / "adapter_config.json").read_text())["use_disel"] not in (None, False)
    modules = json.loads((out / "probe" / "modules.json").read_text())
    assert modules.get("bitsandbytes.nn.modules.Linear4bit", 0) == 2 * 7, modules
    record = json.loads((out / "probe" / "optimizer.json").read_text())
    groups = sorted((g["lr"], g["weight_decay"], len(g["names"])) for g in record["groups"])
    assert groups == [(pytest.approx(LR), WEIGHT_DECAY, 28), (pytest.approx(LR * GATE_LR_RATIO), 0.0, 28)]
    before = torch.load(out / "probe" / "gates_before.pt")
    after = torch.load(out / "probe" / "gates_after.pt")
    moves = torch.cat([(after[n] - before[n]).flatten() for n in before])
    assert moves.abs().max() > 0 and moves.std() > 0
