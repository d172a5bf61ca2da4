"""Where the plugin hooks into vLLM's LoRA machinery (vLLM 0.32.0), at run time; no vLLM file is changed.

- `PEFTHelper.from_dict`: keeps the DISeL options of adapter_config.json (as `peft_helper.disel`), which vLLM would
  otherwise drop with every field it does not know, and refuses options the plugin does not know.
- `parse_fine_tuned_lora_name`, as `vllm.lora.lora_model` uses it to check a checkpoint's module names: a gate tensor
  is checked as its layer's `lora_A` is (vLLM refuses any other tensor name as an "unsupported LoRA weight").
- `LoRAModel.from_lora_tensors`: takes the gate tensors out before vLLM reads the LoRA tensors, then checks and folds
  them and attaches them to each layer's `LoRALayerWeights` (as `disel_gate`).
- `PackedLoRALayerWeights.pack`: carries the gates of the modules vLLM packs into one layer (q/k/v, gate/up).
- `LoRAModelManager._add_adapter`: refuses an adapter with a gate on a layer that has no DISeL layer class.
- `LoRAModelManager.activate_adapter`: installs the gates in the slot that vLLM gave the adapter.
- `LoRAModelManager.__init__`: notes whether the engine runs eagerly, which the DISeL layers need (see `layers.py`).
- `PunicaWrapperBase._update_base_metadata`: records the slots of the batch's adapters, so that a DISeL layer runs
  vLLM's own path for a batch without DISeL tokens.
- `vllm.lora.utils._all_lora_classes`: the linear LoRA layer classes are replaced by their DISeL subclasses
  (`layers.py`), which run vLLM's own path while no DISeL adapter occupies a slot.

One hook fixes a bug of vLLM's CPU LoRA ops that mixed batches expose (`bgmv_shrink` of `vllm.lora.ops.torch_ops`,
which `sgmv_shrink` and the CPU punica wrapper call): a token without an adapter (slot index -1) is computed with the
weights of the last slot (`lora_a_weights[-1]`), so in a batch that mixes adapters and rows without one, and whose last
slot is taken, the rows without an adapter get that adapter's update. The hook zeroes those tokens' shrink output (vLLM's
GPU kernels skip index -1 the same way).
"""

import inspect

from vllm.config.compilation import CompilationMode, CUDAGraphMode
from vllm.logger import init_logger
from vllm.lora import lora_model as lora_model_module
from vllm.lora import utils as lora_utils
from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import PackedLoRALayerWeights
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.ops import torch_ops
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.punica_wrapper import punica_cpu
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

from .config import parse_disel
from .gates import GATE, fold_gate, split_gate_tensors
from .layers import DISEL_CLASSES, DiselLinearMixin


logger = init_logger(__name__)

_installed = False
_original = {}


def install() -> None:
    """Install the hooks (once per process: vLLM loads general plugins in every process it starts)."""
    global _installed
    if _installed:
        return
    _original["from_dict"] = PEFTHelper.from_dict.__func__
    _original["parse"] = lora_model_module.parse_fine_tuned_lora_name
    _original["from_lora_tensors"] = LoRAModel.from_lora_tensors.__func__
    _original["pack"] = PackedLoRALayerWeights.pack.__func__
    _original["_add_adapter"] = LoRAModelManager._add_adapter
    _original["activate_adapter"] = LoRAModelManager.activate_adapter
    _original["bgmv_shrink"] = lora_ops.bgmv_shrink
    _original["manager_init"] = LoRAModelManager.__init__
    _original["_update_base_metadata"] = PunicaWrapperBase._update_base_metadata

    PEFTHelper.from_dict = classmethod(_from_dict)
    lora_model_module.parse_fine_tuned_lora_name = _parse_fine_tuned_lora_name
    LoRAModel.from_lora_tensors = classmethod(_from_lora_tensors)
    PackedLoRALayerWeights.pack = classmethod(_pack)
    LoRAModelManager._add_adapter = _add_adapter
    LoRAModelManager.activate_adapter = _activate_adapter
    LoRAModelManager.__init__ = _manager_init
    PunicaWrapperBase._update_base_metadata = _update_base_metadata
    lora_utils._all_lora_classes = tuple(DISEL_CLASSES.get(cls, cls) for cls in lora_utils._all_lora_classes)
    for module in (lora_ops, torch_ops, punica_cpu):
        module.bgmv_shrink = _bgmv_shrink
    _installed = True
    logger.info("vllm_disel: DISeL adapters enabled (linear LoRA layers: %d classes).", len(DISEL_CLASSES))


def _from_dict(cls, config_dict: dict):
    helper = _original["from_dict"](cls, config_dict)
    helper.disel = parse_disel(config_dict)
    return helper


def _parse_fine_tuned_lora_name(name: str, weights_mapper=None):
    marker = f".{GATE}."
    if marker in name:
        # a gate belongs to its layer: check the layer as vLLM checks the layer's lora_A
        name = name.rsplit(marker, 1)[0] + ".lora_A.weight"
    return _original["parse"](name, weights_mapper)


_FROM_LORA_TENSORS_SIGNATURE = None


def _from_lora_tensors(cls, *args, **kwargs):
    global _FROM_LORA_TENSORS_SIGNATURE
    if _FROM_LORA_TENSORS_SIGNATURE is None:
        _FROM_LORA_TENSORS_SIGNATURE = inspect.signature(_original["from_lora_tensors"])
    bound = _FROM_LORA_TENSORS_SIGNATURE.bind(cls, *args, **kwargs)
    bound.apply_defaults()
    tensors, peft_helper = bound.arguments["tensors"], bound.arguments["peft_helper"]
    gates, rest = split_gate_tensors(tensors)
    spec = getattr(peft_helper, "disel", None)
    if gates and spec is None:
        example = next(iter(gates))
        raise ValueError(
            f"The adapter has DISeL gate weights ({example}.{GATE}.*) but its adapter_config.json does not set "
            "`use_disel`: it cannot be served as a plain LoRA adapter. Save it again with PEFT (LoraConfig(use_disel="
            "True)) so that the config says what the weights are."
        )
    bound.arguments["tensors"] = rest
    model = _original["from_lora_tensors"](*bound.args, **bound.kwargs)
    if spec is not None:
        _attach_gates(cls, model, gates, rest, spec, bound.arguments)
    return model


def _attach_gates(cls, model, gates: dict, rest: dict, spec, arguments: dict) -> None:
    mapper, skip = arguments["weights_mapper"], arguments["skip_prefixes"]
    dtype = arguments["dtype"]
    gated = set()
    for prefix, params in gates.items():
        if skip and cls._should_skip_module(prefix + ".lora_A.weight", skip):
            continue
        if f"{prefix}.lora_embedding_A" in rest:
            layer, _ = _original["parse"](f"{prefix}.lora_embedding_A", mapper)
            raise ValueError(
                f"The DISeL adapter has a gate on the embedding layer {layer!r}, which vllm_disel does not support: "
                "vLLM applies embedding LoRA as a table lookup without a gate. Train the adapter without the "
                "embedding in `target_modules` (or serve it with PEFT)."
            )
        layer, _ = _original["parse"](prefix + ".lora_A.weight", mapper)
        if layer.rsplit(".", 1)[-1] == "lm_head":
            raise ValueError(
                f"The DISeL adapter has a gate on {layer!r}, which vllm_disel does not support: vLLM applies lm_head "
                "LoRA in its logits processor, which has no gate. Train the adapter without `lm_head` in "
                "`target_modules` (or serve it with PEFT)."
            )
        lora = model.loras.get(layer)
        if lora is None or lora.lora_a is None:
            raise ValueError(f"The DISeL adapter has a gate for layer {layer!r} but no lora_A/lora_B for it.")
        lora.disel_gate = fold_gate(layer, params, lora.lora_a, spec, dtype)
        gated.add(layer)
    ungated = sorted(set(model.loras) - gated)
    if ungated:
        raise ValueError(
            f"The DISeL adapter has LoRA weights without a DISeL gate on {ungated}: PEFT saves a gate for every "
            "layer of a DISeL adapter, so the checkpoint is incomplete."
        )


def _pack(cls, loras):
    packed = _original["pack"](cls, loras)
    gates = [None if lora is None else getattr(lora, "disel_gate", None) for lora in loras]
    if any(g is not None for g in gates):
        packed.disel_gate = gates
    return packed


def _add_adapter(self, lora) -> None:
    _original["_add_adapter"](self, lora)
    try:
        _check_layers(self, lora)
    except Exception:
        self._registered_adapters.pop(lora.id, None)
        raise


def _manager_init(self, *args, **kwargs) -> None:
    _original["manager_init"](self, *args, **kwargs)
    vllm_config = inspect.signature(_original["manager_init"]).bind(self, *args, **kwargs).arguments["vllm_config"]
    compilation = vllm_config.compilation_config
    self.disel_eager_reason = None
    if compilation.mode != CompilationMode.NONE or compilation.cudagraph_mode != CUDAGraphMode.NONE:
        self.disel_eager_reason = (
            f"this engine runs with torch.compile mode {compilation.mode.name} and CUDA graph mode "
            f"{compilation.cudagraph_mode.name}"
        )


def _update_base_metadata(self, mapping, lora_index_to_id, *args, **kwargs) -> None:
    _original["_update_base_metadata"](self, mapping, lora_index_to_id, *args, **kwargs)
    ids = set(mapping.index_mapping)
    self.disel_batch_slots = tuple(
        i for i, lora_id in enumerate(lora_index_to_id) if lora_id is not None and lora_id in ids
    )


def _check_layers(manager, lora) -> None:
    for name, weights in lora.loras.items():
        gate = getattr(weights, "disel_gate", None)
        if gate is None:
            continue
        reason = getattr(manager, "disel_eager_reason", None)
        if reason:
            raise ValueError(
                f"vllm_disel serves DISeL adapters in eager mode only, but {reason}: its layers choose the gated path "
                "per batch in Python, which torch.compile and CUDA graphs would freeze. Start vLLM with "
                "enforce_eager=True (--enforce-eager)."
            )
        module = manager.modules.get(name)
        if module is None:
            continue  # vLLM leaves out LoRA weights of layers it does not wrap; their gates go with them
        # the model's layer is not supported: a ValueError like every other refusal of an adapter
        if not isinstance(module, DiselLinearMixin):
            hint = (
                " Serve DISeL adapters without `fully_sharded_loras`."
                if "Sharded" in type(module).__name__
                else " vllm_disel supports the linear layers (column/row-parallel, merged, QKV, replicated)."
            )
            raise ValueError(  # noqa: TRY004
                f"vllm_disel cannot apply the DISeL gate of layer {name!r}: vLLM serves its LoRA with "
                f"{type(module).__name__}, which has no DISeL support.{hint}"
            )
        if isinstance(gate, list) and len(gate) != module.n_slices:
            raise ValueError(
                f"vllm_disel cannot apply the DISeL gates of layer {name!r}: {len(gate)} packed modules for "
                f"{module.n_slices} output slices of {type(module).__name__}."
            )


def _activate_adapter(self, lora_id: int) -> bool:
    activated = _original["activate_adapter"](self, lora_id)
    if activated:
        index = self.lora_index_to_id.index(lora_id)
        lora_model = self._registered_adapters[lora_id]
        for name, module in self.modules.items():
            if isinstance(module, DiselLinearMixin):
                weights = self._get_lora_layer_weights(lora_model, name)
                module.set_disel_gate(index, None if weights is None else getattr(weights, "disel_gate", None))
    return activated


def _bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    _original["bgmv_shrink"](inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
    # tokens without an adapter (-1) read the last slot's A above (negative indexing): no update for them
    no_adapter = lora_indices_tensor < 0
    if no_adapter.any():
        output_tensor[: no_adapter.shape[0]][no_adapter] = 0
