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
"""Tests of the DISeL gate diagnostics: the gate recorder, its plot and the Trainer callback."""

import json
import sys

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from peft import LoraConfig, get_peft_model
from peft.tuners.lora.disel_diagnostics import (
    DiselGateCallback,
    DiselGateRecorder,
    DiselGateStats,
    plot_disel_gates,
)

from .test_disel import tiny_llama


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 2)

    def forward(self, X):
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(X)))))


class EmbConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)

    def forward(self, ids, image):
        return self.emb(ids).sum(), self.conv(image)


def disel_mlp(**kwargs):
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["lin0", "lin1"], use_disel=True, **kwargs)
    return get_peft_model(MLP(), config)


def spread_gates(model, std=2.0):
    # the default gates start almost closed (bias -3); spread them over (0, 1) so that the statistics are not trivial
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_disel_gate." in name and name.endswith(".bias"):
                param.normal_(0.0, std)


def assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


def causal_lm_dataset(num=8, seq_len=12, vocab=(0, 64), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(*vocab, (seq_len,), generator=gen)
    # the same sample everywhere, so that every training batch is known
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for _ in range(num)]


def training_args(tmp_path, **kwargs):
    defaults = {
        "output_dir": str(tmp_path),
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "learning_rate": 2e-4,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": 0,
    }
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


def disel_llama():
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_disel=True, task_type="CAUSAL_LM")
    return get_peft_model(tiny_llama(), config)


# peft_model.py reads `is_gradient_checkpointing`, deprecated in transformers 5 (upstream issue, not DISeL's)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class TestDiselGateCallback:
    def test_callback_logs_mean_gate(self, tmp_path):
        model = disel_llama()
        spread_gates(model)
        dataset = causal_lm_dataset()
        batch = {k: torch.stack([dataset[0][k], dataset[1][k]]) for k in dataset[0]}  # every training batch
        expected, seen = [], []

        gated = {name: m for name, m in model.named_modules() if "default" in getattr(m, "lora_disel_gate", {})}
        start = {name: m.lora_disel_gate["default"].bias.detach().clone() for name, m in gated.items()}

        class Expect(TrainerCallback):
            # the mean gate of the batch with the parameters of this step, from the layer inputs and the formula
            # sigmoid(W_g x + b_g), before the callback's hooks attach (every layer sees the same tokens and ranks)
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                inputs = {}
                hooks = [
                    m.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0]))
                    for name, m in gated.items()
                ]
                with torch.no_grad():
                    model(**batch)
                for hook in hooks:
                    hook.remove()
                gates = [m.lora_disel_gate["default"] for m in gated.values()]
                openings = [torch.sigmoid(inputs[n] @ g.weight.T + g.bias) for n, g in zip(gated, gates)]
                expected.append(torch.stack([o.mean() for o in openings]).mean().item())

        class Spy(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                seen.append(dict(logs))

        trainer = Trainer(
            model=model, args=training_args(tmp_path, learning_rate=5e-2), train_dataset=dataset, callbacks=[Spy()]
        )
        # first, so that the `report_to` integrations would see the values too
        trainer.callback_handler.callbacks.insert(0, DiselGateCallback(per_module_type=True))
        trainer.callback_handler.callbacks.insert(0, Expect())
        trainer.train()

        step_logs = [logs for logs in seen if "loss" in logs]
        assert len(step_logs) == len(expected) == 3
        for logs in step_logs:
            assert 0.0 < logs["disel/mean_gate"] < 1.0
            assert 0.0 <= logs["disel/frac_open"] <= 1.0
            assert {"disel/mean_gate/q_proj", "disel/mean_gate/v_proj", "disel/mean_gate/down_proj"} <= logs.keys()
        # each log holds the openings of its own step only
        assert [logs["disel/mean_gate"] for logs in step_logs] == pytest.approx(expected, rel=1e-5)
        # the gates moved, which only their gradient can do (no weight decay here)
        assert all(not torch.equal(m.lora_disel_gate["default"].bias, start[name]) for name, m in gated.items())
        history = [h for h in trainer.state.log_history if "loss" in h]
        assert [h["disel/mean_gate"] for h in history] == [logs["disel/mean_gate"] for logs in step_logs]
        assert_no_hooks(model)


class TestDiselGateRecorder:
    def test_values_equal_direct_computation(self):
        model = disel_mlp()
        spread_gates(model)
        layer = model.base_model.model.lin1
        captured = []
        handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
        x = torch.randn(6, 10)
        with DiselGateRecorder(model, threshold=0.5, bins=10, keep_values=True) as recorder:
            model(x)
        handle.remove()

        with torch.no_grad():
            direct = torch.sigmoid(layer.lora_disel_gate["default"](captured[0]))
        stats = recorder.stats()
        entry = stats.splits["default"]["lin1"]
        assert torch.equal(entry["values"], direct)
        assert entry["count"] == 6
        torch.testing.assert_close(entry["mean"], direct.mean(0))
        torch.testing.assert_close(entry["frac_above"], (direct > 0.5).float().mean(0))
        expected_hist = torch.stack([torch.histc(direct[:, j], bins=10, min=0, max=1) for j in range(4)])
        assert entry["hist"].dtype == torch.int64
        torch.testing.assert_close(entry["hist"], expected_hist.long())
        assert 0.0 < entry["frac_above"].mean() < 1.0  # not a trivial case
        assert stats.layer_names() == ["lin0", "lin1"]
        by_type = stats.by_module_type("default")
        assert by_type["lin1"]["mean"] == pytest.approx(direct.double().mean().item(), rel=1e-5)
        assert by_type["lin1"]["count"] == 24

    def test_values_use_the_cast_input(self):
        # adapter weights in bfloat16, input in float32: the layer casts the input before the gate, so must the recorder
        model = disel_mlp()
        spread_gates(model)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
        layer = model.base_model.model.lin0
        x = torch.randn(5, 10)
        with DiselGateRecorder(model, keep_values=True) as recorder:
            model(x)
        with torch.no_grad():
            direct = torch.sigmoid(layer.lora_disel_gate["default"](x.to(torch.bfloat16))).float()
        assert torch.equal(recorder.stats().splits["default"]["lin0"]["values"], direct)

    @pytest.mark.parametrize("layer_name", ["emb", "conv"])
    def test_embedding_and_conv(self, layer_name):
        torch.manual_seed(0)
        model = get_peft_model(EmbConv(), LoraConfig(r=3, target_modules=["emb", "conv"], use_disel=True))
        spread_gates(model)
        ids, image = torch.randint(0, 50, (2, 7)), torch.randn(2, 3, 5, 5)
        with DiselGateRecorder(model, keep_values=True) as recorder:
            model(ids, image)
        layer = getattr(model.base_model.model, layer_name)
        with torch.no_grad():
            direct = torch.sigmoid(layer.lora_disel_gate["default"](ids if layer_name == "emb" else image))
        if layer_name == "conv":
            direct = direct.movedim(1, -1)  # (batch, r, h, w): one gate vector per output position
        entry = recorder.stats().splits["default"][layer_name]
        # the conv layer computes A and the gate as one convolution: equal up to rounding
        torch.testing.assert_close(entry["values"], direct.reshape(-1, 3), rtol=1e-6, atol=1e-7)
        assert entry["count"] == (14 if layer_name == "emb" else 50)

    @pytest.mark.parametrize("train", [False, True])
    def test_outputs_unchanged_and_hooks_removed(self, train):
        model = get_peft_model(
            tiny_llama(),
            # random lora_B, so that the output depends on the gates and on the dropout mask (the RNG)
            LoraConfig(r=4, target_modules="all-linear", use_disel=True, lora_dropout=0.1, init_lora_weights=False),
        )
        spread_gates(model)
        model.train(train)
        ids = torch.randint(0, 128, (2, 9))
        torch.manual_seed(123)
        expected = model(input_ids=ids).logits
        torch.manual_seed(123)
        with DiselGateRecorder(model) as recorder:
            assert recorder.recording
            actual = model(input_ids=ids).logits
        if train:  # dropout is active: both runs take the plain path of module calls
            assert torch.equal(actual, expected)
        else:  # the recorded layers call the gate instead of the fused A+gate projection: the same up to rounding
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        if train:  # the dropout draws from the RNG: a recorder that touched it would change the output
            torch.manual_seed(124)
            assert not torch.equal(model(input_ids=ids).logits, expected)
        assert not recorder.recording
        assert_no_hooks(model)
        assert len(recorder.stats().splits["default"]) == 14

    def test_hooks_removed_on_exception(self):
        model = disel_mlp()
        with pytest.raises(RuntimeError, match="boom"), DiselGateRecorder(model):
            model(torch.randn(2, 10))
            raise RuntimeError("boom")
        assert_no_hooks(model)

    def test_nothing_recorded_outside_the_context(self):
        model = disel_mlp()
        recorder = DiselGateRecorder(model)
        model(torch.randn(2, 10))
        with recorder:
            model(torch.randn(3, 10))
        model(torch.randn(4, 10))
        assert recorder.stats().splits["default"]["lin0"]["count"] == 3

    def test_splits_are_separate(self):
        model = disel_mlp()
        spread_gates(model)
        x_in, x_ood = torch.randn(4, 10), torch.randn(3, 10) * 5 + 2
        with DiselGateRecorder(model, split="in-domain") as recorder:
            model(x_in)
            recorder.set_split("out-of-domain")
            model(x_ood)
            recorder.set_split("in-domain")
            model(x_in)
        stats = recorder.stats()
        for x, split, times in ((x_in, "in-domain", 2), (x_ood, "out-of-domain", 1)):
            with DiselGateRecorder(model) as alone:
                model(x)
            reference = alone.stats().splits["default"]
            for name in ("lin0", "lin1"):
                assert stats.splits[split][name]["count"] == times * len(x)
                torch.testing.assert_close(stats.splits[split][name]["mean"], reference[name]["mean"])
                torch.testing.assert_close(stats.splits[split][name]["hist"], times * reference[name]["hist"])
        assert stats.mean_gate("in-domain") != pytest.approx(stats.mean_gate("out-of-domain"))

    def test_mask(self):
        model = disel_mlp()
        spread_gates(model)
        x = torch.randn(2, 5, 10)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
        with DiselGateRecorder(model, keep_values=True) as recorder:
            recorder.set_mask(mask)
            model(x)
        with DiselGateRecorder(model, keep_values=True) as reference:
            model(x[mask.bool()])
        got, want = recorder.stats().splits["default"], reference.stats().splits["default"]
        for name in ("lin0", "lin1"):
            assert got[name]["count"] == 5
            torch.testing.assert_close(got[name]["values"], want[name]["values"])
            torch.testing.assert_close(got[name]["mean"], want[name]["mean"])
            torch.testing.assert_close(got[name]["frac_above"], want[name]["frac_above"])
            torch.testing.assert_close(got[name]["hist"], want[name]["hist"])
        with DiselGateRecorder(model) as recorder:
            recorder.set_mask(torch.ones(3))
            with pytest.raises(ValueError, match="does not match the input"):
                model(x)

    def test_disabled_adapters_and_mixed_batches(self):
        model = disel_mlp()
        model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"], use_disel=True))
        spread_gates(model)
        model.eval()
        x = torch.randn(4, 10)
        with DiselGateRecorder(model, "default") as recorder, model.disable_adapter():
            model(x)  # "default" is active, but the adapters are disabled
        assert recorder.stats().splits == {}
        recorder = DiselGateRecorder(model, "other", keep_values=True)
        with recorder:
            model(x)  # "other" is not active: its gate is not used
        assert recorder.stats().splits == {}
        with recorder:
            model(x, adapter_names=["other", "default", "other", "__base__"])
        layer = model.base_model.model.lin0
        with torch.no_grad():
            direct = torch.sigmoid(layer.lora_disel_gate["other"](x[[0, 2]]))
        stats = recorder.stats()
        assert list(stats.splits["default"]) == ["lin0"]
        assert torch.equal(stats.splits["default"]["lin0"]["values"], direct)

    def test_adapter_choice(self):
        model = disel_mlp()
        model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"], use_disel=True))
        assert DiselGateRecorder(model).adapter_name == "default"
        model.base_model.set_adapter(["default", "other"])
        with pytest.raises(ValueError, match="Pass `adapter_name`"):
            DiselGateRecorder(model)
        assert list(DiselGateRecorder(model, "other").layers) == ["lin0"]
        with pytest.raises(ValueError, match="no DISeL gate for the adapter 'nope'"):
            DiselGateRecorder(model, "nope")
        plain = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
        with pytest.raises(ValueError, match=r"LoraConfig\(use_disel=True\)"):
            DiselGateRecorder(plain)

    def test_to_dict_is_json_and_round_trips(self):
        model = disel_mlp()
        spread_gates(model)
        with DiselGateRecorder(model, keep_values=True) as recorder:
            model(torch.randn(4, 10))
            recorder.set_split("empty-free")
            model(torch.randn(2, 10))
        stats = recorder.stats()
        data = json.loads(json.dumps(stats.to_dict()))
        assert set(data["splits"]) == {"default", "empty-free"}
        assert data["splits"]["default"]["mean_gate"] == pytest.approx(stats.mean_gate("default"))
        assert "values" not in data["splits"]["default"]["layers"]["lin0"]
        assert data["splits"]["default"]["module_types"]["lin1"]["mean"] == pytest.approx(
            stats.by_module_type("default")["lin1"]["mean"]
        )
        restored = DiselGateStats.from_dict(data)
        for split in stats.splits:
            for name, entry in stats.splits[split].items():
                for key in ("mean", "frac_above", "hist"):
                    torch.testing.assert_close(restored.splits[split][name][key], entry[key])


class TestPlot:
    def record(self):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", use_disel=True))
        spread_gates(model, std=1.0)
        with DiselGateRecorder(model, split="in-domain") as recorder:
            model(input_ids=torch.randint(0, 64, (2, 8)))
            recorder.set_split("out-of-domain")
            model(input_ids=torch.randint(64, 128, (2, 8)))
        return recorder.stats()

    def test_plot_writes_png(self, tmp_path):
        stats = self.record()
        path = plot_disel_gates(stats, tmp_path / "sub" / "gates.png")
        data = (tmp_path / "sub" / "gates.png").read_bytes()
        assert path == str(tmp_path / "sub" / "gates.png")
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000
        # also from the JSON form, and for one split
        plot_disel_gates(json.loads(json.dumps(stats.to_dict())), tmp_path / "from_dict.png", splits=["in-domain"])
        assert (tmp_path / "from_dict.png").stat().st_size > 10_000
        with pytest.raises(ValueError, match="No recorded split"):
            plot_disel_gates(stats, tmp_path / "x.png", splits=["nope"])

    def test_plot_without_matplotlib(self, tmp_path, monkeypatch):
        stats = DiselGateStats({}, adapter_name="default", threshold=0.5, bins=20)
        for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
            monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ImportError, match="pip install matplotlib"):
            plot_disel_gates(stats, tmp_path / "gates.png")
        assert not (tmp_path / "gates.png").exists()
