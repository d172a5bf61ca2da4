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
"""Tests of DISeL that this build runs beyond the pull request's tests/test_disel.py: what PEFT's shared test matrices
already cover for the DISeL rows, a Trainer run, torch.compile and a torchao base."""

import importlib.util

import pytest
import torch

from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_disel_optimizer

from .test_disel import X, gate_params, get_model, tiny_llama


pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
class TestDiselTorchao:
    # DISeL on a torchao int8 weight-only base: TorchaoLoraLinear runs Linear's variants (on the CPU too)
    def load_base(self, path):
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig

        config = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")

    def test_train_save_load_and_merge_refused(self, tmp_path):
        tiny_llama().save_pretrained(tmp_path / "base")
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_disel=True)
        model = get_peft_model(self.load_base(tmp_path / "base"), config)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == "TorchaoLoraLinear"
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2)
        ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
        model.train()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert not torch.equal(layer.lora_disel_gate["default"].bias, torch.full((4,), -3.0))
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        with pytest.raises(NotImplementedError, match="Cannot merge adapter 'default'"):
            layer.merge()  # the layer's own merge, which reads no variant merge method
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, logits)
        model.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(self.load_base(tmp_path / "base"), tmp_path / "adapter").eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, logits)


class TestDiselLayerMore:
    def test_torch_compile_matches_eager(self):
        # the gate's module call for each gate form, under inductor
        for options in ({"gate_normalize": True}, {"gate_bottleneck_dim": 3, "gate_normalize": True}):
            model = get_model(use_disel=options)
            torch._dynamo.reset()
            with torch.no_grad():
                torch.testing.assert_close(torch.compile(model)(X), model(X), rtol=1e-4, atol=1e-5)

    def test_gate_placement_and_dtype(self):
        model = get_model(use_disel={"gate_bottleneck_dim": 3})
        gate = model.base_model.model.lin0.lora_disel_gate["default"]
        assert gate.weight.shape == (3, 64) and gate.weight_up.shape == (8, 3) and gate.bias.shape == (8,)
        assert torch.equal(gate.bias, torch.full((8,), -3.0))
        assert "lora_disel_gate" in model.base_model.model.lin0.adapter_layer_names


class TestDiselModelMore:
    def test_unload_and_disable_adapter(self):
        model = get_model()
        with torch.no_grad():
            adapted = model(X)
            with model.disable_adapter():
                base = model(X)
            torch.testing.assert_close(base, get_model(use_disel=False).unload()(X))  # the same base weights
            assert not torch.allclose(adapted, base)
            torch.testing.assert_close(model.unload()(X), base)

    def test_gates_follow_add_set_delete_adapter(self):
        model = get_model()
        model.add_adapter("other", LoraConfig(target_modules=["lin1"], use_disel={"gate_bottleneck_dim": 2}))
        model.set_adapter("other")
        trainable = {n for n, p in gate_params(model).items() if p.requires_grad}
        assert trainable == {
            f"base_model.model.lin1.lora_disel_gate.other.{p}" for p in ("weight", "weight_up", "bias")
        }
        model.delete_adapter("default")
        assert all(".other." in name for name in gate_params(model))

    def test_mixed_batch_equals_each_adapter_alone(self):
        model = get_model(adapter_kwargs={"adapter_name": "plain"}, use_disel=False)
        model.add_adapter(
            "disel", LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, use_disel=True)
        )
        alone = {}
        with torch.no_grad():
            for name in ("plain", "disel"):
                model.set_adapter(name)
                alone[name] = model(X[:2])
            mixed = model(X[:2], adapter_names=["disel", "plain"])
        torch.testing.assert_close(mixed[0], alone["disel"][0])
        torch.testing.assert_close(mixed[1], alone["plain"][1])


class TestDiselOptimizerMore:
    def test_trainer_keeps_the_gate_learning_rate(self, tmp_path):
        from transformers import Trainer, TrainingArguments

        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], use_disel=True))
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2)
        ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(0))
        data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}] * 4
        args = TrainingArguments(tmp_path, max_steps=3, per_device_train_batch_size=2, report_to=[], use_cpu=True)
        Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
        assert sorted({g["initial_lr"] for g in optimizer.param_groups}) == [pytest.approx(1e-2), pytest.approx(5e-2)]
        assert all(not torch.equal(p, torch.full_like(p, -3.0)) for n, p in gate_params(model).items() if "bias" in n)
