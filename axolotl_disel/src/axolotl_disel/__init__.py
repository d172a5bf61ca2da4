"""An Axolotl plugin that trains DISeL adapters (Dynamic Input-Sensitive LoRA, `LoraConfig(use_disel=...)` of the
DISeL-enabled peft) from an Axolotl YAML:

    plugins:
      - axolotl_disel.DiselPlugin
    adapter: lora
    disel: true               # or a mapping of DiselConfig options
    disel_gate_lr_ratio: 5    # the gates' learning rate relative to learning_rate (the default)

Installed, the plugin is also loaded through the `axolotl.plugins` entry point, so `disel:` works without `plugins:`.
It does nothing for a config without `disel` (except refusing `merge-lora` on a DISeL adapter).
"""

import json
import types
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger


__version__ = "0.1.0"
# the Axolotl release the plugin is written against and tested with (the hooks and options it relies on)
AXOLOTL_VERSION = "0.21.0"

LOG = get_logger("axolotl_disel")

_GATE = "lora_disel_gate"
# Axolotl's fused LoRA kernels: they patch every module with `lora_A` and compute x A^T B^T without the gates
KERNEL_FLAGS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# options that build their own optimizer parameter groups, or a learning rate per parameter, over the gate group
CONFLICTING_LR_OPTIONS = (
    "loraplus_lr_ratio",
    "loraplus_lr_embedding",
    "lr_groups",
    "embedding_lr",
    "embedding_lr_scale",
)
# optimizers that build their parameter groups themselves (GaLore, LOMO, layer-wise, Muon and Dion factories)
_OWN_GROUP_OPTIMIZERS = ("galore", "lomo", "layerwise", "muon", "dion", "apollo")


def _adapter_is_disel(folder: Any) -> bool:
    """Whether `folder` holds a saved DISeL adapter (`use_disel` set in its adapter_config.json)."""
    if not folder:
        return False
    path = Path(str(folder)) / "adapter_config.json"
    if not path.is_file():
        return False
    use_disel = json.loads(path.read_text()).get("use_disel")
    return use_disel not in (None, False)


def disel_option(value: Any):
    """The `use_disel` value of `LoraConfig` for the YAML's `disel:` (true, or a mapping of DiselConfig options).

    Args:
        value: The `disel` value of the config.

    Returns:
        `True` or a `peft.DiselConfig`.
    """
    try:
        from peft import DiselConfig
    except ImportError:
        import peft

        raise ImportError(
            f"`disel` needs the DISeL-enabled peft, but the installed peft {peft.__version__} has no DiselConfig: "
            "install it over Axolotl's with `pip install --no-deps <the DISeL peft wheel or repository>`."
        ) from None

    if value is True:
        return True
    if isinstance(value, dict):
        try:
            return DiselConfig(**dict(value))
        except TypeError as exc:
            known = ", ".join(DiselConfig.__dataclass_fields__)
            raise ValueError(f"`disel` has an option DiselConfig does not know ({exc}); the options are: {known}.")
    raise ValueError(f"`disel` must be true or a mapping of DiselConfig options, got {value!r}.")


class DiselPlugin(BasePlugin):
    """Turns DISeL on for `adapter: lora` / `adapter: qlora` when the YAML sets `disel`, and closes Axolotl's paths that
    would train or merge a DISeL adapter as plain LoRA without a word."""

    def get_input_args(self) -> str:
        return "axolotl_disel.args.DiselArgs"

    def register(self, cfg):
        """Checks the raw config (before Axolotl's validation, which would auto-enable the fused LoRA kernels).

        Args:
            cfg: The raw config of the YAML (with the CLI's overrides, e.g. `merge_lora` for `axolotl merge-lora`).
        """
        disel = cfg.get("disel")
        if cfg.get("merge_lora"):
            folder = cfg.get("lora_model_dir") or cfg.get("output_dir")
            if disel or _adapter_is_disel(folder):
                raise ValueError(
                    f"axolotl merge-lora cannot merge the DISeL adapter in {folder}: DISeL's update depends on the "
                    "input (a sigmoid gate per rank-one component), so there is no fixed weight delta to merge, and "
                    "Axolotl's merger would write plain LoRA weights without the gates, a different model. Use the "
                    "adapter unmerged instead: load it with PeftModel.from_pretrained (with the DISeL-enabled peft), "
                    "or serve it with vLLM and the vllm_disel plugin."
                )
        if disel is None and _adapter_is_disel(cfg.get("lora_model_dir")):
            LOG.info(
                "DISeL: lora_model_dir %s holds a DISeL adapter; the DISeL plugin applies as for `disel: true`.",
                cfg.get("lora_model_dir"),
            )
            cfg["disel"] = disel = True
        if disel in (None, False):
            if cfg.get("disel_gate_lr_ratio") is not None:
                raise ValueError("`disel_gate_lr_ratio` is set but `disel` is not: add `disel: true` to train DISeL.")
            return

        import axolotl

        if axolotl.__version__ != AXOLOTL_VERSION:
            LOG.warning(
                "DISeL: the plugin is tested with Axolotl %s, this is %s: check that the DISeL optimizer groups are "
                "logged at the start of training.",
                AXOLOTL_VERSION,
                axolotl.__version__,
            )
        if cfg.get("adapter") not in ("lora", "qlora"):
            raise ValueError(
                f"`disel` needs `adapter: lora` or `adapter: qlora`, got `adapter: {cfg.get('adapter')}`."
            )
        disel_option(disel)  # fails early on a bad mapping
        ratio = cfg.get("disel_gate_lr_ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0):
            raise ValueError(f"`disel_gate_lr_ratio` must be a positive number, got {ratio!r}.")

        for name in CONFLICTING_LR_OPTIONS:
            if cfg.get(name) is not None:
                raise ValueError(
                    f"`disel` cannot be combined with `{name}`: DISeL trains with its own optimizer parameter groups "
                    "(the gates at `disel_gate_lr_ratio` x learning_rate without weight decay), which "
                    f"`{name}` would replace or override. Remove `{name}`; set the gates' learning rate with "
                    "`disel_gate_lr_ratio`."
                )
        optimizer = str(cfg.get("optimizer") or "")
        if any(key in optimizer for key in _OWN_GROUP_OPTIMIZERS):
            raise ValueError(
                f"`disel` cannot be combined with `optimizer: {optimizer}`: that optimizer builds its own parameter "
                "groups, so the DISeL gates would not get their learning rate. Use an optimizer that takes parameter "
                "groups, e.g. `optimizer: adamw_torch`."
            )
        if cfg.get("relora"):
            raise ValueError(
                "`disel` cannot be combined with `relora`: ReLoRA merges the adapter into the base weights at each "
                "restart, and a DISeL adapter cannot be merged (its update depends on the input)."
            )

        explicit = [name for name in KERNEL_FLAGS if cfg.get(name)]
        if explicit:
            asked = ", ".join(f"{name}: true" for name in explicit)
            raise ValueError(
                f"`disel` cannot be used with Axolotl's fused LoRA kernels ({asked}): the kernels compute LoRA "
                "from A, B and the scaling only, without DISeL's gates, so they would train plain LoRA. Remove these "
                "options or set them to false."
            )
        if any(cfg.get(name) is None for name in KERNEL_FLAGS):
            LOG.info(
                "DISeL: Axolotl's fused LoRA kernels (%s) are switched off; they compute LoRA without DISeL's gates.",
                ", ".join(KERNEL_FLAGS),
            )
        for name in KERNEL_FLAGS:
            cfg[name] = False

    def get_lora_config_kwargs(self, cfg) -> dict:
        if not cfg.get("disel"):
            return {}
        return {"use_disel": disel_option(cfg.disel)}

    def post_trainer_create(self, cfg, trainer):
        """Makes the trainer build its optimizer with `create_disel_optimizer`.

        Axolotl 0.21.0 never calls the plugins' `create_optimizer` hook, so the trainer's own `create_optimizer` is
        replaced on this instance; the trainer calls it where it creates the optimizer (after FSDP wrapping, and from
        DeepSpeed's initialisation when the DeepSpeed config has no optimizer of its own).

        Args:
            cfg: The validated Axolotl config.
            trainer: The trainer Axolotl built.
        """
        if not cfg.get("disel"):
            return
        if not any(_GATE in name for name, _ in trainer.model.named_parameters()):
            raise RuntimeError("`disel` is set but the model has no DISeL gate: the adapter was not created as DISeL.")
        if trainer.optimizer is not None:
            raise RuntimeError(
                f"`disel` is set but the trainer already has an optimizer ({type(trainer.optimizer).__name__}), which "
                "would train the gates at the base learning rate."
            )
        ds_config = getattr(getattr(trainer.args, "hf_deepspeed_config", None), "config", None) or {}
        if "optimizer" in ds_config:
            raise ValueError(
                "`disel` cannot be used with a DeepSpeed config that has an `optimizer` section: DeepSpeed would build "
                "that optimizer and train the gates at the base learning rate. Remove the `optimizer` section; the "
                "trainer then builds the DISeL optimizer (from `optimizer:` of the YAML) and DeepSpeed wraps it."
            )
        ratio = cfg.get("disel_gate_lr_ratio")
        ratio = 5.0 if ratio is None else float(ratio)
        trainer.create_optimizer = types.MethodType(_make_create_optimizer(ratio), trainer)


def _make_create_optimizer(gate_lr_ratio: float):
    def create_optimizer(self, model=None):
        """The trainer's `create_optimizer`, with the DISeL gates in their own parameter group."""
        from peft.optimizers import create_disel_optimizer
        from transformers.trainer_optimizer import is_optimizer_factory

        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys():
            raise ValueError(
                f"`disel` cannot be combined with the optimizer {getattr(optimizer_cls, '__name__', optimizer_cls)}: "
                "it builds its own parameter groups, so the DISeL gates would not get their learning rate. Use an "
                "optimizer that takes parameter groups, e.g. `optimizer: adamw_torch`."
            )
        lr = optimizer_kwargs.pop("lr", self.args.learning_rate)
        optimizer_kwargs.pop("weight_decay", None)
        self.optimizer = create_disel_optimizer(
            opt_model,
            optimizer_cls,
            lr=lr,
            gate_lr_ratio=gate_lr_ratio,
            weight_decay=self.args.weight_decay,
            **optimizer_kwargs,
        )
        names = {id(p): n for n, p in opt_model.named_parameters()}
        for i, group in enumerate(self.optimizer.param_groups):
            gates = sum(_GATE in names.get(id(p), "") for p in group["params"])
            LOG.info(
                "DISeL optimizer %s, group %d: lr=%.4g weight_decay=%s tensors=%d (gates %d) numel=%d",
                optimizer_cls.__name__,
                i,
                group["lr"],
                group["weight_decay"],
                len(group["params"]),
                gates,
                sum(p.numel() for p in group["params"]),
            )
        return self.optimizer

    return create_optimizer
