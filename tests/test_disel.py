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
"""Tests of DISeL (`LoraConfig(use_disel=...)`) beyond its rows in the shared test matrices."""

import copy
import json
import re

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from peft import DiselConfig, LoraConfig, PeftConfig, PeftModel, convert_to_lora, get_peft_model
from peft.optimizers import create_disel_optimizer


# PeftModel reads `is_gradient_checkpointing`, which transformers 5 deprecates (an error under the pytest config)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


class MLP(nn.Module):
    def __init__(self, conv1d=False):
        super().__init__()
        # transformers' Conv1D (GPT-2) stores its weight transposed: LoRA treats it as fan_in_fan_out
        self.lin0 = Conv1D(64, 64) if conv1d else nn.Linear(64, 64)
        self.lin1 = nn.Linear(64, 8)

    def forward(self, X):
        return self.lin1(torch.relu(self.lin0(X)))


def get_model(adapter_kwargs=None, conv1d=False, **kwargs):
    torch.manual_seed(0)
    config = {"target_modules": ["lin0", "lin1"], "init_lora_weights": False, "use_disel": True, **kwargs}
    config.setdefault("fan_in_fan_out", conv1d)
    return get_peft_model(MLP(conv1d), LoraConfig(**config), **(adapter_kwargs or {})).eval()


def tiny_llama(dtype=torch.float32):
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype).eval()


X = torch.randn(9, 64, generator=torch.Generator().manual_seed(0))


def gate_params(model):
    return {n: p for n, p in model.named_parameters() if ".lora_disel_gate." in n}


class TestDiselConfig:
    def test_true_means_the_default_options(self, tmp_path):
        config = LoraConfig(target_modules=["lin0"], use_disel=True)
        assert config.use_disel == DiselConfig()
        config.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "adapter_config.json").read_text())["use_disel"]
        assert saved == {"gate_bias_init": -3.0, "gate_normalize": False, "gate_bottleneck_dim": None}
        for loader in (LoraConfig, PeftConfig):
            assert loader.from_pretrained(tmp_path).use_disel == DiselConfig()

    @pytest.mark.parametrize("value", [False, None])
    def test_off_is_saved_as_none(self, tmp_path, value):
        # one "off" value, so that configs compare equal (e.g. for hotswapping) whichever way DISeL was left off
        config = LoraConfig(target_modules=["lin0"], use_disel=value)
        assert config.use_disel is None
        assert config.to_dict() == LoraConfig(target_modules=["lin0"]).to_dict()
        config.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["use_disel"] is None

    def test_options_round_trip(self, tmp_path):
        options = DiselConfig(gate_bias_init=-5, gate_normalize=True, gate_bottleneck_dim=3)
        LoraConfig(target_modules=["lin0"], use_disel=options).save_pretrained(tmp_path)
        assert PeftConfig.from_pretrained(tmp_path).use_disel == options

    def test_unknown_option_warns_and_loads(self, tmp_path):
        # an adapter saved by a later release, with an option this one does not know
        LoraConfig(target_modules=["lin0"], use_disel=DiselConfig(gate_bias_init=-4.0)).save_pretrained(tmp_path)
        path = tmp_path / "adapter_config.json"
        saved = json.loads(path.read_text())
        saved["use_disel"]["gate_temperature"] = 2.0
        path.write_text(json.dumps(saved))
        with pytest.warns(UserWarning, match=r"Unexpected keys \['gate_temperature'\] for DiselConfig"):
            config = LoraConfig.from_pretrained(tmp_path)
        assert config.use_disel == DiselConfig(gate_bias_init=-4.0)

    @pytest.mark.parametrize(
        "use_disel, error",
        [
            ({"gate_bias_init": "low"}, "`gate_bias_init` must be a finite number"),
            ({"gate_bias_init": float("inf")}, "`gate_bias_init` must be a finite number"),
            ({"gate_bias_init": float("nan")}, "`gate_bias_init` must be a finite number"),
            ({"gate_normalize": "yes"}, "`gate_normalize` must be a bool"),
            ({"gate_bottleneck_dim": 0}, "`gate_bottleneck_dim` must be a positive integer"),
            ({"gate_bottleneck_dim": 2.5}, "`gate_bottleneck_dim` must be a positive integer"),
        ],
    )
    def test_invalid_options(self, use_disel, error):
        # refused by DiselConfig itself, whether it is built alone, from `LoraConfig`'s dict or from a saved config
        with pytest.raises((ValueError, TypeError), match=re.escape(error)):
            DiselConfig(**use_disel)
        with pytest.raises((ValueError, TypeError), match=re.escape(error)):
            LoraConfig(use_disel=use_disel)

    def test_invalid_type(self):
        with pytest.raises(TypeError, match="`DiselConfig` must be a `DiselConfig`, a dict, or None"):
            LoraConfig(use_disel="yes")

    @pytest.mark.parametrize(
        "kwargs, error",
        [
            ({"use_dora": True}, "cannot be combined with other LoRA variants"),
            (
                {"init_lora_weights": "pissa"},
                "Use `init_lora_weights=True` (B at zero, the method's recipe), 'gaussian', 'eva' or False",
            ),
            ({"init_lora_weights": "olora"}, "does not support `init_lora_weights='olora'`"),
            ({"lora_bias": True}, "does not support `lora_bias`"),
            ({"target_parameters": ["lin0.weight"], "target_modules": None}, "does not support `target_parameters`"),
            ({"r": 4, "use_disel": {"gate_bottleneck_dim": 4}}, "must be smaller than the rank (r=4)"),
            ({"rank_pattern": {"lin1": 2}, "use_disel": {"gate_bottleneck_dim": 2}}, "smaller than the rank (r=2)"),
            ({"init_lora_weights": "eva", "use_disel": {"gate_bottleneck_dim": 3}}, "EVA redistributes the ranks"),
        ],
    )
    def test_refused_combinations(self, kwargs, error):
        with pytest.raises(ValueError, match=re.escape(error)):
            LoraConfig(**{"target_modules": ["lin0"], "use_disel": True, **kwargs})

    @pytest.mark.parametrize("init", [True, False, "gaussian", "eva"])
    def test_accepted_inits(self, init):
        assert LoraConfig(use_disel=True, init_lora_weights=init).use_disel


class TestDiselLayer:
    @pytest.mark.parametrize("conv1d", [False, True])
    @pytest.mark.parametrize("options", [{}, {"gate_normalize": True}, {"gate_bottleneck_dim": 3}])
    def test_forward_is_the_gated_update(self, conv1d, options):
        model = get_model(conv1d=conv1d, lora_dropout=0.5, use_disel={"gate_bias_init": 0.5, **options})
        layer = model.base_model.model.lin0
        gate = layer.lora_disel_gate["default"]
        w_g = gate.weight if gate.weight_up is None else gate.weight_up @ gate.weight
        norm = 64**-0.5 if options.get("gate_normalize") else 1.0
        with torch.no_grad():
            base = layer.base_layer(X)
            a = layer.lora_A["default"](X)  # eval mode: dropout is the identity
            expected = (
                base
                + layer.lora_B["default"](a * torch.sigmoid(norm * X @ w_g.T + gate.bias)) * layer.scaling["default"]
            )
            torch.testing.assert_close(layer(X), expected)
            # in training, A reads dropout(x) and the gate reads x: zeroed inputs still open gates
            layer.train()
            torch.manual_seed(1)
            out = layer(X)
            torch.manual_seed(1)
            a = layer.lora_A["default"](layer.lora_dropout["default"](X))
            gated = layer.lora_B["default"](a * torch.sigmoid(norm * X @ w_g.T + gate.bias)) * layer.scaling["default"]
            torch.testing.assert_close(out, base + gated)

    def test_gates_get_a_gradient_once_lora_b_moves(self):
        # B starts at zero, so the gates cannot change the output and their gradient is exactly zero at first
        model = get_model(init_lora_weights=True)
        model(X).sum().backward()
        assert all(torch.count_nonzero(p.grad) == 0 for p in gate_params(model).values())
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        model.zero_grad()
        model(X).sum().backward()
        assert all(torch.count_nonzero(p.grad) > 0 for p in gate_params(model).values())

    @pytest.mark.parametrize("layer", [nn.Embedding(10, 64), nn.Conv2d(3, 64, 3), nn.MultiheadAttention(64, 2)])
    def test_unsupported_layers_refused(self, layer):
        with pytest.raises(ValueError, match="DISeL|unsupported variant combination"):
            get_peft_model(nn.Sequential(layer), LoraConfig(target_modules=["0"], use_disel=True))


class TestDiselModel:
    @pytest.mark.parametrize("method", ["merge_adapter", "merge_and_unload", "layer_merge", "layer_safe_merge"])
    def test_merge_refused_before_any_weight_changes(self, method):
        # a plain LoRA adapter first: a merge that did not check every adapter up front would already have merged it
        model = get_model(adapter_kwargs={"adapter_name": "plain"}, use_disel=False, target_modules=["lin0"])
        model.add_adapter("disel", LoraConfig(target_modules=["lin1"], init_lora_weights=False, use_disel=True))
        model.base_model.set_adapter(["plain", "disel"])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(NotImplementedError, match="Cannot merge .*'disel'"):
            if method.startswith("layer"):  # the layer's own merge, which the variant refuses
                model.base_model.model.lin1.merge(safe_merge=method == "layer_safe_merge")
            else:
                getattr(model, method)()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert not any(getattr(m, "merged", False) for m in model.modules())

    def test_convert_to_lora_and_weighted_adapters_refused(self):
        model = get_model()
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            convert_to_lora(model, rank=4)
        model.add_adapter("other", LoraConfig(target_modules=["lin0", "lin1"], use_disel=True))
        with pytest.raises(ValueError, match="add_weighted_adapter does not support DISeL adapters"):
            model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "combined", combination_type="cat")

    def test_hotswap_between_disel_adapters(self, tmp_path):
        from peft.utils.hotswap import hotswap_adapter

        for seed, name in ((1, "a"), (2, "b")):
            model = get_model()
            torch.manual_seed(seed)
            with torch.no_grad():
                for param in gate_params(model).values():
                    param.normal_()  # so that a gate that was not swapped shows in the output
            model.save_pretrained(tmp_path / name)
        base = get_model().unload()  # the base model of the saved adapters
        with torch.no_grad():
            expected = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()(X)
        model = PeftModel.from_pretrained(base, tmp_path / "a").eval()
        hotswap_adapter(model, tmp_path / "b", adapter_name="default")
        with torch.no_grad():
            assert torch.equal(model(X), expected)

    @pytest.mark.parametrize("use_disel", [None, {"gate_normalize": True}])
    def test_hotswap_of_an_adapter_with_another_forward_raises(self, tmp_path, use_disel):
        from peft.utils.hotswap import hotswap_adapter

        get_model(use_disel=use_disel).save_pretrained(tmp_path)
        with pytest.raises(ValueError, match="Configs are incompatible: for use_disel"):
            hotswap_adapter(get_model(), tmp_path, adapter_name="default")

    def test_hotswap_checks_between_plain_lora_configs_unchanged(self):
        # LoraConfig(use_disel=False) and LoraConfig() are the same config
        from peft.utils.hotswap import check_hotswap_configs_compatible

        for value in (False, None):
            check_hotswap_configs_compatible(LoraConfig(), LoraConfig(use_disel=value))

    def test_model_without_disel_adapters_after_delete_is_plain_lora(self, tmp_path):
        # deleting the last DISeL adapter leaves a model that plain LoRA's hotswapping accepts
        from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

        plain = get_model(adapter_kwargs={"adapter_name": "plain"}, use_disel=False)
        plain.save_pretrained(tmp_path)
        model = get_model(adapter_kwargs={"adapter_name": "plain"}, use_disel=False)
        model.add_adapter("disel", LoraConfig(target_modules=["lin0", "lin1"], use_disel=True))
        model.delete_adapter("disel")
        prepare_model_for_compiled_hotswap(model, target_rank=16)
        hotswap_adapter(model, tmp_path / "plain", adapter_name="plain")
        with torch.no_grad():
            torch.testing.assert_close(model(X), plain(X))

    @pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
    def test_llama_train_save_load_exact(self, tmp_path, low_cpu_mem_usage):
        config = LoraConfig(target_modules="all-linear", use_disel=True, task_type="CAUSAL_LM")
        model = get_peft_model(tiny_llama(), config)
        ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(0))
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2)
        model.train()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        biases = [p for n, p in gate_params(model).items() if n.endswith("bias")]
        assert len(biases) == 14 and all(not torch.equal(b, torch.full_like(b, -3.0)) for b in biases)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, logits)

    def test_half_precision_base_keeps_gates_in_float32(self):
        model = get_peft_model(tiny_llama(torch.bfloat16), LoraConfig(target_modules=["q_proj"], use_disel=True))
        assert {p.dtype for p in gate_params(model).values()} == {torch.float32}


class TestDiselOptimizer:
    def test_param_groups(self):
        model = get_model(modules_to_save=["lin1"], target_modules=["lin0"])
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-3, gate_lr_ratio=4.0, weight_decay=0.1)
        groups = {(g["lr"], g["weight_decay"]): {id(p) for p in g["params"]} for g in optimizer.param_groups}
        gates = {id(p) for p in gate_params(model).values()}
        assert groups[(4e-3, 0.0)] == gates
        layer = model.base_model.model.lin0
        assert id(layer.lora_A["default"].weight) in groups[(1e-3, 0.1)]
        assert id(model.base_model.model.lin1.modules_to_save["default"].bias) in groups[(1e-3, 0.0)]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert set().union(*groups.values()) == trainable

    def test_all_trainable_adapters_and_only_those(self):
        model = get_model()
        model.add_adapter("other", LoraConfig(target_modules=["lin1"], r=2, use_disel=True))
        model.add_adapter("frozen", LoraConfig(target_modules=["lin1"], r=2, use_disel=True))
        model.base_model.set_adapter(["default", "other"])
        for target in (model, model.base_model, model.get_base_model()):
            optimizer = create_disel_optimizer(target, torch.optim.SGD, lr=1e-3, gate_lr_ratio=10.0)
            gates = [g for g in optimizer.param_groups if g["lr"] == pytest.approx(1e-2)]
            assert len(gates) == 1 and gates[0]["weight_decay"] == 0.0
            assert {id(p) for p in gates[0]["params"]} == {
                id(p) for n, p in gate_params(model).items() if ".frozen." not in n
            }

    def test_errors(self):
        with pytest.raises(ValueError, match="found no DISeL gate"):
            create_disel_optimizer(get_model(use_disel=False), torch.optim.AdamW, lr=1e-3)
        model = get_model()
        for p in gate_params(model).values():
            p.requires_grad_(False)
        with pytest.raises(ValueError, match="none of them is trainable"):
            create_disel_optimizer(model, torch.optim.AdamW, lr=1e-3)
        with pytest.raises(ValueError, match="`gate_lr_ratio` must be a positive number"):
            create_disel_optimizer(get_model(), torch.optim.AdamW, lr=1e-3, gate_lr_ratio=0)

    def test_half_precision_gates_warn(self):
        model = get_peft_model(
            tiny_llama(torch.bfloat16),
            LoraConfig(target_modules=["q_proj"], use_disel=True),
            autocast_adapter_dtype=False,
        )
        with pytest.warns(UserWarning, match="DISeL gates are trained in torch.bfloat16"):
            create_disel_optimizer(model, torch.optim.AdamW, lr=1e-3)
