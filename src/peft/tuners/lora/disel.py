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

The gate reads the layer input `x`, one independent gate per rank. This module holds the gate module and the math; the
options are `DiselConfig` in `config.py`, and `variants.py` holds the thin `LoraVariant` classes that plug the math into
the LoRA layers.
"""

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import DiselConfig


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

    def __init__(
        self,
        weight: torch.Tensor,
        r: int,
        bottleneck: Optional[int],
        norm: float,
        bias_init: float,
        layer,
        padding_idx: Optional[int] = None,
    ):
        super().__init__()
        kw = {"device": weight.device, "dtype": weight.dtype}
        self.weight = nn.Parameter(torch.empty(bottleneck or r, *weight.shape[1:], **kw))
        self.weight_up = nn.Parameter(torch.empty(r, bottleneck, **kw)) if bottleneck else None
        self.bias = nn.Parameter(torch.full((r,), float(bias_init), **kw))
        self.norm = norm
        self._logits_hooks: dict[int, Callable] = OrderedDict()
        if isinstance(layer, nn.Linear):
            self.kind = "linear"
        elif isinstance(layer, nn.modules.conv._ConvNd):
            self.kind = "conv"
            self.conv_fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
            self.stride, self.padding = layer.stride, layer.padding
        else:
            self.kind = "embedding"
            self.padding_idx = padding_idx

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """`V x` (or `W_g x` for a full gate), before the bottleneck's up-projection, the normalization and the bias."""
        if self.kind == "linear":
            return F.linear(x, self.weight)
        if self.kind == "conv":
            return self.conv_fn(x, self.weight, stride=self.stride, padding=self.padding)
        # the padding token's logits get no gradient, as its embedding row does not
        return F.embedding(x, self.weight.T, padding_idx=self.padding_idx)

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

    @torch.no_grad()
    def pad_rank(self, target_rank: int) -> None:
        """Pad the gate to `target_rank` ranks (for `prepare_model_for_compiled_hotswap`). The padded ranks of A and B
        are zero, so whatever their gates are, they contribute nothing."""
        r = self.bias.shape[0]
        if target_rank <= r:
            return
        names = ["bias", "weight_up"] if self.weight_up is not None else ["bias", "weight"]
        for name in names:
            param = getattr(self, name)
            padded = param.new_zeros(target_rank, *param.shape[1:])
            padded[:r] = param
            setattr(self, name, nn.Parameter(padded, requires_grad=param.requires_grad))

    def register_logits_hook(self, hook: Callable[["DiselGate", torch.Tensor], None]) -> RemovableHandle:
        """Call `hook(gate, logits)` with the gate logits of every forward of the adapter, whichever path computes them
        (the gate diagnostics record the openings this way). The logits are `(..., r)` for linear and embedding layers
        and `(batch, r, *spatial)` for convolutions."""
        handle = RemovableHandle(self._logits_hooks)
        self._logits_hooks[handle.id] = hook
        return handle

    def _run_logits_hooks(self, logits: torch.Tensor) -> None:
        for hook in self._logits_hooks.values():
            hook(self, logits)


def create_disel_gate(module, adapter_name: str, config) -> None:
    """Create the gate of `adapter_name` in the LoRA layer `module`, on `lora_A`'s device and dtype."""
    disel_config = config.disel_config or DiselConfig()
    if adapter_name in module.lora_A:
        layer = module.lora_A[adapter_name]
        weight = layer.weight
    else:
        layer = None
        weight = module.lora_embedding_A[adapter_name]
    # an embedding's gate input is one-hot: its logit is one table entry, which needs no 1/sqrt(d_in) normalization
    d_in = weight[0].numel()
    norm = 1.0 / math.sqrt(d_in) if disel_config.gate_normalize and layer is not None else 1.0
    gate = DiselGate(
        weight,
        r=module.r[adapter_name],
        bottleneck=disel_config.gate_bottleneck_dim,
        norm=norm,
        bias_init=disel_config.gate_bias_init,
        layer=layer,
        padding_idx=module.get_base_layer().padding_idx if layer is None else None,
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
    logits = gate(x)
    if gate._logits_hooks:
        gate._run_logits_hooks(logits)
    return lora_B(a * torch.sigmoid(logits))


def _disel_linear_delta_fused(module, adapter_name: str, x: torch.Tensor, lora_A, gate) -> torch.Tensor:
    """`A x` and the gate projection as one GEMM (or convolution) over `x` with the concatenated weights.

    The weights are concatenated on every call, a copy of `r x d_in` values next to a GEMM over all tokens; a cached
    copy would have to follow in-place optimizer updates.
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
        if gate._logits_hooks:
            gate._run_logits_hooks(h.narrow(dim, r, n_gate))
        # a * sigmoid(logits) in one kernel (and one in backward); it saves h, which autograd frees after backward
        out = F.glu(h, dim)
    else:
        a, v = h.split([r, n_gate], dim)
        logits = gate.finish(v)
        if gate._logits_hooks:
            gate._run_logits_hooks(logits)
        out = a * torch.sigmoid(logits)
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
    """`scaling * B(g(ids) * A[ids])` for an Embedding layer, including the layer's embedding scale if it has one.

    The gate reads the same token ids as `A` (after the adapter's `input_fn`, if any) with the layer's `padding_idx`, so
    the padding token's gate logits get no gradient, as its embedding row does not.
    """
    embedding_A = module.lora_embedding_A[adapter_name].T
    embedding_B = module.lora_embedding_B[adapter_name].T
    input_fn = module.input_fns.get(adapter_name, None)
    ids = input_fn((x,)) if input_fn is not None else x
    after_A = module._embed(ids, embedding_A, output_fn=module.output_fns.get(adapter_name, None))
    gate = module.lora_disel_gate[adapter_name]
    logits = gate(ids)
    if gate._logits_hooks:
        gate._run_logits_hooks(logits)
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


def check_disel_weighted_adapters(configs: dict, combination_type: str) -> None:
    """Refuse a weighted combination of DISeL adapters that is not exact: only `"cat"` of DISeL adapters with the same
    gate form is (the weighted sum of gated updates is itself a DISeL adapter with the ranks, gates and weights
    stacked)."""
    disel_configs = {name: config.disel_config for name, config in configs.items() if config.use_disel}
    if not disel_configs:
        return
    if combination_type != "cat":
        raise ValueError(
            f"add_weighted_adapter supports DISeL adapters only with `combination_type='cat'`, got "
            f"{combination_type!r}: the gated updates depend on the input, so only stacking their ranks is exact."
        )
    if len(disel_configs) != len(configs):
        plain = sorted(set(configs) - set(disel_configs))
        raise ValueError(
            f"Cannot combine DISeL adapters with plain LoRA adapters {plain}: their sum is no DISeL adapter."
        )
    forms = {(c.gate_normalize, c.gate_bottleneck_dim is None) for c in disel_configs.values()}
    if len(forms) > 1:
        raise ValueError(
            "Cannot combine DISeL adapters whose gates differ in `gate_normalize` or in having a bottleneck: "
            f"{disel_configs}."
        )


def weighted_disel_config(configs: list) -> DiselConfig:
    """The gate options of the `"cat"` combination of DISeL adapters: a bottleneck gate gets the sum of the bottlenecks
    (the up-projections are stacked block-diagonally)."""
    first = configs[0].disel_config
    if first.gate_bottleneck_dim is None:
        return first
    return DiselConfig(
        gate_bias_init=first.gate_bias_init,
        gate_weight_init=first.gate_weight_init,
        gate_normalize=first.gate_normalize,
        gate_bottleneck_dim=sum(c.disel_config.gate_bottleneck_dim for c in configs),
    )


@torch.no_grad()
def combine_disel_gates(module, adapters: list[str], adapter_name: str) -> None:
    """Stack the gates of `adapters` into the gate of `adapter_name`, rank by rank in the order in which
    `add_weighted_adapter(combination_type="cat")` stacks their `A` rows; unused ranks get zero."""
    gates = [module.lora_disel_gate[name] for name in adapters if name in module.lora_disel_gate]
    new = module.lora_disel_gate[adapter_name]
    values = {"bias": torch.cat([gate.bias for gate in gates]), "weight": torch.cat([gate.weight for gate in gates])}
    if new.weight_up is not None:
        values["weight_up"] = torch.block_diag(*[gate.weight_up for gate in gates])
    for name, value in values.items():
        param = getattr(new, name)
        param.zero_()
        param[tuple(slice(0, n) for n in value.shape)] = value
