"""DISeL gate tensors of a PEFT checkpoint: found, checked and folded into the one form the vLLM layers use.

PEFT saves a gate as `<prefix>.lora_disel_gate.weight` (`(r, d_in)`, or `(k, d_in)` for a bottleneck gate),
`<prefix>.lora_disel_gate.weight_up` (`(r, k)`, bottleneck gate only) and `<prefix>.lora_disel_gate.bias` (`(r,)`),
next to `<prefix>.lora_A.weight` and `<prefix>.lora_B.weight`. Serving uses `logits = W x + b` with
`W = norm * W_g` (full gate) or `W = norm * U V` (bottleneck gate): the same logits, one GEMM row per rank.
"""

from dataclasses import dataclass

import torch

from .config import DiselSpec


GATE = "lora_disel_gate"
GATE_PARAMS = ("weight", "bias", "weight_up")


@dataclass
class GateWeights:
    """The gate of one DISeL adapter in one layer, ready for serving.

    Args:
        weight: `(r, d_in)`, the normalization (and a bottleneck's up-projection) folded in; in the LoRA dtype.
        bias: `(r,)`, float32.
    """

    weight: torch.Tensor
    bias: torch.Tensor


def split_gate_tensors(tensors: dict) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Separate the gate tensors of a checkpoint from the rest.

    Returns `(gates, rest)`: `gates` maps each layer's key prefix (e.g. `base_model.model.model.layers.0.mlp.up_proj`)
    to its gate tensors by parameter name; `rest` holds every other tensor, as vLLM's loader expects them.
    """
    gates: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    marker = f".{GATE}."
    for name, tensor in tensors.items():
        if marker not in name:
            rest[name] = tensor
            continue
        prefix, param = name.rsplit(marker, 1)
        if param not in GATE_PARAMS:
            raise ValueError(
                f"Unknown DISeL gate tensor {name!r}: vllm_disel knows {[f'{GATE}.{p}' for p in GATE_PARAMS]}."
            )
        gates.setdefault(prefix, {})[param] = tensor
    return gates, rest


def fold_gate(
    layer: str, params: dict[str, torch.Tensor], lora_a: torch.Tensor, spec: DiselSpec, dtype=None
) -> GateWeights:
    """Check the gate of `layer` against its `lora_A` and the adapter's DISeL options, and fold it.

    Args:
        layer: the layer's name, for error messages.
        params: the gate tensors by parameter name (`weight`, `bias`, and `weight_up` for a bottleneck gate).
        lora_a: the layer's `lora_A` weight, `(r, d_in)`.
        spec: the adapter's DISeL options.
        dtype: the dtype of the folded weight (vLLM's LoRA dtype); `lora_a`'s if `None`.
    """
    r, d_in = lora_a.shape
    missing = [p for p in ("weight", "bias") if p not in params]
    if missing:
        raise ValueError(f"The DISeL gate of layer {layer!r} lacks {[f'{GATE}.{p}' for p in missing]}.")
    weight, bias = params["weight"], params["bias"]
    weight_up = params.get("weight_up")
    k = spec.gate_bottleneck_dim
    if (weight_up is None) != (k is None):
        raise ValueError(
            f"The DISeL gate of layer {layer!r} {'has' if weight_up is not None else 'lacks'} `{GATE}.weight_up` but "
            f"adapter_config.json sets gate_bottleneck_dim={k!r}: the config and the weights do not match."
        )
    rows = r if k is None else k
    if weight.dim() != 2 or tuple(weight.shape) != (rows, d_in):
        raise ValueError(
            f"The DISeL gate weight of layer {layer!r} has shape {tuple(weight.shape)}, expected {(rows, d_in)} "
            f"(lora_A is {(r, d_in)}{f', gate_bottleneck_dim={k}' if k else ''})."
        )
    if weight_up is not None and tuple(weight_up.shape) != (r, k):
        raise ValueError(
            f"The DISeL gate up-projection of layer {layer!r} has shape {tuple(weight_up.shape)}, expected {(r, k)}."
        )
    if tuple(bias.shape) != (r,):
        raise ValueError(f"The DISeL gate bias of layer {layer!r} has shape {tuple(bias.shape)}, expected {(r,)}.")
    full = weight.float() if weight_up is None else weight_up.float() @ weight.float()
    norm = spec.gate_norm(d_in)
    if norm != 1.0:
        full = full * norm
    return GateWeights(weight=full.to(dtype or lora_a.dtype), bias=bias.float().clone())
