"""What the plugin refuses, through the `axolotl` command where a user meets it (the YAMLs here have no `plugins:`: the
plugin comes from its `axolotl.plugins` entry point), and the config checks directly on the plugin."""

import json

import pytest
from axolotl.utils.dict import DictDefault
from conftest import make_config, run_axolotl

from axolotl_disel import DiselPlugin, disel_option


KERNEL_MESSAGE = (
    "`disel` cannot be used with Axolotl's fused LoRA kernels (lora_mlp_kernel: true): the kernels compute LoRA from "
    "A, B and the scaling only, without DISeL's gates, so they would train plain LoRA. Remove these options or set "
    "them to false."
)
LORAPLUS_MESSAGE = (
    "`disel` cannot be combined with `loraplus_lr_ratio`: DISeL trains with its own optimizer parameter groups (the "
    "gates at `disel_gate_lr_ratio` x learning_rate without weight decay), which `loraplus_lr_ratio` would replace or "
    "override. Remove `loraplus_lr_ratio`; set the gates' learning rate with `disel_gate_lr_ratio`."
)


def merge_message(folder) -> str:
    return (
        f"axolotl merge-lora cannot merge the DISeL adapter in {folder}: DISeL's update depends on the input (a sigmoid "
        "gate per rank-one component), so there is no fixed weight delta to merge, and Axolotl's merger would write "
        "plain LoRA weights without the gates, a different model. Use the adapter unmerged instead: load it with "
        "PeftModel.from_pretrained (with the DISeL-enabled peft), or serve it with vLLM and the vllm_disel plugin."
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    "changes, message",
    [({"lora_mlp_kernel": True}, KERNEL_MESSAGE), ({"loraplus_lr_ratio": 16}, LORAPLUS_MESSAGE)],
    ids=["explicit-kernel", "loraplus"],
)
def test_train_refused(fixtures, tmp_path, changes, message):
    out = tmp_path / "out"
    proc = run_axolotl("train", make_config(fixtures, out, plugins=None, **changes), tmp_path, timeout=600)
    assert proc.returncode != 0
    assert message in one_line(proc.stdout), proc.stdout[-4000:]
    assert not (out / "adapter_config.json").exists()


def test_merge_lora_refused(trained, fixtures, tmp_path):
    """merge-lora with the training YAML, and with a YAML without `disel` that points at the DISeL adapter."""
    out, _ = trained
    for name, config in {
        "with-disel": make_config(fixtures, out, plugins=None),
        "without-disel": make_config(fixtures, tmp_path / "other", plugins=None, disel=None, disel_gate_lr_ratio=None),
    }.items():
        proc = run_axolotl("merge-lora", config, tmp_path / name, f"--lora-model-dir={out}", timeout=600)
        assert proc.returncode != 0
        assert one_line(merge_message(out)) in one_line(proc.stdout), proc.stdout[-4000:]
    assert not (out / "merged").exists()


def register(**cfg) -> DictDefault:
    cfg = DictDefault({"adapter": "lora", **cfg})
    DiselPlugin().register(cfg)
    return cfg


@pytest.mark.parametrize(
    "option", ["loraplus_lr_ratio", "loraplus_lr_embedding", "lr_groups", "embedding_lr", "embedding_lr_scale"]
)
def test_conflicting_lr_options(option):
    with pytest.raises(ValueError, match=f"`disel` cannot be combined with `{option}`"):
        register(disel=True, **{option: 1.0})


@pytest.mark.parametrize("optimizer", ["galore_adamw", "lomo", "muon", "adamw_torch_layerwise"])
def test_optimizers_with_own_groups(optimizer):
    with pytest.raises(ValueError, match=f"`optimizer: {optimizer}`"):
        register(disel=True, optimizer=optimizer)


def test_other_refusals(tmp_path):
    with pytest.raises(ValueError, match="needs `adapter: lora` or `adapter: qlora`"):
        register(disel=True, adapter=None)
    with pytest.raises(ValueError, match="`disel` has an option DiselConfig does not know"):
        register(disel={"gate_bias": -2.0})
    with pytest.raises(ValueError, match="must be a positive number"):
        register(disel=True, disel_gate_lr_ratio=0)
    with pytest.raises(ValueError, match="`disel_gate_lr_ratio` is set but `disel` is not"):
        register(disel_gate_lr_ratio=5)
    with pytest.raises(ValueError, match="cannot be combined with `relora`"):
        register(disel=True, relora=True)
    with pytest.raises(ValueError, match="lora_qkv_kernel: true, lora_o_kernel: true"):
        register(disel=True, lora_qkv_kernel=True, lora_o_kernel=True)


def test_kernels_switched_off_and_options():
    cfg = register(disel={"gate_bias_init": -2.0, "gate_bottleneck_dim": 4, "gate_normalize": True}, load_in_4bit=True)
    assert [cfg[k] for k in ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")] == [
        False
    ] * 4
    use_disel = DiselPlugin().get_lora_config_kwargs(cfg)["use_disel"]
    assert (use_disel.gate_bias_init, use_disel.gate_bottleneck_dim, use_disel.gate_normalize) == (-2.0, 4, True)
    assert DiselPlugin().get_lora_config_kwargs(register(disel=True)) == {"use_disel": True}
    assert disel_option(True) is True


def test_nothing_without_disel(tmp_path):
    """A config without `disel` is left as it is (the plugin is loaded for every config through its entry point)."""
    cfg = register(adapter="lora", lora_model_dir=str(tmp_path))
    assert "lora_mlp_kernel" not in cfg and "disel" not in cfg
    assert DiselPlugin().get_lora_config_kwargs(cfg) == {}


def test_loaded_disel_adapter_counts_as_disel(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"use_disel": True}))
    cfg = register(lora_model_dir=str(tmp_path))
    assert cfg["disel"] is True and cfg["lora_mlp_kernel"] is False


def test_axolotl_alone_drops_disel(fixtures):
    """Why the plugin is needed: Axolotl's own config schema drops `disel` without a word (plain LoRA would train)."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    config = make_config(fixtures, fixtures / "unused", plugins=None, sample_packing=None)
    validated = AxolotlInputConfig(**config).model_dump(exclude_none=True)
    assert "disel" not in validated and "disel_gate_lr_ratio" not in validated
    assert validated["adapter"] == "lora"
