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
"""Tests of DISeL (`LoraConfig(use_disel=True)`) beyond the DISeL entries of the shared test matrices."""

import copy
import importlib.util
import json
import shutil
import warnings
from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as safe_load_file
from safetensors.torch import save_file as safe_save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft import (
    DiselConfig,
    KasaConfig,
    LoftQConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    VeloraConfig,
    convert_to_lora,
    get_peft_model,
)
from peft.import_utils import is_bnb_available
from peft.tuners import lora
from peft.tuners.lora import disel
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.variants import DiselConvNdVariant, DiselEmbeddingVariant, DiselLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import infer_device

from .test_custom_models import MLP, ModelConv1D, ModelConv2D, ModelConv3D, ModelEmbConv1D, ModelMha
from .test_lora_variants import CustomModel


# (base model class, targets of a plain LoRA adapter, targets of a DISeL adapter) for the DISeL tests below
DISEL_MODEL_CASES = {
    "mlp": (MLP, ["lin0", "lin1"], ["lin0", "lin1"]),
    "mlp-subset": (MLP, ["lin0", "lin1"], ["lin1"]),
    "emb-conv1d": (ModelEmbConv1D, ["emb", "conv1d"], ["emb", "conv1d"]),
    "emb-subset": (ModelEmbConv1D, ["emb", "conv1d"], ["emb"]),
    "conv2d": (ModelConv2D, ["conv2d", "lin0"], ["conv2d", "lin0"]),
    "conv3d-subset": (ModelConv3D, ["conv3d", "lin0"], ["conv3d"]),
}


class TestDiselModel:
    """DISeL (`LoraConfig(use_disel=True)`): LoRA whose rank-one components are gated by `sigmoid(W_g x + b_g)`.

    The generic behaviour is covered by the DISeL entries of the test matrices above; these tests cover what is
    specific to it: merging is refused without touching any weight, the gates (`lora_disel_gate`) follow the adapter
    through add/set/delete, mixed batches, saving and loading, and the configurations that DISeL refuses.
    """

    torch_device = infer_device()

    def get_inputs(self):
        return {"X": torch.arange(90).view(9, 10).to(self.torch_device)}

    def get_base_model(self, model_cls):
        torch.manual_seed(0)
        return model_cls().to(self.torch_device).eval()

    def get_lora_and_disel_model(self, model_cls, lora_targets, disel_targets):
        # the plain LoRA adapter comes first, so that a merge that did not check all adapters up front would already
        # have merged it when it reaches the DISeL adapter
        model = get_peft_model(
            self.get_base_model(model_cls),
            LoraConfig(target_modules=lora_targets, init_lora_weights=False),
            adapter_name="lora",
        )
        model.add_adapter("disel", LoraConfig(target_modules=disel_targets, init_lora_weights=False, use_disel=True))
        model.base_model.set_adapter(["lora", "disel"])
        return model.eval()

    @staticmethod
    def clone_state_dict(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @staticmethod
    def assert_state_dict_equal(sd0, sd1):
        assert sd0.keys() == sd1.keys()
        for key in sd0:
            assert torch.equal(sd0[key], sd1[key]), key

    @staticmethod
    def gate_params(model, adapter_name=None):
        infix = ".lora_disel_gate." if adapter_name is None else f".lora_disel_gate.{adapter_name}."
        return {n: p for n, p in model.named_parameters() if infix in n}

    @staticmethod
    @torch.no_grad()
    def perturb_gates(model):
        # move all gate parameters away from their initialization, so that a loader that silently re-initializes
        # them cannot pass
        for name, param in model.named_parameters():
            if ".lora_disel_gate." in name:
                param.add_(torch.randn_like(param))

    ################
    # merge refusal #
    ################

    @pytest.mark.parametrize("case", list(DISEL_MODEL_CASES))
    @pytest.mark.parametrize(
        "method",
        [
            "merge_and_unload",
            "merge_and_unload_safe",
            "merge_adapter",
            "merge_adapter_safe",
            "layer_merge",
            "layer_merge_safe",
        ],
    )
    def test_merge_refused_leaves_every_weight_unchanged(self, case, method):
        model_cls, lora_targets, disel_targets = DISEL_MODEL_CASES[case]
        model = self.get_lora_and_disel_model(model_cls, lora_targets, disel_targets)
        X = self.get_inputs()
        with torch.no_grad():
            output_before = model(**X)
        state_dict_before = self.clone_state_dict(model)

        safe_merge = method.endswith("_safe")
        # alternate between the active adapters (the default) and explicitly named adapters, LoRA first
        adapter_names = ["lora", "disel"] if safe_merge else None
        msg = "Cannot merge the DISeL adapter 'disel'"
        with pytest.raises(NotImplementedError, match=msg):
            if method.startswith("merge_and_unload"):
                model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
            elif method.startswith("merge_adapter"):
                model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
            else:
                # the last DISeL target also holds the LoRA adapter
                layer = model.base_model.model.get_submodule(disel_targets[-1])
                assert set(layer.active_adapters) == {"lora", "disel"}
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

        # nothing was merged, nothing was unloaded, not a single bit changed
        assert isinstance(model, PeftModel)
        tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert len(tuner_layers) == len(lora_targets)
        for layer in tuner_layers:
            assert not layer.merged
            assert layer.merged_adapters == []
        self.assert_state_dict_equal(state_dict_before, self.clone_state_dict(model))
        with torch.no_grad():
            output_after = model(**X)
        assert torch.equal(output_before, output_after)

    @pytest.mark.parametrize("case", ["mlp-subset", "emb-subset", "conv3d-subset"])
    def test_merge_plain_lora_adapter_next_to_disel_works(self, case):
        # only DISeL adapters are refused: the plain LoRA adapter of the same model can still be merged and unmerged
        model_cls, lora_targets, disel_targets = DISEL_MODEL_CASES[case]
        model = self.get_lora_and_disel_model(model_cls, lora_targets, disel_targets)
        model.set_adapter("lora")
        X = self.get_inputs()
        state_dict_before = self.clone_state_dict(model)
        with torch.no_grad():
            output_lora = model(**X)

        model.merge_adapter(["lora"])
        for name in lora_targets:
            assert model.base_model.model.get_submodule(name).merged_adapters == ["lora"]
        with torch.no_grad():
            output_merged = model(**X)
        assert torch.allclose(output_lora, output_merged, atol=1e-5, rtol=1e-5)

        model.unmerge_adapter()
        state_dict_after = self.clone_state_dict(model)
        assert state_dict_before.keys() == state_dict_after.keys()
        for key in state_dict_before:
            assert torch.allclose(state_dict_before[key], state_dict_after[key], atol=1e-6, rtol=1e-6), key

    def test_unload_and_disable_adapter(self):
        model_cls, lora_targets, disel_targets = DISEL_MODEL_CASES["mlp"]
        X = self.get_inputs()
        with torch.no_grad():
            output_base = self.get_base_model(model_cls)(**X)

        # a fresh DISeL adapter (lora_B at zero) starts exactly at the pre-trained mapping
        model = get_peft_model(
            self.get_base_model(model_cls), LoraConfig(target_modules=disel_targets, use_disel=True)
        )
        with torch.no_grad():
            assert torch.equal(model.eval()(**X), output_base)

        model = self.get_lora_and_disel_model(model_cls, lora_targets, disel_targets)
        with torch.no_grad():
            output_adapters = model(**X)
            with model.disable_adapter():
                output_disabled = model(**X)
            model.set_adapter("disel")
            output_disel = model(**X)
        assert not torch.allclose(output_adapters, output_base)
        assert not torch.allclose(output_disel, output_base)
        assert torch.equal(output_disabled, output_base)

        unloaded = model.unload()
        assert not any(isinstance(module, BaseTunerLayer) for module in unloaded.modules())
        assert unloaded.state_dict().keys() == self.get_base_model(model_cls).state_dict().keys()
        with torch.no_grad():
            assert torch.equal(unloaded(**X), output_base)

    def test_convert_to_lora_refused(self):
        model = get_peft_model(
            self.get_base_model(MLP),
            LoraConfig(target_modules=["lin0", "lin1"], use_disel=True, init_lora_weights=False),
        )
        assert not model.supports_lora_conversion()
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            convert_to_lora(model, rank=2)

    @pytest.mark.parametrize(
        "adapters, combination_type, match",
        [
            (["disel"], "linear", "only with `combination_type='cat'`"),
            (["disel", "disel2"], "svd", "only with `combination_type='cat'`"),
            (["lora", "disel"], "cat", r"Cannot combine DISeL adapters with plain LoRA adapters \['lora'\]"),
            (["disel", "bottleneck"], "cat", "gates differ in `gate_normalize` or in having a bottleneck"),
        ],
    )
    def test_add_weighted_adapter_refused(self, adapters, combination_type, match):
        model = self.get_lora_and_disel_model(MLP, ["lin0", "lin1"], ["lin0"])
        model.add_adapter("disel2", LoraConfig(target_modules=["lin0"], use_disel=True))
        bottleneck = DiselConfig(gate_bottleneck_dim=2)
        model.add_adapter("bottleneck", LoraConfig(target_modules=["lin0"], use_disel=True, disel_config=bottleneck))
        state_dict_before = self.clone_state_dict(model)
        with pytest.raises(ValueError, match=match):
            model.add_weighted_adapter(adapters, [1.0] * len(adapters), "combined", combination_type=combination_type)
        assert "combined" not in model.peft_config
        self.assert_state_dict_equal(state_dict_before, self.clone_state_dict(model))

    @pytest.mark.parametrize(
        "layer, disel_config",
        [
            ("linear", None),
            ("linear", DiselConfig(gate_bottleneck_dim=2, gate_normalize=True)),
            ("embedding", None),
            ("conv2d", DiselConfig(gate_bottleneck_dim=1)),
        ],
    )
    def test_add_weighted_adapter_cat_is_exact(self, layer, disel_config):
        # the "cat" combination of DISeL adapters is a DISeL adapter of rank r1 + r2 whose output is the weighted sum of
        # theirs: w1 * s1 * B1(g1(x) * A1 x) + w2 * s2 * B2(g2(x) * A2 x)
        torch.manual_seed(0)
        base, x = {
            "linear": (nn.Sequential(nn.Linear(10, 6)), torch.randn(5, 10)),
            "embedding": (nn.Sequential(nn.Embedding(20, 6)), torch.randint(0, 20, (5, 3))),
            "conv2d": (nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 6, 6)),
        }[layer]
        configs = [
            LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False, use_disel=True),
            LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=False, use_disel=True),
        ]
        for config in configs:
            config.disel_config = disel_config or DiselConfig()
        model = get_peft_model(base, configs[0], adapter_name="a").eval()
        model.add_adapter("b", configs[1])
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_disel_gate" in name:
                    param.normal_(0.0, 0.5)
            with model.disable_adapter():
                out_base = model(x)
            deltas = {}
            for name in ("a", "b"):
                model.set_adapter(name)
                deltas[name] = model(x) - out_base

            model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "combined", combination_type="cat")
            model.set_adapter("combined")
            combined = model(x) - out_base
        assert model.peft_config["combined"].use_disel
        assert model.base_model.model[0].lora_disel_gate["combined"].bias.shape == (7,)
        torch.testing.assert_close(combined, 0.7 * deltas["a"] - 1.3 * deltas["b"], rtol=1e-5, atol=1e-6)

    #####################
    # multiple adapters #
    #####################

    def test_add_set_delete_adapter(self):
        model = get_peft_model(
            self.get_base_model(MLP), LoraConfig(target_modules=["lin0"], init_lora_weights=False), adapter_name="lora"
        ).eval()
        lin0, lin1 = model.base_model.model.lin0, model.base_model.model.lin1
        assert "lora_disel_gate" not in lin0.adapter_layer_names
        X = self.get_inputs()
        with torch.no_grad():
            output_lora = model(**X)

        model.add_adapter(
            "disel", LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, use_disel=True)
        )
        model.eval()
        assert model.active_adapters == ["lora"]
        lin1 = model.base_model.model.lin1
        for layer in (lin0, lin1):
            assert layer.adapter_layer_names.count("lora_disel_gate") == 1
            assert list(layer.lora_disel_gate) == ["disel"]
        # the container is registered per layer instance, plain LoRA layers do not get it
        assert "lora_disel_gate" not in lora.Linear.adapter_layer_names
        # an inactive DISeL adapter is frozen and does not change the output
        assert self.gate_params(model) and not any(p.requires_grad for p in self.gate_params(model).values())
        with torch.no_grad():
            assert torch.equal(model(**X), output_lora)

        model.set_adapter("disel")
        assert all(p.requires_grad for p in self.gate_params(model, "disel").values())
        assert not lin0.lora_A["lora"].weight.requires_grad
        with torch.no_grad():
            output_disel = model(**X)
        assert not torch.allclose(output_disel, output_lora)

        model.set_adapter("lora")
        assert not any(p.requires_grad for p in self.gate_params(model).values())
        assert lin0.lora_A["lora"].weight.requires_grad
        with torch.no_grad():
            assert torch.equal(model(**X), output_lora)

        model.delete_adapter("disel")
        assert "disel" not in model.peft_config
        for layer in (lin0, lin1):
            assert "disel" not in layer.lora_disel_gate
            assert "disel" not in layer.lora_variant
            assert "disel" not in layer.lora_A
        assert not any(".disel." in key for key in model.state_dict())
        with torch.no_grad():
            assert torch.equal(model(**X), output_lora)

        # a new DISeL adapter after the deletion reuses the container
        model.add_adapter("disel2", LoraConfig(target_modules=["lin0"], init_lora_weights=False, use_disel=True))
        model.set_adapter("disel2")
        assert lin0.adapter_layer_names.count("lora_disel_gate") == 1
        assert list(lin0.lora_disel_gate) == ["disel2"]
        assert all(p.requires_grad for p in self.gate_params(model, "disel2").values())

        # deleting the active DISeL adapter leaves the LoRA adapter working
        model.delete_adapter("disel2")
        assert model.active_adapters == ["lora"]
        with torch.no_grad():
            assert torch.equal(model(**X), output_lora)

    @pytest.mark.parametrize("case", ["linear", "embedding", "conv1d", "conv2d"])
    def test_mixed_batch_equals_each_adapter_alone(self, case):
        if case == "linear":
            model_cls, targets = MLP, ["lin0", "lin1"]
            X = torch.arange(90).view(9, 10)
        elif case == "embedding":
            # only the embedding is targeted, so its mixed-batch path is what is checked
            model_cls, targets = ModelEmbConv1D, ["emb"]
            X = torch.arange(90).view(9, 10)
        elif case == "conv1d":
            model_cls, targets = ModelConv1D, ["conv1d"]
            X = torch.randn(9, 10, generator=torch.Generator().manual_seed(0))
        else:
            model_cls, targets = ModelConv2D, ["conv2d"]
            X = torch.randn(8, 5, 3, 3, generator=torch.Generator().manual_seed(0))
        X = X.to(self.torch_device)

        model = get_peft_model(
            self.get_base_model(model_cls),
            LoraConfig(target_modules=targets, init_lora_weights=False),
            adapter_name="lora",
        )
        model.add_adapter("disel", LoraConfig(target_modules=targets, init_lora_weights=False, use_disel=True))
        disel_config = DiselConfig(gate_bottleneck_dim=2, gate_bias_init=0.0)
        model.add_adapter(
            "disel2",
            LoraConfig(
                target_modules=targets, r=4, init_lora_weights=False, use_disel=True, disel_config=disel_config
            ),
        )
        model.eval()

        names = ["__base__", "lora", "disel", "disel2"]
        with torch.no_grad():
            output_mixed = model(X, adapter_names=[names[i % 4] for i in range(len(X))])
            outputs = {}
            with model.disable_adapter():
                outputs["__base__"] = model(X)
            for name in names[1:]:
                model.set_adapter(name)
                outputs[name] = model(X)

        for i, name0 in enumerate(names):
            for name1 in names[i + 1 :]:
                assert not torch.allclose(outputs[name0], outputs[name1], atol=1e-6, rtol=1e-6), (name0, name1)
        for i, name in enumerate(names):
            assert torch.allclose(output_mixed[i::4], outputs[name][i::4], atol=1e-6, rtol=1e-6), name

    #############
    # save/load #
    #############

    SAVE_LOAD_CASES = {
        "mlp": (MLP, ["lin0", "lin1"], None),
        "mlp-bottleneck": (MLP, ["lin0", "lin1"], DiselConfig(gate_bottleneck_dim=2, gate_normalize=True)),
        "emb-conv1d": (ModelEmbConv1D, ["emb", "conv1d"], None),
        "emb-conv1d-bottleneck": (ModelEmbConv1D, ["emb", "conv1d"], DiselConfig(gate_bottleneck_dim=2)),
        "conv2d": (ModelConv2D, ["conv2d", "lin0"], None),
        "conv3d-bottleneck": (ModelConv3D, ["conv3d"], DiselConfig(gate_bottleneck_dim=2)),
    }

    def save_disel_model(self, case, path):
        model_cls, targets, disel_config = self.SAVE_LOAD_CASES[case]
        config = LoraConfig(target_modules=targets, init_lora_weights=False, use_disel=True, disel_config=disel_config)
        model = get_peft_model(self.get_base_model(model_cls), config)
        self.perturb_gates(model)
        model.save_pretrained(path)
        return model.eval()

    def load_disel_model(self, case, path, **kwargs):
        model_cls = self.SAVE_LOAD_CASES[case][0]
        base_model = self.get_base_model(model_cls)
        # a different seed than the saved adapter's, so a fresh initialization would differ from the saved weights
        torch.manual_seed(123)
        return PeftModel.from_pretrained(base_model, path, **kwargs).eval()

    def assert_same_adapter(self, model0, model1, name1="default"):
        # all parameters, the frozen base ones included, are bit-identical; model1's adapter may have another name
        params0 = dict(model0.named_parameters())
        params1 = {
            ".".join("default" if part == name1 else part for part in n.split(".")): p
            for n, p in model1.named_parameters()
        }
        assert any(".lora_disel_gate.default." in n for n in params0)
        assert params0.keys() == params1.keys()
        for name in params0:
            assert torch.equal(params0[name], params1[name]), name

    @pytest.mark.parametrize("case", list(SAVE_LOAD_CASES))
    def test_save_pretrained_writes_gates(self, case, tmp_path):
        model = self.save_disel_model(case, tmp_path)
        _, targets, disel_config = self.SAVE_LOAD_CASES[case]
        state_dict = safe_load_file(tmp_path / "adapter_model.safetensors")

        param_names = ["weight", "bias"] + (["weight_up"] if disel_config is not None else [])
        expected = {f"base_model.model.{t}.lora_disel_gate.{p}" for t in targets for p in param_names}
        assert {k for k in state_dict if ".lora_disel_gate." in k} == expected
        model_state_dict = model.state_dict()
        for key in expected:
            saved = state_dict[key]
            assert torch.equal(saved, model_state_dict[key.replace(".lora_disel_gate.", ".lora_disel_gate.default.")])

    @pytest.mark.parametrize("case", list(SAVE_LOAD_CASES))
    def test_from_pretrained_restores_gates_exactly(self, case, tmp_path):
        model = self.save_disel_model(case, tmp_path)
        X = self.get_inputs()
        loaded = self.load_disel_model(case, tmp_path)
        self.assert_same_adapter(model, loaded)
        # both in eval mode and under no_grad, so that both run the same kernels
        with torch.no_grad():
            output = model(**X)
            assert torch.equal(output, loaded(**X))

        # under another adapter name
        loaded_other = self.load_disel_model(case, tmp_path, adapter_name="other")
        self.assert_same_adapter(model, loaded_other, name1="other")
        with torch.no_grad():
            assert torch.equal(output, loaded_other(**X))

        # as an additional adapter via load_adapter
        loaded.load_adapter(tmp_path, adapter_name="other2")
        loaded.set_adapter("other2")
        for name, param in self.gate_params(loaded, "other2").items():
            assert torch.equal(param, model.get_parameter(name.replace(".other2.", ".default.")))
        with torch.no_grad():
            assert torch.equal(output, loaded(**X))

    def test_from_pretrained_is_trainable(self, tmp_path):
        self.save_disel_model("mlp-bottleneck", tmp_path)

        loaded = self.load_disel_model("mlp-bottleneck", tmp_path)
        gates = self.gate_params(loaded)
        assert len(gates) == 6
        assert not any(p.requires_grad for p in loaded.parameters())

        loaded = self.load_disel_model("mlp-bottleneck", tmp_path, is_trainable=True)
        assert all(p.requires_grad for p in self.gate_params(loaded).values())
        assert loaded.base_model.model.lin0.lora_A["default"].weight.requires_grad
        assert not loaded.base_model.model.lin0.base_layer.weight.requires_grad

        loaded.load_adapter(tmp_path, adapter_name="frozen")
        assert not any(p.requires_grad for p in self.gate_params(loaded, "frozen").values())
        loaded.load_adapter(tmp_path, adapter_name="trainable", is_trainable=True)
        assert all(p.requires_grad for p in self.gate_params(loaded, "trainable").values())
        assert all(p.requires_grad for p in self.gate_params(loaded, "default").values())

    @pytest.mark.parametrize("case", ["mlp-bottleneck", "emb-conv1d", "conv2d"])
    def test_from_pretrained_low_cpu_mem_usage(self, case, tmp_path):
        model = self.save_disel_model(case, tmp_path)
        X = self.get_inputs()
        loaded = self.load_disel_model(case, tmp_path, low_cpu_mem_usage=True)
        assert not any(p.device.type == "meta" for p in loaded.parameters())
        self.assert_same_adapter(model, loaded)
        with torch.no_grad():
            output = model(**X)
            assert torch.equal(output, loaded(**X))

        loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
        loaded.set_adapter("other")
        assert not any(p.device.type == "meta" for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(output, loaded(**X))

    def test_checkpoint_without_gates_warns(self, tmp_path):
        self.save_disel_model("mlp", tmp_path)
        path = tmp_path / "adapter_model.safetensors"
        state_dict = safe_load_file(path)
        stripped = {k: v for k, v in state_dict.items() if ".lora_disel_gate." not in k}
        assert len(stripped) == len(state_dict) - 4
        safe_save_file(stripped, path, metadata={"format": "pt"})

        # PEFT's own warning for missing adapter keys names the gates
        with pytest.warns(UserWarning, match="Found missing adapter keys") as record:
            loaded = self.load_disel_model("mlp", tmp_path)
        messages = " ".join(str(w.message) for w in record)
        for target in ("lin0", "lin1"):
            for param in ("weight", "bias"):
                assert f"base_model.model.{target}.lora_disel_gate.default.{param}" in messages

        load_result = loaded.load_adapter(tmp_path, adapter_name="other")
        assert "base_model.model.lin0.lora_disel_gate.other.bias" in load_result.missing_keys

    def test_complete_checkpoint_does_not_warn(self, tmp_path):
        self.save_disel_model("emb-conv1d-bottleneck", tmp_path)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            self.load_disel_model("emb-conv1d-bottleneck", tmp_path)
        assert not [w for w in record if "missing adapter keys" in str(w.message)]

    ###############################
    # a small Llama, fp32 and bf16 #
    ###############################

    @staticmethod
    def get_tiny_llama(dtype=torch.float32):
        from transformers import LlamaConfig, LlamaForCausalLM

        # widths that real models have (multiples of 64): bitsandbytes' CPU kernels reject less on some CPUs
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(dtype).eval()

    @staticmethod
    def train_steps(model, input_ids, steps=5):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        # no weight decay, so that parameters without a gradient (all gates in the first step) do not move
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(input_ids=input_ids, labels=input_ids).loss
            assert torch.isfinite(loss)
            loss.backward()
            optimizer.step()
        model.eval()

    # PeftModel reads `is_gradient_checkpointing`, deprecated in transformers v5: an error under the pytest config
    @pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    def test_llama_train_save_load_identical_logits(self, tmp_path):
        config = LoraConfig(target_modules="all-linear", use_disel=True, task_type="CAUSAL_LM")
        model = get_peft_model(self.get_tiny_llama(), config)
        disel_layers = [m for m in model.modules() if isinstance(m, lora.LoraLayer)]
        assert len(disel_layers) == 2 * 7  # q, k, v, o, gate, up, down; lm_head is not targeted by all-linear
        assert not isinstance(model.base_model.model.lm_head, BaseTunerLayer)

        input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
        self.train_steps(model, input_ids)
        for layer in disel_layers:
            assert layer.lora_B["default"].weight.abs().sum() > 0
            assert not torch.equal(layer.lora_disel_gate["default"].bias, torch.full((8,), -3.0))
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits

        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(self.get_tiny_llama(), tmp_path).eval()
        with torch.no_grad():
            logits_loaded = loaded(input_ids=input_ids).logits
        assert torch.equal(logits, logits_loaded)

    # PeftModel reads `is_gradient_checkpointing`, deprecated in transformers v5: an error under the pytest config
    @pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    def test_llama_bf16(self):
        config = LoraConfig(target_modules="all-linear", use_disel=True, task_type="CAUSAL_LM")
        model = get_peft_model(self.get_tiny_llama(torch.bfloat16), config)
        # like lora_A and lora_B, the gates are autocast to fp32 (autocast_adapter_dtype=True by default), also
        # those of an adapter added later
        model.add_adapter("other", config)
        disel_layers = [m for m in model.modules() if isinstance(m, lora.LoraLayer)]
        for layer in disel_layers:
            assert layer.get_base_layer().weight.dtype == torch.bfloat16
            for adapter_name in ("default", "other"):
                assert layer.lora_A[adapter_name].weight.dtype == torch.float32
                gate = layer.lora_disel_gate[adapter_name]
                assert all(p.dtype == torch.float32 for p in gate.parameters())

        input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
        self.train_steps(model, input_ids)
        for layer in disel_layers:
            bias = layer.lora_disel_gate["default"].bias
            assert bias.dtype == torch.float32
            assert not torch.equal(bias, torch.full_like(bias, -3.0))
            # the inactive adapter did not move
            assert torch.equal(layer.lora_disel_gate["other"].bias, torch.full_like(bias, -3.0))

        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        assert logits.dtype == torch.bfloat16
        assert torch.isfinite(logits).all()

        # without autocast, the gates keep the dtype of the base layer
        model = get_peft_model(self.get_tiny_llama(torch.bfloat16), config, autocast_adapter_dtype=False)
        gate_dtypes = {p.dtype for p in self.gate_params(model).values()}
        assert gate_dtypes == {torch.bfloat16}
        with torch.no_grad():
            assert model(input_ids=input_ids).logits.dtype == torch.bfloat16

    ##########################
    # refused configurations #
    ##########################

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"use_dora": True}, r"cannot be combined with other LoRA variants.*use_dora"),
            ({"alora_invocation_tokens": [1, 2]}, r"cannot be combined.*alora_invocation_tokens"),
            ({"kasa_config": KasaConfig()}, r"cannot be combined.*kasa_config"),
            ({"velora_config": VeloraConfig(num_groups=2)}, r"cannot be combined.*velora_config"),
            ({"lora_bias": True}, "DISeL does not support `lora_bias=True`"),
            (
                {"megatron_config": {"tensor_model_parallel_size": 1}, "megatron_core": "megatron.core"},
                "DISeL does not support `megatron_config`",
            ),
            ({"target_modules": None, "target_parameters": ["lin0.weight"]}, "`target_parameters`"),
            ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
            ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
            ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
            ({"init_lora_weights": "loftq", "loftq_config": LoftQConfig(loftq_bits=4)}, "init_lora_weights='loftq'"),
            ({"init_lora_weights": "corda", "corda_config": CordaConfig()}, "init_lora_weights='corda'"),
            ({"init_lora_weights": "lora_ga"}, "init_lora_weights='lora_ga'"),
            ({"init_lora_weights": "orthogonal"}, "init_lora_weights='orthogonal'"),
        ],
    )
    def test_refused_config(self, kwargs, match):
        kwargs = {"target_modules": ["lin0"], **kwargs}
        with pytest.raises(ValueError, match=match):
            LoraConfig(use_disel=True, **kwargs)
        # the same config without DISeL is fine, so it is DISeL that refuses it
        LoraConfig(**kwargs)

    def test_accepted_inits(self):
        for init_lora_weights in (True, False, "gaussian", "eva"):
            LoraConfig(target_modules=["lin0"], use_disel=True, init_lora_weights=init_lora_weights)

    def test_multihead_attention_refused(self):
        with pytest.raises(ValueError, match="MultiheadAttention does not support DISeL"):
            get_peft_model(self.get_base_model(ModelMha), LoraConfig(target_modules=["mha"], use_disel=True))

    def test_refused_injection_leaves_the_model_unchanged(self):
        # lin0 (supported) is wrapped before mha refuses: the refusal must undo it, so that plain LoRA can follow
        class LinMha(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin0 = nn.Linear(10, 10)
                self.mha = nn.MultiheadAttention(10, 2)

            def forward(self, X):
                X = self.lin0(X)
                return self.mha(X, X, X)[0]

        model = LinMha()
        types = {name: type(module) for name, module in model.named_modules()}
        state_dict = self.clone_state_dict(model)
        with pytest.raises(ValueError, match="MultiheadAttention does not support DISeL"):
            get_peft_model(model, LoraConfig(target_modules=["lin0", "mha"], use_disel=True))
        assert {name: type(module) for name, module in model.named_modules()} == types
        self.assert_state_dict_equal(state_dict, self.clone_state_dict(model))
        assert all(p.requires_grad for p in model.parameters())

        peft_model = get_peft_model(model, LoraConfig(target_modules=["lin0", "mha"]))
        assert isinstance(peft_model.base_model.model.mha, lora.layer.MultiheadAttention)

    def test_multihead_attention_refused_in_add_adapter(self):
        # refused before the layer is changed: the model keeps working with its existing adapter
        model = get_peft_model(
            self.get_base_model(ModelMha), LoraConfig(target_modules=["mha", "lin0"], init_lora_weights=False)
        ).eval()
        X = self.get_inputs()
        with torch.no_grad():
            output_before = model(**X)
        state_dict_before = self.clone_state_dict(model)

        with pytest.raises(ValueError, match=r"unsupported variant combination: \(.use_disel.,\)"):
            model.add_adapter("disel", LoraConfig(target_modules=["mha"], use_disel=True))
        assert "disel" not in model.peft_config
        self.assert_state_dict_equal(state_dict_before, self.clone_state_dict(model))
        with torch.no_grad():
            assert torch.equal(model(**X), output_before)

    def test_custom_lora_layer_subclass_runs_disel(self):
        # a user's subclass of lora.Linear, registered with dynamic dispatch, inherits DISeL from lora.Linear
        class MyLoraLinear(lora.Linear):
            pass

        config = LoraConfig(target_modules=["lin0"], use_disel=True, init_lora_weights=False)
        config._register_custom_module({nn.Linear: MyLoraLinear})
        model = get_peft_model(self.get_base_model(MLP), config)
        layer = model.base_model.model.lin0
        assert isinstance(layer, MyLoraLinear)
        assert isinstance(layer.lora_variant["default"], DiselLinearVariant)
        assert "default" in layer.lora_disel_gate


class DiselMLP(nn.Module):
    """A conv and two linear layers, for the DISeL tests that train or compile a whole model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        self.lin1 = nn.Linear(64, 16)
        self.lin2 = nn.Linear(16, 8)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.lin2(torch.relu(self.lin1(x)))


def _disel_layer(kind, dtype, disel_kwargs, lora_dropout=0.0):
    """One DISeL LoRA layer of the given kind, with B and the gate away from their init so that every path matters."""
    torch.manual_seed(0)
    fan_in_fan_out = False
    if kind == "linear":
        base = nn.Sequential(nn.Linear(12, 10))
    elif kind == "conv1d_transformers":  # transformers' Conv1D: a fan_in_fan_out linear layer (GPT-2)
        base, fan_in_fan_out = nn.Sequential(Conv1D(10, 12)), True
    elif kind == "conv1d":
        base = nn.Sequential(nn.Conv1d(3, 5, kernel_size=3, padding=1))
    else:
        base = nn.Sequential(nn.Conv2d(3, 5, kernel_size=3, stride=2, padding=1))
    config = LoraConfig(
        target_modules=["0"],
        r=4,
        lora_alpha=6,
        lora_dropout=lora_dropout,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
        use_disel=True,
        disel_config=DiselConfig(gate_bias_init=0.5, **disel_kwargs),
    )
    model = get_peft_model(base, config).to(dtype)
    layer = model.base_model.model[0]
    if kind in ("linear", "conv1d_transformers"):
        x = torch.randn(2, 5, 12)
    elif kind == "conv1d":
        x = torch.randn(2, 3, 7)
    else:
        x = torch.randn(2, 3, 6, 6)
    return model, layer, x.to(dtype)


def _disel_reference(layer, x, dropout_mask_from=None):
    """`scaling * B(A x' * sigmoid(norm * W_g x + b))` written out from the parameters in fp32, with W_g = U V for a
    bottleneck gate and x' = dropout(x) when `dropout_mask_from` (the layer's dropout module) is given."""
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    gate = layer.lora_disel_gate["default"]
    weight_a, weight_b = lora_A.weight.float(), lora_B.weight.float()
    weight_g = gate.weight.float()
    if gate.weight_up is not None:
        weight_g = torch.einsum("rk,k...->r...", gate.weight_up.float(), weight_g)
    x = x.float()
    x_a = dropout_mask_from(x) if dropout_mask_from is not None else x
    if isinstance(lora_A, nn.Linear):
        logits = x @ weight_g.T
        return (
            layer.scaling["default"]
            * (x_a @ weight_a.T * torch.sigmoid(logits * gate.norm + gate.bias.float()))
            @ (weight_b.T)
        )
    conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}[type(lora_A)]
    geometry = {"stride": lora_A.stride, "padding": lora_A.padding}
    bias = gate.bias.float().view(-1, *([1] * (x.dim() - 2)))
    gated = conv(x_a, weight_a, **geometry) * torch.sigmoid(conv(x, weight_g, **geometry) * gate.norm + bias)
    return layer.scaling["default"] * conv(gated, weight_b, stride=lora_B.stride)


def _disel_outputs_and_grads(layer, x, fn):
    """The output of `fn(x)` and the gradients of A, B, the gate parameters and x, for a fixed random upstream grad."""
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * upstream).sum().backward()
    gate = layer.lora_disel_gate["default"]
    params = {
        "lora_A": layer.lora_A["default"].weight,
        "lora_B": layer.lora_B["default"].weight,
        "gate.weight": gate.weight,
        "gate.bias": gate.bias,
    }
    if gate.weight_up is not None:
        params["gate.weight_up"] = gate.weight_up
    grads = {name: p.grad.detach().float().clone() for name, p in params.items()}
    grads["x"] = x.grad.detach().float().clone()
    return out.detach().float(), grads


def _assert_close_rel(actual, expected, rel_tol, name):
    """Relative Frobenius-norm error, robust to the scale of each tensor (bf16 has ~3 significant digits)."""
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-12)
    assert err <= rel_tol, f"{name}: relative error {err:.2e} > {rel_tol:.0e}"


DISEL_GATE_CONFIGS = [
    {},
    {"gate_normalize": True},
    {"gate_bottleneck_dim": 3},
    {"gate_bottleneck_dim": 3, "gate_normalize": True},
]


class TestDiselLayer:
    def test_disel_variant_types(self):
        # isinstance in test_variant_is_applied_to_layers also accepts a subclass; here each type is exact
        model = get_peft_model(
            CustomModel(),
            LoraConfig(target_modules=["linear1", "linear2", "conv1d", "conv2d", "embedding"], use_disel=True),
        )
        expected = {"linear1": DiselLinearVariant, "linear2": DiselLinearVariant, "embedding": DiselEmbeddingVariant}
        expected.update(conv1d=DiselConvNdVariant, conv2d=DiselConvNdVariant)
        for name, variant_cls in expected.items():
            assert type(getattr(model.base_model.model, name).lora_variant["default"]) is variant_cls

    @pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
    def test_disel_gate_gradients_zero_until_lora_leaves_zero(self, lora_dropout):
        # With B = 0 (the default init) the gates cannot change the output, so their gradients are exactly zero; once
        # an optimizer step has moved B, they receive a gradient. Both the fused (no dropout) and the plain path.
        # Embeddings too, where A is the zero factor.
        torch.manual_seed(0)
        layer_names = ["linear1", "linear2", "conv1d", "conv2d", "embedding"]
        config = LoraConfig(target_modules=layer_names, use_disel=True, lora_dropout=lora_dropout)
        model = get_peft_model(CustomModel(), config)
        model.train()
        x, y = torch.arange(100).view(10, 10), torch.randn(10, 1, 10, 10)
        layers = [getattr(model.base_model.model, name) for name in layer_names]

        model(x, y).pow(2).mean().backward()
        for name, layer in zip(layer_names, layers):
            gate = layer.lora_disel_gate["default"]
            for pname, p in gate.named_parameters():
                assert p.grad is not None, f"{name}.{pname}"
                assert torch.count_nonzero(p.grad) == 0, f"{name}.{pname}"
            # the zero factor receives a gradient: B, or A for an embedding (PEFT zeroes A there, not B)
            zero_factor = layer.lora_embedding_A["default"] if name == "embedding" else layer.lora_B["default"].weight
            assert torch.count_nonzero(zero_factor) == 0, name
            assert torch.count_nonzero(zero_factor.grad) > 0, name

        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        optimizer.step()
        optimizer.zero_grad()
        model(x, y).pow(2).mean().backward()
        for name, layer in zip(layer_names, layers):
            gate = layer.lora_disel_gate["default"]
            assert torch.count_nonzero(gate.weight.grad) > 0, name
            assert torch.count_nonzero(gate.bias.grad) > 0, name

    @pytest.mark.parametrize(
        "other", [{"use_dora": True}, {"kasa_config": KasaConfig()}, {"alora_invocation_tokens": [1]}]
    )
    def test_disel_with_another_variant_raises_at_config_time(self, other):
        with pytest.raises(ValueError, match="DISeL cannot be combined with other LoRA variants"):
            LoraConfig(target_modules=["linear1"], use_disel=True, **other)

    def test_disel_on_unsupported_layer_type_raises(self):
        class ModelWithMHA(nn.Module):
            def __init__(self):
                super().__init__()
                self.mha = nn.MultiheadAttention(8, 2)

        with pytest.raises(ValueError, match="MultiheadAttention does not support DISeL"):
            get_peft_model(ModelWithMHA(), LoraConfig(target_modules=["mha"], use_disel=True))

    @pytest.mark.parametrize("path", ["fused", "plain"])
    @pytest.mark.parametrize("disel_kwargs", DISEL_GATE_CONFIGS)
    @pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast_bf16"])
    @pytest.mark.parametrize("kind", ["linear", "conv1d_transformers", "conv1d", "conv2d"])
    def test_disel_fused_and_plain_paths_match_reference(self, kind, dtype, disel_kwargs, path):
        # The fused path (one GEMM/conv over x for A and the gate) and the plain path (separate module calls) must
        # both give the reference output and the same gradients for A, B, the gate parameters and the input; in fp32,
        # in bf16, and with fp32 weights under bf16 autocast (as with Trainer(bf16=True)).
        param_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        _, layer, x = _disel_layer(kind, param_dtype, disel_kwargs)
        gate = layer.lora_disel_gate["default"]
        d_in = layer.lora_A["default"].weight[0].numel()
        assert gate.norm == (1 / d_in**0.5 if disel_kwargs.get("gate_normalize") else 1.0)

        def delta(x):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast_bf16"):
                return disel.disel_linear_delta(layer, "default", x)

        ref_out, ref_grads = _disel_outputs_and_grads(layer, x, lambda x: _disel_reference(layer, x))
        with patch.object(disel, "_can_fuse", return_value=path == "fused"):
            out, grads = _disel_outputs_and_grads(layer, x, delta)

        rel_tol = 1e-5 if dtype == "float32" else 3e-2
        _assert_close_rel(out, ref_out, rel_tol, "output")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            _assert_close_rel(grads[name], ref_grads[name], rel_tol, name)

    @pytest.mark.parametrize("kind", ["linear", "conv1d_transformers", "conv2d"])
    def test_disel_dropout_in_training_takes_plain_path(self, kind):
        # With active dropout A reads dropout(x) and the gate reads x, so they cannot share a GEMM: the plain path runs,
        # with the same dropout mask as the reference. In eval mode the dropout is a no-op and the fused path runs.
        model, layer, x = _disel_layer(kind, torch.float32, {}, lora_dropout=0.5)
        dropout = layer.lora_dropout["default"]
        fused = patch.object(disel, "_disel_linear_delta_fused", wraps=disel._disel_linear_delta_fused)
        plain = patch.object(disel, "_disel_linear_delta_plain", wraps=disel._disel_linear_delta_plain)

        model.train()
        with fused as fused_spy, plain as plain_spy:
            torch.manual_seed(3)
            out = disel.disel_linear_delta(layer, "default", x)
            assert plain_spy.call_count == 1 and fused_spy.call_count == 0
        torch.manual_seed(3)
        ref = _disel_reference(layer, x, dropout_mask_from=dropout)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        # the mask is really applied: without it the result differs
        assert not torch.allclose(out, _disel_reference(layer, x), rtol=1e-3, atol=1e-4)

        model.eval()
        with fused as fused_spy, plain as plain_spy, torch.no_grad():
            out = disel.disel_linear_delta(layer, "default", x)
            assert fused_spy.call_count == 1 and plain_spy.call_count == 0
        torch.testing.assert_close(out, _disel_reference(layer, x), rtol=1e-5, atol=1e-6)

    def test_disel_fused_path_respects_hooks_and_dtype_mismatch(self):
        # Weights read directly are only safe on plain modules: with a hook on lora_A (as DeepSpeed ZeRO-3 or FSDP
        # install to gather the weights), or mixed dtypes, the module calls of the plain path are used.
        _, layer, x = _disel_layer("linear", torch.float32, {})
        lora_A, gate = layer.lora_A["default"], layer.lora_disel_gate["default"]
        dropout = layer.lora_dropout["default"]
        assert disel._can_fuse(lora_A, gate, dropout)
        calls = []
        handle = lora_A.register_forward_pre_hook(lambda module, args: calls.append(module))
        assert not disel._can_fuse(lora_A, gate, dropout)
        with torch.no_grad():
            out = disel.disel_linear_delta(layer, "default", x)
        assert calls == [lora_A]
        torch.testing.assert_close(out, _disel_reference(layer, x), rtol=1e-5, atol=1e-6)
        handle.remove()
        assert disel._can_fuse(lora_A, gate, dropout)
        gate.to(torch.float64)
        assert not disel._can_fuse(lora_A, gate, dropout)

    @pytest.mark.parametrize("kind", ["linear", "conv1d_transformers"])
    def test_disel_fused_path_saves_no_more_activations_than_plain(self, kind):
        # Bytes that autograd keeps for backward, besides the parameters and the input (which the base layer keeps
        # anyway). The fused path must not keep more than the plain one, e.g. a concatenated copy of the weights.
        # (Convolutions do keep that copy, r x in_channels x kernel values: small next to their activations.)
        _, layer, x = _disel_layer(kind, torch.float32, {})
        x.requires_grad_()
        known = {p.data_ptr() for p in layer.parameters()} | {x.data_ptr()}

        def saved_bytes(fuse):
            storages = {}

            def pack(t):
                if t.data_ptr() not in known:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with patch.object(disel, "_can_fuse", return_value=fuse):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    disel.disel_linear_delta(layer, "default", x)
            return sum(storages.values())

        plain, fused = saved_bytes(False), saved_bytes(True)
        assert 0 < fused <= plain, (fused, plain)

    def test_disel_layer_forward_adds_the_delta(self):
        # the variant is wired into the LoRA layer's forward: result = base(x) + delta
        model, layer, x = _disel_layer("linear", torch.float32, {"gate_normalize": True})
        with torch.no_grad():
            expected = layer.base_layer(x) + _disel_reference(layer, x)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize(
        "backend, disel_kwargs",
        [("aot_eager", {"gate_bottleneck_dim": 2}), ("inductor", {"gate_normalize": True})],
    )
    def test_disel_torch_compile_fullgraph_matches_eager(self, backend, disel_kwargs):
        # fullgraph=True raises on any graph break; forward and backward (and a second call after an optimizer step,
        # which must see the updated weights) and inference must match eager. Inductor takes ~10-30 s on 2 CPU cores.
        if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
            pytest.skip("torch.compile is not available")
        if backend == "inductor" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
            pytest.skip("inductor needs a C++ compiler on CPU")
        torch._dynamo.reset()
        torch.manual_seed(0)
        config = LoraConfig(
            target_modules=["conv", "lin1", "lin2"],
            r=4,
            init_lora_weights=False,
            use_disel=True,
            disel_config=DiselConfig(gate_bias_init=0.0, **disel_kwargs),
        )
        model = get_peft_model(DiselMLP(), config)
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        x = torch.randn(3, 3, 4, 4)

        for _ in range(2):
            outs, grads = [], []
            for fn in (model, compiled):
                optimizer.zero_grad()
                out = fn(x)
                out.pow(2).sum().backward()
                outs.append(out.detach())
                grads.append([p.grad.clone() for p in params])
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
            for grad_compiled, grad_eager in zip(grads[1], grads[0]):
                torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-5)
            optimizer.step()

        # inference, where the fused path skips the autograd.Function
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


class TestDiselConfig:
    # DISeL's options live in a nested `DiselConfig` that must survive the JSON round trip of `LoraConfig` (it is
    # stored as a dict in adapter_config.json) and that validates its fields when constructed, also from that dict.
    def test_disel_config_survives_save_load_roundtrip(self, tmp_path):
        disel_config = DiselConfig(
            gate_bias_init=-5.0, gate_weight_init="zero", gate_normalize=True, gate_bottleneck_dim=2
        )
        config = LoraConfig(target_modules=["lin0"], use_disel=True, disel_config=disel_config)
        config.save_pretrained(tmp_path)

        with open(tmp_path / "adapter_config.json") as f:
            config_dict = json.load(f)
        assert config_dict["use_disel"] is True
        assert config_dict["disel_config"] == {
            "gate_bias_init": -5.0,
            "gate_weight_init": "zero",
            "gate_normalize": True,
            "gate_bottleneck_dim": 2,
        }

        for loaded in (LoraConfig.from_pretrained(tmp_path), PeftConfig.from_pretrained(tmp_path)):
            assert isinstance(loaded, LoraConfig)
            assert loaded.use_disel is True
            assert isinstance(loaded.disel_config, DiselConfig)
            assert loaded.disel_config == disel_config

    def test_disel_config_default_roundtrip(self, tmp_path):
        # `use_disel=True` alone means the DiselConfig defaults, which are written into the saved config
        config = LoraConfig(target_modules=["lin0"], use_disel=True)
        assert config.disel_config == DiselConfig()
        config.save_pretrained(tmp_path)
        loaded = LoraConfig.from_pretrained(tmp_path)
        assert loaded.use_disel is True
        assert loaded.disel_config == DiselConfig()

    def test_disel_config_from_dict(self):
        config = LoraConfig(target_modules=["lin0"], use_disel=True, disel_config={"gate_bias_init": -7})
        assert isinstance(config.disel_config, DiselConfig)
        assert config.disel_config == DiselConfig(gate_bias_init=-7)

    def test_disel_config_copy_and_to_dict(self):
        config = LoraConfig(target_modules=["lin0"], use_disel=True, disel_config=DiselConfig(gate_bottleneck_dim=4))
        assert config.to_dict()["disel_config"]["gate_bottleneck_dim"] == 4
        config_copy = copy.deepcopy(config)
        assert config_copy.disel_config == config.disel_config
        assert config_copy.disel_config is not config.disel_config

    def test_disel_defaults(self):
        disel_config = DiselConfig()
        assert disel_config.gate_bias_init == -3.0
        assert disel_config.gate_weight_init == "random"
        assert disel_config.gate_normalize is False
        assert disel_config.gate_bottleneck_dim is None
        assert LoraConfig().use_disel is False
        assert LoraConfig().disel_config is None

    @pytest.mark.parametrize(
        "kwargs, error_cls, match",
        [
            ({"gate_bias_init": "-3"}, TypeError, "gate_bias_init"),
            ({"gate_bias_init": None}, TypeError, "gate_bias_init"),
            ({"gate_bias_init": True}, TypeError, "gate_bias_init"),
            ({"gate_bias_init": float("inf")}, ValueError, "gate_bias_init"),
            ({"gate_bias_init": float("nan")}, ValueError, "gate_bias_init"),
            ({"gate_weight_init": "normal"}, ValueError, "gate_weight_init"),
            ({"gate_weight_init": None}, ValueError, "gate_weight_init"),
            ({"gate_normalize": "false"}, TypeError, "gate_normalize"),
            ({"gate_normalize": 1}, TypeError, "gate_normalize"),
            ({"gate_bottleneck_dim": 0}, ValueError, "gate_bottleneck_dim"),
            ({"gate_bottleneck_dim": -2}, ValueError, "gate_bottleneck_dim"),
            ({"gate_bottleneck_dim": 2.0}, ValueError, "gate_bottleneck_dim"),
            ({"gate_bottleneck_dim": True}, ValueError, "gate_bottleneck_dim"),
        ],
    )
    def test_disel_config_invalid_values_raise(self, kwargs, error_cls, match):
        with pytest.raises(error_cls, match=match):
            DiselConfig(**kwargs)
        # the same check runs when the sub-config comes as a dict, e.g. from a hand-edited adapter_config.json
        with pytest.raises(error_cls, match=match):
            LoraConfig(target_modules=["lin0"], use_disel=True, disel_config=kwargs)

    def test_disel_config_invalid_value_in_saved_config_raises(self, tmp_path):
        LoraConfig(target_modules=["lin0"], use_disel=True, disel_config=DiselConfig()).save_pretrained(tmp_path)
        config_path = tmp_path / "adapter_config.json"
        config_dict = json.loads(config_path.read_text())
        config_dict["disel_config"]["gate_weight_init"] = "xavier"
        config_path.write_text(json.dumps(config_dict))
        with pytest.raises(ValueError, match="gate_weight_init"):
            LoraConfig.from_pretrained(tmp_path)

    def test_unknown_disel_config_key_raises(self, tmp_path):
        msg = r"Unknown `disel_config` key\(s\) \['gate_bias_int'\]; valid keys are \['gate_bias_init',"
        with pytest.raises(ValueError, match=msg):
            LoraConfig(target_modules=["lin0"], use_disel=True, disel_config={"gate_bias_int": -7})
        LoraConfig(target_modules=["lin0"], use_disel=True).save_pretrained(tmp_path)
        config_path = tmp_path / "adapter_config.json"
        config_dict = json.loads(config_path.read_text())
        config_dict["disel_config"]["gate_bias_int"] = -7
        config_path.write_text(json.dumps(config_dict))
        with pytest.raises(ValueError, match=msg):
            LoraConfig.from_pretrained(tmp_path)

    @pytest.mark.parametrize("value", ["yes", 1, "True"])
    def test_use_disel_must_be_a_bool(self, value):
        with pytest.raises(TypeError, match="`use_disel` must be a bool"):
            LoraConfig(target_modules=["lin0"], use_disel=value)

    @pytest.mark.parametrize("r, rank_pattern, bottleneck", [(4, {}, 4), (8, {}, 9), (8, {"lin0": 2}, 2)])
    def test_bottleneck_not_below_the_rank_raises(self, r, rank_pattern, bottleneck):
        with pytest.raises(ValueError, match=f"`gate_bottleneck_dim={bottleneck}` must be smaller than the rank"):
            LoraConfig(
                r=r,
                rank_pattern=rank_pattern,
                use_disel=True,
                disel_config=DiselConfig(gate_bottleneck_dim=bottleneck),
            )
        LoraConfig(r=r, use_disel=True, disel_config=DiselConfig(gate_bottleneck_dim=1))

    def test_disel_config_wrong_type_raises(self):
        with pytest.raises(TypeError, match="DiselConfig"):
            LoraConfig(target_modules=["lin0"], use_disel=True, disel_config=-5.0)

    def test_disel_config_without_use_disel_raises(self):
        with pytest.raises(ValueError, match="use_disel"):
            LoraConfig(target_modules=["lin0"], disel_config=DiselConfig())


def bnb_cpu_4bit_repacks() -> bool:
    """Whether bitsandbytes repacks 4-bit weights on the first eval forward without gradients on this CPU (it does on
    CPUs with AVX512-BF16, for a bf16 kernel)."""
    import bitsandbytes.functional as bnb_functional

    return bool(bnb_functional.has_avx512bf16())


def bnb_eval_path(quant: str) -> str:
    """The kernel bitsandbytes runs for an eval forward of `quant` on this CPU, for the test ids."""
    if not quant.startswith("4bit"):
        return "int8"
    return "repacked" if bnb_cpu_4bit_repacks() else "dequantized"


def keep_4bit_layout(model) -> None:
    """Keep bitsandbytes from repacking the 4-bit weights of `model` at an eval forward on CPUs with AVX512-BF16.

    With bitsandbytes 0.50.2, training a repacked layer backpropagates through `gemv_4bit`, which has no autograd kernel
    (the gradient of the layer's input is lost), and saving it runs an inexact inverse of the repacking that changes
    the weights in memory. A model that is trained or saved after an eval pass needs this before that pass.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def bnb_repacked_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


BNB_BUG_REASON = (
    "bitsandbytes 0.50.2 bug on CPUs with AVX512-BF16: after an eval forward repacks a 4-bit weight, training runs "
    "bitsandbytes::gemv_4bit, which has no autograd kernel (the gradient of the layer's input is lost), and "
    "save_pretrained runs an inexact inverse of the repacking that changes the weights in memory"
)
bnb_repack_bug = pytest.mark.xfail(
    is_bnb_available() and bnb_cpu_4bit_repacks(), reason=BNB_BUG_REASON, strict=True, raises=AssertionError
)


@pytest.mark.skipif(not is_bnb_available(), reason="needs bitsandbytes")
# prepare_model_for_kbit_training calls gradient-checkpointing APIs that transformers 5 deprecates (not DISeL's)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
class TestDiselQuantized:
    """DISeL on bitsandbytes layers (QLoRA). bitsandbytes runs these on the CPU, with real packed weights; the test ids
    name the kernel of an eval forward on this CPU (`repacked`: the bf16 kernel of CPUs with AVX512-BF16)."""

    QUANT_CONFIGS = {
        "4bit-nf4-fp32": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32},
        "4bit-nf4-double-bf16": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": torch.bfloat16,
        },
        "4bit-fp4-bf16": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_compute_dtype": torch.bfloat16,
        },
        "4bit-fp4-double-fp32": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "fp4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": torch.float32,
        },
        "8bit": {"load_in_8bit": True},
    }
    QUANTS = [pytest.param(q, id=f"{q}-{bnb_eval_path(q)}" if is_bnb_available() else q) for q in QUANT_CONFIGS]
    QUANTS_4BIT = [q for q in QUANTS if q.values[0] in ("4bit-nf4-fp32", "4bit-fp4-double-fp32")]
    IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    @pytest.fixture(scope="class")
    def model_dir(self, tmp_path_factory):
        path = tmp_path_factory.mktemp("tiny-llama")
        TestDiselModel.get_tiny_llama().save_pretrained(path)
        return path

    def load_quantized(self, model_dir, quant, keep_layout=False):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(**self.QUANT_CONFIGS[quant])
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="cpu")
        if keep_layout:
            keep_4bit_layout(model)
        return model

    def get_disel_model(self, model_dir, quant, keep_layout=False, **kwargs):
        from peft import prepare_model_for_kbit_training

        # prepare_model_for_kbit_training enables gradient checkpointing
        base = prepare_model_for_kbit_training(self.load_quantized(model_dir, quant, keep_layout))
        config = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], use_disel=True, **kwargs)
        torch.manual_seed(0)
        return get_peft_model(base, config)

    def train_steps(self, model, steps=3):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(steps):
            model(input_ids=self.IDS, labels=self.IDS).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def first_step_grads(self, model):
        model.train()
        model(input_ids=self.IDS, labels=self.IDS).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return grads

    def eval_logits(self, model):
        model.eval()
        with torch.no_grad():
            return model(input_ids=self.IDS).logits

    @pytest.mark.parametrize("quant", QUANTS)
    def test_train_save_load(self, model_dir, quant, tmp_path):
        # fine-tune, evaluate (the eval kernel of the test id), save and reload onto a fresh quantized base
        import bitsandbytes as bnb

        model = self.get_disel_model(model_dir, quant)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        bnb_cls = bnb.nn.Linear4bit if quant.startswith("4bit") else bnb.nn.Linear8bitLt
        assert isinstance(layer.get_base_layer(), bnb_cls)
        gate = layer.lora_disel_gate["default"]
        assert gate.weight.dtype == torch.float32
        assert gate.weight.device == layer.lora_A["default"].weight.device

        biases = {
            n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_disel_gate.default.bias")
        }
        fused = patch.object(disel, "_disel_linear_delta_fused", wraps=disel._disel_linear_delta_fused)
        with fused as fused_spy:
            self.train_steps(model)
        assert fused_spy.call_count > 0  # A and the gate as one GEMM, also on a quantized layer
        assert all(not torch.equal(p, biases[n]) for n, p in model.named_parameters() if n in biases)

        logits = self.eval_logits(model)
        n_linear4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert bnb_repacked_layers(model) == (n_linear4bit if bnb_eval_path(quant) == "repacked" else 0)
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(self.load_quantized(model_dir, quant), tmp_path)
        assert torch.equal(self.eval_logits(loaded), logits)

    @pytest.mark.parametrize("quant", QUANTS_4BIT)
    def test_evaluate_before_and_after_training(self, model_dir, quant, tmp_path):
        # a user's flow: evaluate, fine-tune, evaluate, save, reload; with the 4-bit layout kept (see keep_4bit_layout)
        # the first step's gradients are those of a model that never ran an eval pass, on every CPU
        reference = self.first_step_grads(self.get_disel_model(model_dir, quant, init_lora_weights=False))
        model = self.get_disel_model(model_dir, quant, keep_layout=True, init_lora_weights=False)
        before = self.eval_logits(model)
        grads = self.first_step_grads(model)
        assert grads.keys() == reference.keys() and len(grads) == 6 * 4  # A, B, gate weight and bias
        assert all(torch.equal(grads[n], reference[n]) for n in grads)

        self.train_steps(model)
        after = self.eval_logits(model)
        assert not torch.allclose(before, after)
        model.save_pretrained(tmp_path)
        assert torch.equal(self.eval_logits(model), after)  # saving leaves the model as it was
        loaded = PeftModel.from_pretrained(self.load_quantized(model_dir, quant, keep_layout=True), tmp_path)
        assert torch.equal(self.eval_logits(loaded), after)
        assert bnb_repacked_layers(model) == bnb_repacked_layers(loaded) == 0

    @bnb_repack_bug
    @pytest.mark.parametrize("quant", QUANTS_4BIT[:1])
    def test_training_after_a_repacked_eval_pass(self, model_dir, quant):
        # without keep_4bit_layout: tracks the bitsandbytes bug (xfail where it repacks, passes elsewhere)
        reference = self.first_step_grads(self.get_disel_model(model_dir, quant, init_lora_weights=False))
        model = self.get_disel_model(model_dir, quant, init_lora_weights=False)
        self.eval_logits(model)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
            grads = self.first_step_grads(model)
        assert all(torch.allclose(grads[n], reference[n], rtol=0.05, atol=1e-6) for n in reference)

    @bnb_repack_bug
    @pytest.mark.parametrize("quant", QUANTS_4BIT[:1])
    def test_save_after_a_repacked_eval_pass(self, model_dir, quant, tmp_path):
        model = self.get_disel_model(model_dir, quant, init_lora_weights=False)
        logits = self.eval_logits(model)
        model.save_pretrained(tmp_path)
        assert torch.equal(self.eval_logits(model), logits)

    def test_mixed_batch_and_merge_refused(self, model_dir):
        model = self.get_disel_model(model_dir, "4bit-nf4-fp32", init_lora_weights=False)
        model.add_adapter("plain", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        model.eval()
        with torch.no_grad():
            alone = {}
            for name in ("default", "plain"):
                model.set_adapter(name)
                alone[name] = model(input_ids=self.IDS).logits
            mixed = model(input_ids=self.IDS, adapter_names=["default", "plain"]).logits
        assert not torch.allclose(alone["default"], alone["plain"])
        torch.testing.assert_close(mixed[0], alone["default"][0])
        torch.testing.assert_close(mixed[1], alone["plain"][1])

        model.base_model.set_adapter(["plain", "default"])
        state_dict = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(NotImplementedError, match="Cannot merge the DISeL adapter 'default'"):
            model.merge_and_unload()
        assert all(torch.equal(v, state_dict[k]) for k, v in model.state_dict().items())

    def test_gates_get_gradients_under_gradient_checkpointing(self, model_dir):
        model = self.get_disel_model(model_dir, "4bit-nf4-fp32", init_lora_weights=False)
        assert model.base_model.model.is_gradient_checkpointing
        grads = [g for n, g in self.first_step_grads(model).items() if "lora_disel_gate" in n]
        assert len(grads) == 12
        assert all(g.abs().sum() > 0 for g in grads)


class TestDiselHotswap:
    """`peft.utils.hotswap` with DISeL adapters: exact between compatible adapters, a clear error otherwise."""

    X = torch.arange(90).view(9, 10).float()

    def save_adapter(self, path, seed, **config_kwargs):
        torch.manual_seed(seed)
        config = LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False, **config_kwargs)
        model = get_peft_model(MLP(), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_disel_gate" in name:
                    param.normal_(0.0, 0.5)  # spread the gates, so that a wrong gate shows in the output
        model.save_pretrained(path)

    def load(self, path, **kwargs):
        torch.manual_seed(0)
        return PeftModel.from_pretrained(MLP(), path, **kwargs).eval()

    def expected_output(self, path):
        with torch.no_grad():
            return self.load(path)(self.X)

    def test_hotswap_between_disel_adapters_is_exact(self, tmp_path):
        from peft.utils.hotswap import hotswap_adapter

        self.save_adapter(tmp_path / "a", seed=1, use_disel=True)
        self.save_adapter(tmp_path / "b", seed=2, use_disel=True)
        model = self.load(tmp_path / "a")
        hotswap_adapter(model, tmp_path / "b", adapter_name="default")
        with torch.no_grad():
            torch.testing.assert_close(model(self.X), self.expected_output(tmp_path / "b"), rtol=0, atol=0)

    @pytest.mark.parametrize(
        "other, match",
        [
            ({}, "for use_disel"),  # a plain LoRA adapter into a DISeL slot
            ({"use_disel": True, "disel_config": DiselConfig(gate_normalize=True)}, "for disel_config"),
            ({"use_disel": True, "disel_config": DiselConfig(gate_bottleneck_dim=2)}, "for disel_config"),
        ],
    )
    def test_hotswap_incompatible_adapter_raises(self, tmp_path, other, match):
        from peft.utils.hotswap import hotswap_adapter

        self.save_adapter(tmp_path / "a", seed=1, use_disel=True)
        self.save_adapter(tmp_path / "b", seed=2, **other)
        model = self.load(tmp_path / "a")
        with torch.no_grad():
            before = model(self.X)
        with pytest.raises(ValueError, match=f"Configs are incompatible: {match}"):
            hotswap_adapter(model, tmp_path / "b", adapter_name="default")
        with torch.no_grad():
            assert torch.equal(model(self.X), before)

    @pytest.mark.parametrize("disel_config", [None, DiselConfig(gate_bottleneck_dim=2, gate_normalize=True)])
    def test_compiled_hotswap_with_padded_rank(self, tmp_path, disel_config):
        from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

        self.save_adapter(tmp_path / "a", seed=1, r=4, use_disel=True, disel_config=disel_config)
        self.save_adapter(tmp_path / "b", seed=2, r=8, use_disel=True, disel_config=disel_config)
        model = self.load(tmp_path / "a")
        with torch.no_grad():
            before = model(self.X)
        prepare_model_for_compiled_hotswap(model, target_rank=8)
        assert model.base_model.model.lin0.lora_disel_gate["default"].bias.shape == (8,)
        with torch.no_grad():
            # the padded ranks contribute nothing
            torch.testing.assert_close(model(self.X), before, rtol=1e-5, atol=1e-5)

        torch._dynamo.reset()
        compiled = torch.compile(model)
        with torch.no_grad():
            torch.testing.assert_close(compiled(self.X), before, rtol=1e-5, atol=1e-6)
            with torch._dynamo.config.patch(error_on_recompile=True):
                hotswap_adapter(model, tmp_path / "b", adapter_name="default")
                torch.testing.assert_close(
                    compiled(self.X), self.expected_output(tmp_path / "b"), rtol=1e-5, atol=1e-6
                )
        torch._dynamo.reset()


def test_gates_in_a_checkpoint_whose_config_has_no_disel_warn(tmp_path):
    torch.manual_seed(0)
    get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], use_disel=True)).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_disel"], config["disel_config"] = False, None  # e.g. rewritten by a tool that does not know DISeL
    config_path.write_text(json.dumps(config))
    with pytest.warns(
        UserWarning, match=r"holds 2 DISeL gate tensor\(s\), but its config has `use_disel=False`"
    ) as rec:
        PeftModel.from_pretrained(MLP(), tmp_path)
    assert "base_model.model.lin0.lora_disel_gate.weight" in str(rec[0].message) + " ".join(
        str(w.message) for w in rec
    )


class TestDiselEmbeddingGate:
    """An embedding's gate is a table of logits per token id: its input is one-hot, so it is not normalized by the
    vocabulary size, it reads the ids the layer's `input_fn` gives A, and the padding token's row gets no gradient."""

    def get_model(self, **disel_kwargs):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Embedding(1000, 8, padding_idx=0))
        config = LoraConfig(
            r=4,
            target_modules=["0"],
            init_lora_weights=False,
            use_disel=True,
            disel_config=DiselConfig(**disel_kwargs),
        )
        return get_peft_model(base, config)

    def test_gate_normalize_is_a_no_op_on_embeddings(self):
        gate = self.get_model(gate_normalize=True).base_model.model[0].lora_disel_gate["default"]
        assert gate.norm == 1.0
        linear = get_peft_model(
            nn.Sequential(nn.Linear(100, 8)),
            LoraConfig(r=4, target_modules=["0"], use_disel=True, disel_config=DiselConfig(gate_normalize=True)),
        )
        assert linear.base_model.model[0].lora_disel_gate["default"].norm == pytest.approx(0.1)

    def test_padding_token_gate_gets_no_gradient(self):
        model = self.get_model()
        model(torch.tensor([[0, 5, 7, 0]])).sum().backward()
        grad = model.base_model.model[0].lora_disel_gate["default"].weight.grad  # (r, num_embeddings)
        assert torch.all(grad[:, 0] == 0)
        assert torch.any(grad[:, 5] != 0) and torch.any(grad[:, 7] != 0)

    def test_gate_reads_the_ids_of_input_fn(self):
        model = self.get_model()
        layer = model.base_model.model[0]
        layer.input_fns["default"] = lambda args: args[0] + 1  # e.g. an id remapping
        ids = torch.tensor([[3, 4]])
        seen = []
        handle = layer.lora_disel_gate["default"].register_logits_hook(lambda gate, logits: seen.append(logits))
        with torch.no_grad():
            model(ids)
        handle.remove()
        gate = layer.lora_disel_gate["default"]
        expected = gate.weight.T[ids + 1] + gate.bias
        torch.testing.assert_close(seen[0], expected)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
class TestDiselTorchao:
    """DISeL on a torchao int8 weight-only base (TorchaoLoraLinear runs Linear's variants), on the CPU."""

    def load_base(self, path):
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import AutoModelForCausalLM, TorchAoConfig

        config = TorchAoConfig(quant_type=Int8WeightOnlyConfig())
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")

    def test_train_save_load_and_merge_refused(self, tmp_path):
        TestDiselModel.get_tiny_llama().save_pretrained(tmp_path / "base")
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_disel=True)
        model = get_peft_model(self.load_base(tmp_path / "base"), config)
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == "TorchaoLoraLinear"
        assert isinstance(layer.lora_variant["default"], DiselLinearVariant)

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
        bias = layer.lora_disel_gate["default"].bias.detach().clone()
        model.train()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert not torch.equal(layer.lora_disel_gate["default"].bias, bias)

        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        with pytest.raises(NotImplementedError, match="Cannot merge the DISeL adapter"):
            layer.merge()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, logits)
        model.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(self.load_base(tmp_path / "base"), tmp_path / "adapter").eval()
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, logits)
