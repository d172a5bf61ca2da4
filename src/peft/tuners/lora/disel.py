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
"""DISeL (Dynamic Input-Sensitive LoRA), https://huggingface.co/papers/2605.19028.

DISeL multiplies each rank-one component of a LoRA update by an input-dependent sigmoid gate:

    delta(x) = scaling * B(g(x) * A(dropout(x))),   g(x) = sigmoid(W_g x + b_g)

The gate reads the layer input `x`, one independent gate per rank. This module holds the sub-config, the gate module and
the math; `variants.py` holds the thin `LoraVariant` classes that plug it into the LoRA layers.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DiselConfig:
    """
    Sub-configuration of DISeL (Dynamic Input-Sensitive LoRA, [arXiv:2605.19028](https://huggingface.co/papers/2605.19028)).

    Pass it as `LoraConfig(use_disel=True, disel_config=DiselConfig(...))`; with `use_disel=True` alone, these defaults
    are used. DISeL gates each rank-one component of the LoRA update with `sigmoid(W_g x + b_g)`, so the adapter only
    changes the inputs for which opening a gate lowered the fine-tuning loss.

    Args:
        gate_bias_init (`float`):
            Initial value of the gate bias `b_g`. The default `-3.0` opens each gate to `sigmoid(-3) ≈ 0.05` at the
            start. More negative values (`-5`, `-7`) start more conservatively and favour retention of the pre-trained
            behaviour, which helps on small datasets.
        gate_weight_init (`Literal["random", "zero"]`):
            Initialization of the gate weight `W_g`: `"random"` uses `nn.Linear`'s default initialization, `"zero"`
            starts every gate at exactly `sigmoid(gate_bias_init)` for all inputs (an ablation). With a bottleneck gate,
            `"zero"` zeroes the up-projection only, so that the gate still receives a gradient.
        gate_normalize (`bool`):
            If `True`, scale the input term of the gate logits by `1/sqrt(d_in)`: `W_g x / sqrt(d_in) + b_g`. The bias
            is not scaled, so the gates still start at `sigmoid(gate_bias_init)`.
        gate_bottleneck_dim (`Optional[int]`):
            If set, use a low-rank gate `W_g = U V` with `V` of shape `(gate_bottleneck_dim, d_in)` and `U` of shape `(r,
            gate_bottleneck_dim)`, which adds `gate_bottleneck_dim * (d_in + r) + r` parameters per layer instead of `r
            * (d_in + 1)`. `None` (default) uses a full gate.
        gate_lr_ratio (`float`):
            Learning rate of the gate parameters relative to the other adapter parameters, used by
            [`~peft.optimizers.create_disel_optimizer`]. The paper trains the gates at 5x the LoRA learning rate; the gate
            learning rate is the main knob of the adaptation-versus-retention trade-off.
    """

    gate_bias_init: float = field(
        default=-3.0, metadata={"help": "Initial gate bias; sigmoid(-3) ≈ 0.05 keeps the gates nearly closed."}
    )
    gate_weight_init: Literal["random", "zero"] = field(
        default="random", metadata={"help": "Gate weight init: 'random' (nn.Linear default) or 'zero'."}
    )
    gate_normalize: bool = field(
        default=False, metadata={"help": "Scale the input term of the gate logits by 1/sqrt(d_in)."}
    )
    gate_bottleneck_dim: Optional[int] = field(
        default=None, metadata={"help": "Rank of a low-rank gate W_g = U V; None for a full gate."}
    )
    gate_lr_ratio: float = field(
        default=5.0, metadata={"help": "Gate learning rate relative to the LoRA learning rate (paper: 5)."}
    )

    def __post_init__(self):
        if isinstance(self.gate_bias_init, bool) or not isinstance(self.gate_bias_init, (int, float)):
            raise TypeError(f"`gate_bias_init` must be a number, got {self.gate_bias_init!r}.")
        if not math.isfinite(self.gate_bias_init):
            raise ValueError(f"`gate_bias_init` must be finite, got {self.gate_bias_init}.")
        if self.gate_weight_init not in ("random", "zero"):
            raise ValueError(f"`gate_weight_init` must be 'random' or 'zero', got {self.gate_weight_init!r}.")
        if not isinstance(self.gate_normalize, bool):
            raise TypeError(f"`gate_normalize` must be a bool, got {self.gate_normalize!r}.")
        if self.gate_bottleneck_dim is not None and (
            isinstance(self.gate_bottleneck_dim, bool)
            or not isinstance(self.gate_bottleneck_dim, int)
            or self.gate_bottleneck_dim <= 0
        ):
            raise ValueError(
                f"`gate_bottleneck_dim` must be a positive integer or None, got {self.gate_bottleneck_dim!r}."
            )
        if (
            isinstance(self.gate_lr_ratio, bool)
            or not (isinstance(self.gate_lr_ratio, (int, float)) and math.isfinite(self.gate_lr_ratio))
            or self.gate_lr_ratio <= 0
        ):
            raise ValueError(f"`gate_lr_ratio` must be a positive number, got {self.gate_lr_ratio!r}.")


# init_lora_weights values that rewrite the base weight or give B a non-zero start: with them the model no longer starts
# at the pre-trained mapping, which is the point of DISeL's closed gates.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica", "orthogonal")


def check_disel_lora_config(config) -> None:
    """Validate the DISeL-related fields of a `LoraConfig`, called from its `__post_init__`."""
    if not config.use_disel:
        if config.disel_config is not None:
            raise ValueError("`disel_config` was given but `use_disel` is False: pass `use_disel=True` to use DISeL.")
        return

    others = [
        name
        for name, active in (
            ("use_dora", config.use_dora),
            ("alora_invocation_tokens", config.alora_invocation_tokens),
            ("kasa_config", config.kasa_config),
            ("velora_config", config.velora_config),
            ("monteclora_config", config.monteclora_config),
            ("arrow_config", config.arrow_config),
            ("use_bdlora", config.use_bdlora),
            ("use_qalora", getattr(config, "use_qalora", False)),
        )
        if active
    ]
    if others:
        raise ValueError(f"DISeL cannot be combined with other LoRA variants, got `use_disel=True` and {others}.")
    if config.lora_bias:
        raise ValueError(
            "DISeL does not support `lora_bias=True`: an ungated bias would change the output for every input. "
            "Pass `lora_bias=False`."
        )
    if config.megatron_config:
        raise ValueError("DISeL does not support `megatron_config`: Megatron's LoRA layers do not run LoRA variants.")
    if config.target_parameters:
        raise ValueError(
            "DISeL does not support `target_parameters`: parameter targets are merged on the fly, which an "
            "input-dependent gate cannot be. Use `target_modules` instead."
        )
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"DISeL does not support `init_lora_weights={init!r}`: it rewrites the base weight (or starts B away from "
            "zero), so the model would no longer start at the pre-trained mapping. Use `init_lora_weights=True` or "
            "'gaussian'."
        )


def check_disel_supported(layer, config) -> None:
    """Refuse DISeL on a LoRA layer type that would silently fall back to plain LoRA, before the layer is changed.

    Only the layer classes of `peft.tuners.lora.layer` that register DISeL in their `lora_variants` run it. Quantized and
    other special layers (bitsandbytes, GPTQ, HQQ, AWQ, EETQ, AQLM, torchao, INC, Transformer Engine, Megatron,
    MultiheadAttention, ParamWrapper) either ignore unknown variants or were not tested with DISeL.
    """
    if not getattr(config, "use_disel", False):
        return
    declared = any("use_disel" in keys for keys in layer.lora_variants)
    if declared and type(layer).__module__ == "peft.tuners.lora.layer":
        return
    base = layer.get_base_layer()
    raise ValueError(
        f"DISeL is not supported on {type(base).__name__} layers (LoRA layer type {type(layer).__name__}); only "
        "nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv1d/2d/3d are. Remove these modules from "
        "`target_modules`, or add a plain LoRA adapter (`use_disel=False`) for them."
    )


class DiselGate(nn.Module):
    """The gate of one DISeL adapter in one layer: `logits(x) = norm * W_g x + bias`, one logit per LoRA rank.

    The parameters are direct leaves of the module, as PEFT's checkpoint format expects of an adapter entry:

    - `weight`: reads the layer input the way `lora_A` does, so it has `lora_A`'s shape with `r` (or
      `gate_bottleneck_dim`) outputs: `(out, d_in)` for a linear layer, `(out, in_channels, *kernel_size)` for a
      convolution (same stride and padding), and `(out, num_embeddings)` for an embedding, where it is a table of logits
      per token id (the one-hot analogue of `W_g x`).
    - `weight_up`: `(r, gate_bottleneck_dim)`, only for a low-rank gate `W_g = U V`; `None` otherwise.
    - `bias`: `(r,)`.
    """

    def __init__(self, weight: torch.Tensor, r: int, bottleneck: Optional[int], norm: float, bias_init: float, layer):
        super().__init__()
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.weight = nn.Parameter(torch.empty(bottleneck or r, *weight.shape[1:], **kw))
        self.weight_up = nn.Parameter(torch.empty(r, bottleneck, **kw)) if bottleneck else None
        self.bias = nn.Parameter(torch.full((r,), float(bias_init), **kw))
        self.norm = norm
        if isinstance(layer, nn.Linear):
            self.kind = "linear"
        elif isinstance(layer, nn.modules.conv._ConvNd):
            self.kind = "conv"
            self.conv_fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
            self.stride, self.padding = layer.stride, layer.padding
        else:
            self.kind = "embedding"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """`V x` (or `W_g x` for a full gate), before the bottleneck's up-projection, the normalization and the bias."""
        if self.kind == "linear":
            return F.linear(x, self.weight)
        if self.kind == "conv":
            return self.conv_fn(x, self.weight, stride=self.stride, padding=self.padding)
        return F.embedding(x, self.weight.T)

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        """The logits from the projection `h`: up-projection (bottleneck), normalization and bias."""
        channel_last = self.kind != "conv"
        if self.weight_up is not None:
            if channel_last:
                # one addmm: norm * U h + bias (the norm scales the small U, not the activations)
                weight_up = self.weight_up * self.norm if self.norm != 1.0 else self.weight_up
                return F.linear(h, weight_up, self.bias)
            h = torch.einsum("rk,bk...->br...", self.weight_up, h)
        bias = self.bias if channel_last else self.bias.view(-1, *([1] * (h.dim() - 2)))
        if self.norm != 1.0:
            return torch.add(bias, h, alpha=self.norm)  # norm * h + bias in one op
        return h + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gate logits for input `x`."""
        return self.finish(self.project(x))


def create_disel_gate(module, adapter_name: str, config) -> None:
    """Create the gate of `adapter_name` in the LoRA layer `module`, on `lora_A`'s device and dtype."""
    disel_config = config.disel_config or DiselConfig()
    if adapter_name in module.lora_A:
        layer = module.lora_A[adapter_name]
        weight = layer.weight
    else:
        layer = None
        weight = module.lora_embedding_A[adapter_name]
    d_in = weight[0].numel()
    norm = 1.0 / math.sqrt(d_in) if disel_config.gate_normalize else 1.0
    gate = DiselGate(
        weight,
        r=module.r[adapter_name],
        bottleneck=disel_config.gate_bottleneck_dim,
        norm=norm,
        bias_init=disel_config.gate_bias_init,
        layer=layer,
    )
    if weight.device.type != "meta":
        reset_disel_gate(gate, disel_config.gate_weight_init)

    if not hasattr(module, "lora_disel_gate"):
        # first DISeL adapter of this layer: register the container so that the gates are trained, saved and moved
        module.lora_disel_gate = nn.ModuleDict({})
        module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_disel_gate",)
    module.lora_disel_gate[adapter_name] = gate


@torch.no_grad()
def reset_disel_gate(gate: DiselGate, weight_init: str) -> None:
    """(Re-)initialize the gate weights: nn.Linear's default init, or zero (the up-projection only, with a bottleneck)."""
    for weight in (gate.weight, gate.weight_up):
        if weight is not None:
            # kaiming_uniform_(a=sqrt(5)) over the fan-in is the default init of nn.Linear and nn.ConvNd
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if weight_init == "zero":
        nn.init.zeros_(gate.weight_up if gate.weight_up is not None else gate.weight)


def _concat_weight(weight_a: torch.Tensor, weight_g: torch.Tensor, norm: float) -> torch.Tensor:
    return torch.cat([weight_a, weight_g * norm if norm != 1.0 else weight_g])


class _DiselProjection(torch.autograd.Function):
    """`[A x | norm * W_g x + b]`: A and the gate projection as one GEMM (with the bias of the gate half folded in).

    The weights are concatenated on the fly, in forward and again in backward, so that only the weights themselves are
    saved: with `F.linear(x, torch.cat(...))` autograd would keep the concatenated copy for backward in every layer.
    `bias` is `None` for a bottleneck gate, whose projection output is `V x`. Under autocast the backward GEMMs run in
    the dtype of the forward GEMM, like autocast's own casts.
    """

    @staticmethod
    def forward(x, weight_a, weight_g, bias, norm):
        weight = _concat_weight(weight_a, weight_g, norm)
        if bias is None:
            return F.linear(x, weight)
        return F.linear(x, weight, torch.cat([bias.new_zeros(weight_a.shape[0]), bias]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight_a, weight_g, bias, norm = inputs
        ctx.save_for_backward(x, weight_a, weight_g)
        ctx.norm = norm
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_h):
        x, weight_a, weight_g = ctx.saved_tensors
        r, dtype = weight_a.shape[0], grad_h.dtype
        grad_x = grad_a = grad_g = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ _concat_weight(weight_a, weight_g, ctx.norm).to(dtype)).to(x.dtype)
        grad_h = grad_h.reshape(-1, grad_h.shape[-1])
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w = grad_h.T @ x.reshape(-1, x.shape[-1]).to(dtype)
            grad_a, grad_g = grad_w.split([r, weight_g.shape[0]])
            grad_a = grad_a.to(weight_a.dtype)
            grad_g = grad_g * ctx.norm if ctx.norm != 1.0 else grad_g
            grad_g = grad_g.to(weight_g.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_h[:, r:].sum(0).to(ctx.bias_dtype)
        return grad_x, grad_a, grad_g, grad_bias, None


_FUSABLE_A = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _can_fuse(lora_A: nn.Module, gate: DiselGate, dropout: nn.Module) -> bool:
    """Whether `A x` and the gate projection can run as one GEMM over `x`.

    Needs a no-op dropout (A and the gate then read the same input) and plain modules whose weights are read directly:
    no hooks or wrappers (DeepSpeed ZeRO-3 and FSDP gather the weights of `lora_A` and the gate in their own forward
    hooks, so those keep the module calls).
    """
    if isinstance(dropout, nn.Dropout):
        if dropout.training and dropout.p > 0:
            return False
    elif not isinstance(dropout, nn.Identity):
        return False
    if type(lora_A) not in _FUSABLE_A or type(gate) is not DiselGate:
        return False
    if lora_A._forward_hooks or lora_A._forward_pre_hooks or gate._forward_hooks or gate._forward_pre_hooks:
        return False
    a_weight, g_weight = lora_A.weight, gate.weight
    return a_weight.dtype == g_weight.dtype and a_weight.device == g_weight.device


def _disel_linear_delta_plain(module, adapter_name: str, x: torch.Tensor, lora_A, gate) -> torch.Tensor:
    """Separate module calls for A and the gate: used when dropout is active (A reads dropout(x), the gate x)."""
    lora_B = module.lora_B[adapter_name]
    dropout = module.lora_dropout[adapter_name]
    a = lora_A(dropout(x)) * module.scaling[adapter_name]
    return lora_B(a * torch.sigmoid(gate(x)))


def _disel_linear_delta_fused(module, adapter_name: str, x: torch.Tensor, lora_A, gate) -> torch.Tensor:
    """`A x` and the gate projection as one GEMM (or convolution) over `x` with the concatenated weights.

    The weights are concatenated on every call: a copy of `r x d_in` values, negligible next to the GEMM (a cached copy
    measured no faster, and would have to follow in-place optimizer updates).
    """
    lora_B = module.lora_B[adapter_name]
    r, n_gate = lora_A.weight.shape[0], gate.weight.shape[0]
    full_gate = gate.weight_up is None
    # the full gate's normalization and bias go into the projection, which then gives [A x | gate logits]
    norm, bias = (gate.norm, gate.bias) if full_gate else (1.0, None)
    if gate.kind == "conv":
        bias = None if bias is None else torch.cat([bias.new_zeros(r), bias])
        weight = _concat_weight(lora_A.weight, gate.weight, norm)
        h = gate.conv_fn(x, weight, bias, lora_A.stride, lora_A.padding, lora_A.dilation, lora_A.groups)
        dim = 1
    else:
        # without autograd (inference), skip the autograd.Function machinery: it costs more than the ops here
        projection = _DiselProjection.apply if torch.is_grad_enabled() else _DiselProjection.forward
        h = projection(x, lora_A.weight, gate.weight, bias, norm)
        dim = -1
    if full_gate:
        # a * sigmoid(logits) in one kernel (and one in backward); it saves h, which autograd frees after backward
        out = F.glu(h, dim)
    else:
        a, v = h.split([r, n_gate], dim)
        out = a * torch.sigmoid(gate.finish(v))
    # the scaling on the r-wide product rather than on the d_out-wide output of B
    return lora_B(out * module.scaling[adapter_name])


def disel_linear_delta(module, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """`scaling * B(g(x) * A(dropout(x)))` for a Linear (or transformers Conv1D) or a Conv1d/2d/3d layer.

    With a no-op dropout (`lora_dropout=0`, or eval mode), `A x` and the gate projection share one GEMM over `x`.
    """
    lora_A = module.lora_A[adapter_name]
    gate = module.lora_disel_gate[adapter_name]
    # the two modules are looked up once per call and handed on: this runs for every adapted layer on every forward
    if _can_fuse(lora_A, gate, module.lora_dropout[adapter_name]):
        return _disel_linear_delta_fused(module, adapter_name, x, lora_A, gate)
    return _disel_linear_delta_plain(module, adapter_name, x, lora_A, gate)


def disel_embedding_delta(module, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """`scaling * B(g(ids) * A[ids])` for an Embedding layer, including the layer's embedding scale if it has one."""
    embedding_A = module.lora_embedding_A[adapter_name].T
    embedding_B = module.lora_embedding_B[adapter_name].T
    input_fn = module.input_fns.get(adapter_name, None)
    output_fn = module.output_fns.get(adapter_name, None)
    after_A = module._embed(x, embedding_A, input_fn=input_fn, output_fn=output_fn)
    gate = module.lora_disel_gate[adapter_name]
    logits = gate(x)
    # the scaling on the r-wide product, not on the d_out-wide delta
    delta = ((after_A * module.scaling[adapter_name]) * torch.sigmoid(logits)) @ embedding_B
    embed_scale = module._get_embed_scale()
    if embed_scale is not None:
        delta = delta * embed_scale.to(delta.dtype)
    return delta


MERGE_ERROR = (
    "Cannot merge the DISeL adapter '{adapter}': its update depends on the input through the gate "
    "sigmoid(W_g x + b_g), so there is no fixed weight delta to fold into the base weight. Nothing was merged. Keep "
    "the adapter unmerged for inference, or use `unload()` to remove it."
)


def warn_missing_disel_gates(missing_keys, adapter_name: str) -> None:
    """Warn loudly when a checkpoint lacks DISeL gate weights: they would silently stay at their fresh init."""
    missing = [k for k in missing_keys if f".lora_disel_gate.{adapter_name}." in k]
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        warnings.warn(
            f"The checkpoint for DISeL adapter '{adapter_name}' has no weights for {len(missing)} gate parameter(s), "
            f"which keep their fresh initialization instead of trained values (or, with `low_cpu_mem_usage=True`, "
            f"stay on the meta device): {shown}. The checkpoint was probably saved without its gates (e.g. by a "
            "separate DISeL package that stores them in another file); the adapter will not behave as trained.",
            UserWarning,
            stacklevel=3,
        )
