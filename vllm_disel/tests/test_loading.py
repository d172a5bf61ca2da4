"""Loading the PEFT-saved adapters through vLLM's own loader functions (the ones its workers call), with and without
the plugin, and what the plugin refuses at load time. No engine is started here (test_engine.py does that)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from disel_testing import LLAMA_LINEAR

import vllm_disel


# the modules vLLM expects of a Llama adapter (the packed qkv_proj / gate_up_proj are listed by their parts)
EXPECTED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}


@pytest.fixture(scope="module", autouse=True)
def plugin():
    vllm_disel.register()  # what vLLM does in each of its processes (idempotent)


def load(path):
    """PEFTHelper.from_local_dir + LoRAModel.from_local_checkpoint, as vLLM's WorkerLoRAManager calls them."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(path), max_position_embeddings=None)
    return LoRAModel.from_local_checkpoint(
        str(path), EXPECTED, peft_helper=helper, lora_model_id=1, device="cpu", dtype=torch.float32
    )


def test_disel_adapter_loads_with_its_gates(reference_dir):
    from safetensors.torch import load_file

    model = load(reference_dir / "disel_b")  # gate_normalize, r=4, q/v/up/down only
    assert sorted(model.loras) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
    )  # fmt: skip
    tensors = load_file(reference_dir / "disel_b" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.1.mlp.down_proj.lora_disel_gate"
    gate = model.loras["model.layers.1.mlp.down_proj"].disel_gate
    d_in = tensors[prefix + ".weight"].shape[1]
    torch.testing.assert_close(gate.weight, tensors[prefix + ".weight"] / d_in**0.5)
    torch.testing.assert_close(gate.bias, tensors[prefix + ".bias"])
    # the gates were trained: they are no longer at their initial bias
    assert not torch.allclose(gate.bias, torch.full_like(gate.bias, -2.0))


def test_plain_lora_adapter_is_unchanged(reference_dir):
    model = load(reference_dir / "lora")
    assert len(model.loras) == len(LLAMA_LINEAR) * 2  # every linear layer of the 2 decoder layers
    assert all(not hasattr(w, "disel_gate") for w in model.loras.values())


def copy_adapter(reference_dir, tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(reference_dir / name, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    edit(config)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("disel_embed", None, "gate on the embedding layer 'model.embed_tokens'"),
        ("disel_lm_head", None, "gate on 'lm_head'"),
        (
            "disel_a",
            lambda c: c["use_disel"].update(gate_temperature=2.0),
            "Unknown DISeL option(s) ['gate_temperature']",
        ),
        ("disel_a", lambda c: c.update(use_disel=False), "does not set `use_disel`"),
        ("disel_c", lambda c: c["use_disel"].update(gate_bottleneck_dim=None), "the config and the weights do not"),
    ],
)
def test_refused_at_load_time(reference_dir, tmp_path, name, edit, message):
    folder = reference_dir / name if edit is None else copy_adapter(reference_dir, tmp_path, name, edit)
    with pytest.raises(ValueError, match=re.escape(message)):
        load(folder)


NO_PLUGIN = """
import sys, torch
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
helper = PEFTHelper.from_local_dir(sys.argv[1], max_position_embeddings=None)
print("use_disel kept:", hasattr(helper, "disel") or hasattr(helper, "use_disel"))
try:
    LoRAModel.from_local_checkpoint(sys.argv[1], set(sys.argv[2].split(",")), peft_helper=helper, lora_model_id=1,
                                    device="cpu", dtype=torch.float32)
except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_without_the_plugin_vllm_refuses_the_gate_weights(reference_dir):
    """vLLM alone drops `use_disel` from the config and refuses the gate tensors (its exact error text is printed)."""
    path = reference_dir / "disel_a"
    proc = subprocess.run(
        [sys.executable, "-c", NO_PLUGIN, str(path), ",".join(sorted(EXPECTED))],
        env={**os.environ, "VLLM_PLUGINS": ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    print(proc.stdout)
    assert "use_disel kept: False" in proc.stdout
    assert re.search(r"ValueError: (base_model\.model\.)?model\.layers\.\d\.\S+\.lora_disel_gate\.(weight|bias) is "
                     r"unsupported LoRA weight", proc.stdout)  # fmt: skip
