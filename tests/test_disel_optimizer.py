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
"""Tests of `create_disel_optimizer`, which trains the DISeL gates at their own learning rate. The models are tiny
and built locally."""

import importlib.util

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from peft import LoraConfig, get_peft_model
from peft.optimizers import create_disel_optimizer


# peft_model.py reads `is_gradient_checkpointing`, deprecated in transformers 5 (upstream issue, not DISeL's)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LR = 2e-4


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


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


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


def param_group_of(optimizer, param):
    groups = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    assert len(groups) == 1
    return groups[0]


class TestCreateDiselOptimizer:
    def test_groups_one_adapter(self):
        model = disel_mlp(modules_to_save=["lin2"])
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=LR, weight_decay=0.1, eps=1e-7)

        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert optimized == {id(params[n]) for n in trainable}
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)

        for name in trainable:
            group = param_group_of(optimizer, params[name])
            if ".lora_disel_gate." in name:
                assert group["lr"] == pytest.approx(LR * 5.0)
                assert group["weight_decay"] == 0.0
            elif name.endswith("bias"):
                assert (group["lr"], group["weight_decay"]) == (LR, 0.0)
            else:
                assert (group["lr"], group["weight_decay"]) == (LR, 0.1)
        # modules_to_save of lin2 (weight and bias) are trained, the original copy and the base weights are not
        assert "base_model.model.lin2.modules_to_save.default.weight" in trainable
        assert "base_model.model.lin2.modules_to_save.default.bias" in trainable
        assert not any("base_layer" in n or "original_module" in n for n in trainable)
        assert {g["eps"] for g in optimizer.param_groups} == {1e-7}
        # both gate weight and bias, in both layers
        gate_names = [n for n in trainable if ".lora_disel_gate." in n]
        assert len(gate_names) == 4

    def test_gate_lr_ratio_applies_to_all_adapters(self):
        model = disel_mlp()
        model.add_adapter("other", LoraConfig(r=2, target_modules=["lin1"], use_disel=True))
        model.base_model.set_adapter(["default", "other"])  # both adapters trainable
        optimizer = create_disel_optimizer(model, torch.optim.SGD, lr=LR, gate_lr_ratio=10.0)
        gate_groups = [g for g in optimizer.param_groups if g["lr"] != LR]
        assert len(gate_groups) == 1
        assert gate_groups[0]["lr"] == pytest.approx(LR * 10.0)
        assert gate_groups[0]["weight_decay"] == 0.0
        assert len(gate_groups[0]["params"]) == 6

    @pytest.mark.parametrize("ratio", [0, -1.0, "5", True])
    def test_invalid_gate_lr_ratio_raises(self, ratio):
        with pytest.raises(ValueError, match="`gate_lr_ratio` must be a positive number"):
            create_disel_optimizer(disel_mlp(), torch.optim.SGD, lr=LR, gate_lr_ratio=ratio)

    def test_half_precision_gates_warn(self):
        model = disel_mlp().to(torch.bfloat16)
        with pytest.warns(UserWarning, match="DISeL gates are trained in torch.bfloat16"):
            create_disel_optimizer(model, torch.optim.SGD, lr=LR)

    def test_only_the_trainable_adapter(self):
        model = disel_mlp()
        model.add_adapter("other", LoraConfig(r=2, target_modules=["lin1"], use_disel=True))
        # `add_adapter` leaves "default" active and trainable, "other" frozen
        optimizer = create_disel_optimizer(model, torch.optim.SGD, lr=LR)
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for name, param in model.named_parameters():
            assert (id(param) in optimized) == param.requires_grad, name
            if ".other." in name:
                assert id(param) not in optimized

    @pytest.mark.parametrize("which", ["peft_model", "lora_model", "base_model"])
    def test_peft_model_or_its_base_model(self, which):
        model = disel_mlp()
        target = {"peft_model": model, "lora_model": model.base_model, "base_model": model.get_base_model()}[which]
        optimizer = create_disel_optimizer(target, torch.optim.SGD, lr=LR, gate_lr_ratio=3.0)
        gate = model.base_model.model.lin0.lora_disel_gate["default"].weight
        assert param_group_of(optimizer, gate)["lr"] == pytest.approx(LR * 3.0)
        assert sum(len(g["params"]) for g in optimizer.param_groups) == 8  # A, B, gate weight and bias, 2 layers

    def test_norm_weights_get_no_weight_decay(self):
        model = get_peft_model(
            tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_disel=True, modules_to_save=["model.norm"])
        )
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=LR, weight_decay=0.1)
        norm = model.base_model.model.model.norm.modules_to_save["default"].weight
        lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
        assert param_group_of(optimizer, norm)["weight_decay"] == 0.0
        assert param_group_of(optimizer, lora_a)["weight_decay"] == 0.1

    def test_refuses_model_without_gates(self):
        torch.manual_seed(0)
        model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
        with pytest.raises(
            ValueError, match=r"no DISeL gate.*LoraConfig\(use_disel=True\).*create_loraplus_optimizer"
        ):
            create_disel_optimizer(model, torch.optim.AdamW, lr=LR)

    def test_refuses_frozen_gates(self):
        model = disel_mlp()
        for name, param in model.named_parameters():
            if "lora_disel_gate" in name:
                param.requires_grad_(False)
        with pytest.raises(ValueError, match="none of them is trainable"):
            create_disel_optimizer(model, torch.optim.AdamW, lr=LR)


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
        "learning_rate": LR,
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


class TestTrainerIntegration:
    def test_trainer_with_disel_optimizer(self, tmp_path):
        model = disel_llama()
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
        gates_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_disel_gate" in n}
        frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

        trainer = Trainer(
            model=model, args=training_args(tmp_path), train_dataset=causal_lm_dataset(), optimizers=(optimizer, None)
        )
        trainer.train()

        assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate wraps it
        initial_lrs = sorted({g["initial_lr"] for g in optimizer.param_groups})
        assert initial_lrs == [pytest.approx(1e-2), pytest.approx(5e-2)]
        assert len(gates_before) == 12
        for name, before in gates_before.items():
            assert not torch.equal(before, dict(model.named_parameters())[name]), name
        for name, before in frozen_before.items():
            assert torch.equal(before, dict(model.named_parameters())[name]), name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_qlora_4bit_base(tmp_path):
    # the QLoRA recipe: a 4-bit base prepared for k-bit training, DISeL on top, the gates at their own learning rate
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft import prepare_model_for_kbit_training

    tiny_llama().save_pretrained(tmp_path)
    quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config, device_map="cpu")
    model = get_peft_model(
        prepare_model_for_kbit_training(base), LoraConfig(r=4, target_modules=["q_proj"], use_disel=True)
    )
    optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_disel_gate.default.bias")}
    params = dict(model.named_parameters())
    assert [param_group_of(optimizer, params[n])["lr"] for n in biases] == [pytest.approx(5e-2)] * len(biases)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, biases[n]) for n, p in model.named_parameters() if n in biases)
