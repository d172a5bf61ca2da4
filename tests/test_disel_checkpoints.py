# Copyright 2026-present the HuggingFace Inc. team.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Tests of DISeL checkpoints in other formats: the reference `disel` package (github.com/alizindari/DISeL), converted
with `python -m peft.tuners.lora.disel_checkpoints`, and the first release of this build (disel.1).

The fixtures are written here from that package's documented format (see `disel_checkpoints.py`), and the expected
outputs are computed directly from the fixture tensors with the reference's math: per linear layer `base(x) + scaling *
B(sigmoid(s * (W_g x + b_g)) * A x)` (`W_g = U V` for a bottleneck gate, `s = 1/sqrt(d_in)` with
`disel_gate_normalize`), and plain, ungated LoRA on embedding layers.
"""

import json
import math
import os
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file as safe_save_file
from torch import nn

from peft import DiselConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import disel_checkpoints


NUM_EMBEDDINGS, DIM, HIDDEN, OUT = 16, 12, 10, 6
LINEAR_LAYERS = {"lin0": (DIM, HIDDEN), "lin1": (HIDDEN, OUT)}
R, ALPHA = 4, 8


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(NUM_EMBEDDINGS, DIM)
        self.lin0 = nn.Linear(DIM, HIDDEN)
        self.lin1 = nn.Linear(HIDDEN, OUT)

    def forward(self, ids):
        return self.lin1(torch.relu(self.lin0(self.emb(ids))))


def make_base():
    torch.manual_seed(0)
    return TinyModel().eval()


def reference_config_dict(bottleneck=None, normalize=False, rank_pattern=None):
    # what the reference's `DiselConfig(LoraConfig)` writes: a LoRA config plus the five `disel_gate_*` keys
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": ["emb", "lin0", "lin1"],
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": {},
        "use_dora": False,
        "disel_gate_bias_init": -3.0,
        "disel_gate_normalize": normalize,
        "disel_gate_weight_init": "random",
        "disel_gate_bottleneck_dim": bottleneck,
        "disel_gate_lr_multiplier": 5.0,
    }


def make_reference_tensors(bottleneck=None, rank_pattern=None, seed=1):
    """Random LoRA and gate tensors per layer, keyed by the reference's gate parameter names."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        return torch.randn(*shape, generator=gen) * scale

    layers = {"emb": {"A": rand(R, NUM_EMBEDDINGS), "B": rand(DIM, R), "r": R}}
    for name, (d_in, d_out) in LINEAR_LAYERS.items():
        r = (rank_pattern or {}).get(name, R)
        gate = {}
        if bottleneck is None:
            gate["linear.weight"] = rand(r, d_in)
            gate["linear.bias"] = rand(r)
        else:
            gate["proj_down.weight"] = rand(bottleneck, d_in)
            gate["proj_up.weight"] = rand(r, bottleneck)
            gate["proj_up.bias"] = rand(r)
        layers[name] = {"A": rand(r, d_in), "B": rand(d_out, r), "r": r, "gate": gate}
    return layers


def write_reference_checkpoint(path, layers, config_dict, layout="adapter", container="lora_disel_gate"):
    """Write a reference checkpoint directory. `layout` says where the gates go: "adapter" (in
    adapter_model.safetensors, without adapter name), "safetensors" (gate_weights.safetensors) or "pt" (legacy
    gate_weights.pt), both with the adapter name.
    """
    os.makedirs(path, exist_ok=True)
    adapter, gates = {}, {}
    emb = layers["emb"]
    adapter["base_model.model.emb.lora_embedding_A"] = emb["A"]
    adapter["base_model.model.emb.lora_embedding_B"] = emb["B"]
    for name in LINEAR_LAYERS:
        layer = layers[name]
        adapter[f"base_model.model.{name}.lora_A.weight"] = layer["A"]
        adapter[f"base_model.model.{name}.lora_B.weight"] = layer["B"]
        for param, value in layer["gate"].items():
            if layout == "adapter":
                adapter[f"base_model.model.{name}.{container}.{param}"] = value
            else:
                gates[f"base_model.model.{name}.{container}.default.{param}"] = value
    safe_save_file(adapter, os.path.join(path, "adapter_model.safetensors"))
    if layout == "safetensors":
        safe_save_file(gates, os.path.join(path, "gate_weights.safetensors"))
    elif layout == "pt":
        torch.save(gates, os.path.join(path, "gate_weights.pt"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config_dict, f)


def reference_forward(base, layers, ids, normalize):
    """The reference package's forward, computed from the fixture tensors."""
    emb = layers["emb"]
    h = base.emb(ids) + F.embedding(ids, emb["A"].T) @ emb["B"].T * (ALPHA / emb["r"])  # embeddings: ungated LoRA
    for name in LINEAR_LAYERS:
        layer, gate = layers[name], layers[name]["gate"]
        base_layer = getattr(base, name)
        if "linear.weight" in gate:
            logits = h @ gate["linear.weight"].T + gate["linear.bias"]
        else:
            logits = (h @ gate["proj_down.weight"].T) @ gate["proj_up.weight"].T + gate["proj_up.bias"]
        if normalize:
            logits = logits / math.sqrt(base_layer.in_features)  # the reference scales the bias too
        delta = (torch.sigmoid(logits) * (h @ layer["A"].T)) @ layer["B"].T * (ALPHA / layer["r"])
        h = base_layer(h) + delta
        if name == "lin0":
            h = torch.relu(h)
    return h


def load_converted(src, dst):
    """Convert with the command-line entry point, then load with plain `PeftModel.from_pretrained`."""
    assert disel_checkpoints.main([str(src), str(dst)]) == 0
    model = PeftModel.from_pretrained(make_base(), str(dst)).eval()
    return model, model.peft_config["default"]


IDS = torch.tensor([[0, 3, 5, 15], [7, 1, 2, 9]])

CASES = {
    # (gate_bottleneck_dim, gate_normalize, rank_pattern, layout, container)
    "full-in-adapter": (None, False, None, "adapter", "lora_disel_gate"),
    "bottleneck-normalize-in-adapter": (2, True, {"lin1": 3}, "adapter", "lora_disel_gate"),
    "full-normalize-gate-safetensors": (None, True, None, "safetensors", "lora_disel_gate"),
    "bottleneck-legacy-pt": (2, False, None, "pt", "lora_disel_gate"),
    "legacy-pt-old-container-name": (None, False, None, "pt", "disel_gate"),
}


@pytest.mark.parametrize("case", CASES)
def test_reference_checkpoint_matches_reference_forward(tmp_path, case):
    bottleneck, normalize, rank_pattern, layout, container = CASES[case]
    layers = make_reference_tensors(bottleneck, rank_pattern)
    config_dict = reference_config_dict(bottleneck, normalize, rank_pattern)
    write_reference_checkpoint(tmp_path, layers, config_dict, layout, container)

    model, config = load_converted(tmp_path, tmp_path / "converted")
    assert config.use_disel == DiselConfig(
        gate_bias_init=-3.0, gate_normalize=normalize, gate_bottleneck_dim=bottleneck
    )
    gate = model.base_model.model.lin0.lora_disel_gate["default"]
    assert (gate.weight_up is None) == (bottleneck is None)

    with torch.no_grad():
        expected = reference_forward(make_base(), layers, IDS, normalize)
        torch.testing.assert_close(model(IDS), expected, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            base_out = model(IDS)
    # the check is not vacuous: the adapter changes the output
    assert not torch.allclose(base_out, expected, atol=1e-2)


def test_bottleneck_not_below_rank_is_folded_into_a_full_gate(tmp_path):
    # the reference allows a bottleneck >= r, which this implementation refuses: it becomes the full gate W = U V
    layers = make_reference_tensors(bottleneck=R)
    write_reference_checkpoint(tmp_path, layers, reference_config_dict(bottleneck=R, normalize=True))
    with pytest.warns(UserWarning, match="converted to full gates"):
        model, config = load_converted(tmp_path, tmp_path / "converted")
    assert config.use_disel.gate_bottleneck_dim is None
    assert model.base_model.model.lin0.lora_disel_gate["default"].weight_up is None
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_forward(make_base(), layers, IDS, True), rtol=1e-5, atol=1e-5)


def test_unconverted_reference_checkpoint_gives_the_conversion_command(tmp_path):
    # never a silent plain-LoRA load, and the same answer from every loader
    write_reference_checkpoint(tmp_path, make_reference_tensors(), reference_config_dict())
    for load in (
        lambda: PeftModel.from_pretrained(make_base(), str(tmp_path)),
        lambda: PeftConfig.from_pretrained(str(tmp_path)),
        lambda: LoraConfig.from_pretrained(str(tmp_path)),
    ):
        with pytest.raises(ValueError, match=r"python -m peft\.tuners\.lora\.disel_checkpoints <reference checkpoint"):
            load()


@pytest.mark.parametrize("module", ["disel_checkpoints", "disel_reference"])  # the command of the first releases too
def test_command_line(tmp_path, module):
    layers = make_reference_tensors(bottleneck=2)
    config = reference_config_dict(bottleneck=2, normalize=True)
    config["disel_gate_lr_multiplier"] = 3.0
    write_reference_checkpoint(tmp_path / "ref", layers, config, layout="safetensors")
    (tmp_path / "ref" / "README.md").write_text("my adapter")
    cmd = [sys.executable, "-m", f"peft.tuners.lora.{module}", str(tmp_path / "ref"), str(tmp_path / "new")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "gate_lr_ratio=3" in out
    assert sorted(os.listdir(tmp_path / "new")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["use_disel"]["gate_bottleneck_dim"] == 2 and not any(k.startswith("disel_gate_") for k in saved)
    model = PeftModel.from_pretrained(make_base(), str(tmp_path / "new")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_forward(make_base(), layers, IDS, True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not empty"):  # nothing is overwritten
        disel_checkpoints.main([str(tmp_path / "ref"), str(tmp_path / "new")])


@pytest.mark.parametrize("release", ["disel.1", "disel.2"])
@pytest.mark.parametrize("options", [{}, {"gate_bottleneck_dim": 2, "gate_normalize": True, "gate_bias_init": -5.0}])
def test_adapters_of_earlier_releases_load_exactly(tmp_path, options, release):
    # disel.1 saved `"use_disel": true` and the options in `"disel_config"`, disel.2 the options in `"use_disel"`;
    # both had `gate_weight_init` among them, and the weights had the same keys
    torch.manual_seed(1)
    config = LoraConfig(
        r=R, target_modules=["emb", "lin0", "lin1"], init_lora_weights=False, use_disel=options or True
    )
    model = get_peft_model(make_base(), config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["use_disel"]["gate_weight_init"] = "zero"
    if release == "disel.1":
        saved["disel_config"], saved["use_disel"] = saved["use_disel"], True
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unexpected keyword" warning: nothing is dropped
        loaded = PeftModel.from_pretrained(make_base(), str(tmp_path)).eval()
    assert loaded.peft_config["default"].use_disel == DiselConfig(**options)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_a_plain_lora_adapter_loads_without_any_disel_code(tmp_path):
    # a file named like a reference gate file is left alone, and the conversion module is never imported
    base = "torch.manual_seed(0); base = torch.nn.Sequential(torch.nn.Linear(12, 10))"
    save = "\n".join(
        [
            f"import torch; from peft import LoraConfig, get_peft_model; {base}",
            'config = LoraConfig(target_modules=["0"], init_lora_weights=False)',
            f"get_peft_model(base, config).save_pretrained({str(tmp_path)!r})",
        ]
    )
    subprocess.run([sys.executable, "-c", save], check=True)
    clash = {"base_model.model.0.lora_A.weight": torch.zeros(8, 12)}
    safe_save_file(clash, str(tmp_path / "gate_weights.safetensors"))
    load = "\n".join(
        [
            f"import sys, torch; from peft import PeftModel; {base}",
            f"model = PeftModel.from_pretrained(base, {str(tmp_path)!r})",
            'print(float(model.base_model.model[0].lora_A["default"].weight.abs().sum()),',
            '      "disel_checkpoints" in str(sys.modules))',
        ]
    )
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) > 0 and out[1] == "False"  # the saved lora_A, not the file's zeros


def test_config_detection_and_conversion():
    ref = reference_config_dict(bottleneck=2, normalize=True)
    ref["disel_gate_lr_multiplier"] = 3.0
    assert disel_checkpoints.is_reference_disel_config(ref)
    converted = disel_checkpoints.convert_reference_disel_config(ref)
    assert not set(disel_checkpoints.REFERENCE_CONFIG_KEYS) & set(converted)
    assert converted["use_disel"] == {
        "gate_bias_init": -3.0,
        "gate_normalize": True,
        "gate_bottleneck_dim": 2,
    }
    assert ref["disel_gate_lr_multiplier"] == 3.0  # the input is left alone
    assert disel_checkpoints.get_reference_gate_lr_ratio(ref) == 3.0
    assert disel_checkpoints.get_reference_gate_lr_ratio({"peft_type": "LORA"}) == 5.0

    # our own configs and other methods are no reference configs
    ours = LoraConfig(r=4, use_disel=True).to_dict()
    assert not disel_checkpoints.is_reference_disel_config(ours)
    assert not disel_checkpoints.is_reference_disel_config({"peft_type": "LORA", "r": 8})
    assert not disel_checkpoints.is_reference_disel_config({"peft_type": "IA3", "disel_gate_normalize": True})
    with pytest.raises(ValueError, match="Not a DISeL config"):
        disel_checkpoints.convert_reference_disel_config(ours)
    with pytest.raises(ValueError, match="both"):
        disel_checkpoints.convert_reference_disel_config({**ref, "use_disel": True})

    # missing reference keys take the reference's defaults
    partial = disel_checkpoints.convert_reference_disel_config({"peft_type": "LORA", "disel_gate_normalize": True})
    assert partial["use_disel"] == {
        "gate_bias_init": -3.0,
        "gate_normalize": True,
        "gate_bottleneck_dim": None,
    }


def test_state_dict_conversion_keys_and_values():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 9, generator=gen), torch.randn(4, generator=gen)
    other = torch.randn(4, 9, generator=gen)
    state_dict = {
        "base_model.model.a.lora_A.weight": other,
        "base_model.model.a.lora_disel_gate.linear.weight": weight,
        "base_model.model.a.lora_disel_gate.linear.bias": bias,
        "base_model.model.b.lora_disel_gate.weight": weight,  # already our format: unchanged
    }
    converted = disel_checkpoints.convert_reference_disel_state_dict(state_dict, gate_normalize=True)
    assert set(converted) == {
        "base_model.model.a.lora_A.weight",
        "base_model.model.a.lora_disel_gate.weight",
        "base_model.model.a.lora_disel_gate.bias",
        "base_model.model.b.lora_disel_gate.weight",
    }
    assert converted["base_model.model.a.lora_A.weight"] is other
    assert torch.equal(converted["base_model.model.a.lora_disel_gate.weight"], weight)
    torch.testing.assert_close(converted["base_model.model.a.lora_disel_gate.bias"], bias / 3.0)
    assert len(state_dict) == 4 and "base_model.model.a.lora_disel_gate.linear.weight" in state_dict
    assert not disel_checkpoints.is_reference_disel_state_dict(converted)


@pytest.mark.parametrize(
    "state_dict, kwargs, match",
    [
        ({"m.lora_disel_gate.default.foo.weight": torch.zeros(2, 3)}, {}, r"m\.lora_disel_gate\.default\.foo\.weight"),
        ({"m.lora_disel_gate.default.weight": torch.zeros(2, 3)}, {}, r"m\.lora_disel_gate\.default\.weight"),
        ({"m.lora_disel_gate.linear.bias": torch.zeros(2)}, {"gate_normalize": True}, "missing"),
        (
            {
                "m.lora_disel_gate.a.linear.weight": torch.zeros(2, 3),
                "m.lora_disel_gate.b.linear.bias": torch.zeros(2),
            },
            {},
            "several adapters",
        ),
        (
            {"m.lora_disel_gate.linear.weight": torch.zeros(2, 3), "m.lora_disel_gate.proj_up.bias": torch.zeros(2)},
            {},
            "mix",
        ),
        ({"m.lora_disel_gate.linear.weight": torch.zeros(2, 3)}, {"gate_bottleneck_dim": 1}, "full gate cannot"),
        ({"m.lora_disel_gate.proj_down.weight": torch.zeros(2, 3)}, {"gate_bottleneck_dim": 1}, "bottleneck size 2"),
        ({"m.lora_disel_gate.proj_up.weight": torch.zeros(2, 3)}, {}, "proj_down.weight"),
    ],
)
def test_state_dict_conversion_errors(state_dict, kwargs, match):
    with pytest.raises(ValueError, match=match):
        disel_checkpoints.convert_reference_disel_state_dict(state_dict, **kwargs)


def test_gate_files(tmp_path):
    assert disel_checkpoints.find_reference_gate_files(tmp_path) == []
    gates = {"base_model.model.lin0.lora_disel_gate.default.linear.bias": torch.arange(3.0)}
    torch.save(gates, tmp_path / "gate_weights.pt")
    safe_save_file(gates, str(tmp_path / "gate_weights.safetensors"))
    found = disel_checkpoints.find_reference_gate_files(tmp_path)
    assert found == [str(tmp_path / "gate_weights.safetensors"), str(tmp_path / "gate_weights.pt")]
    for path in found:
        loaded = disel_checkpoints.load_reference_gate_file(path)
        assert loaded.keys() == gates.keys() and torch.equal(*loaded.values(), *gates.values())

    # the adapter's own gates take precedence, as in the reference; otherwise the first gate file is merged
    own = {"base_model.model.lin0.lora_disel_gate.linear.bias": torch.ones(3)}
    assert disel_checkpoints.merge_reference_gate_files(own, tmp_path) == own
    assert disel_checkpoints.merge_reference_gate_files({}, tmp_path).keys() == gates.keys()
    clash_dir = tmp_path / "clash"
    clash_dir.mkdir()
    safe_save_file({**gates, "x.lora_A.weight": torch.ones(1)}, str(clash_dir / "gate_weights.safetensors"))
    with pytest.raises(ValueError, match="too"):
        disel_checkpoints.merge_reference_gate_files({"x.lora_A.weight": torch.zeros(1)}, clash_dir)


def test_legacy_pt_is_loaded_without_unpickling_objects(tmp_path):
    # weights_only=True: an arbitrary pickled object is refused, not executed
    path = tmp_path / "gate_weights.pt"
    torch.save({"gate": torch.ones(1), "obj": warnings.WarningMessage("m", UserWarning, "f", 1)}, path)
    with pytest.raises(pickle.UnpicklingError):
        disel_checkpoints.load_reference_gate_file(path)
    torch.save({"gate": torch.ones(1), "step": 3}, path)
    with pytest.raises(ValueError, match="flat mapping"):
        disel_checkpoints.load_reference_gate_file(path)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: LoraConfig(use_disel=True, disel_config={"gate_bias_init": -4.0, "gate_lr_ratio": 2.0}),
            (
                "write `LoraConfig(use_disel=DiselConfig(gate_bias_init=-4.0))`, and the gate learning rate goes to "
                "create_disel_optimizer(..., gate_lr_ratio=2.0)"
            ),
        ),
        (
            lambda: DiselConfig(gate_lr_ratio=2.0),
            "create_disel_optimizer(model, torch.optim.AdamW, lr=..., gate_lr_ratio=2.0)",
        ),
        (
            lambda: DiselConfig(gate_weight_init="zero"),
            "`gate_weight_init` is no `DiselConfig` option since release disel.3",
        ),
    ],
)
def test_code_of_earlier_releases_gets_the_current_form(call, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        call()
    with pytest.raises(TypeError, match="unexpected keyword argument 'gate_temperature'"):
        LoraConfig(gate_temperature=1.0)  # any other unknown argument: Python's own error
