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

    delta(x) = scaling * B(g(x) * A(dropout(x))), g(x) = sigmoid(W_g x + b_g)

One independent gate per rank reads the layer input `x`. This module holds the gate and the math; the options are
`DiselConfig` in `config.py`, and `DiselLinearVariant` in `variants.py` plugs the math into the LoRA layers.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class DiselGate(nn.Module):
    """The gate of one DISeL adapter in one layer: `logits(x) = norm * W_g x + bias`, one logit per LoRA rank.

    The parameters are direct leaves of the module, as PEFT's checkpoint format expects of an adapter entry: `weight`
    reads the layer input as `lora_A` does, `(r, d_in)`; a low-rank gate `W_g = U V` has `weight` `V`
    `(gate_bottleneck_dim, d_in)` and `weight_up` `U` `(r, gate_bottleneck_dim)`; `bias` is `(r,)`.
    """

    def __init__(
        self,
        in_features: int,
        r: int,
        bottleneck: Optional[int],
        norm: float,
        bias_init: float,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(bottleneck or r, in_features, **kw))
        self.weight_up = nn.Parameter(torch.empty(r, bottleneck, **kw)) if bottleneck else None
        self.bias = nn.Parameter(torch.full((r,), float(bias_init), **kw))
        self.norm = norm
        if self.weight.device.type != "meta":  # here, so that DeepSpeed's zero.Init partitions initialized values
            self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # norm * W_g x + bias as one addmm: the norm scales the small weight, not the activations
        if self.weight_up is None:
            return F.linear(x, self._scaled(self.weight), self.bias)
        return F.linear(F.linear(x, self.weight), self._scaled(self.weight_up), self.bias)

    def _scaled(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.norm if self.norm != 1.0 else weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init of the weights: random, so that the gates can tell inputs apart from the start."""
        for weight in (self.weight, self.weight_up):
            if weight is not None:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def create_disel_gate(module, adapter_name: str, config) -> None:
    """Create the gate of `adapter_name` in the LoRA layer `module`, on `lora_A`'s device and dtype."""
    options, lora_A = config.use_disel, module.lora_A[adapter_name]
    d_in = lora_A.in_features  # not the weight's shape: a weight that DeepSpeed ZeRO-3 partitions is empty
    gate = DiselGate(
        d_in,
        module.r[adapter_name],
        bottleneck=options.gate_bottleneck_dim,
        norm=1.0 / math.sqrt(d_in) if options.gate_normalize else 1.0,
        bias_init=options.gate_bias_init,
        device=lora_A.weight.device,
        dtype=lora_A.weight.dtype,
    )
    if not hasattr(module, "lora_disel_gate"):
        # the first DISeL adapter of this layer: register the container so that the gates are trained, saved and moved
        module.lora_disel_gate = nn.ModuleDict({})
        module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_disel_gate",)
    module.lora_disel_gate[adapter_name] = gate


def disel_linear_delta(module, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
    """`scaling * B(g(x) * A(dropout(x)))` for a Linear (or transformers Conv1D) layer. The gate reads `x` itself."""
    a = module.lora_A[adapter_name](module.lora_dropout[adapter_name](x)) * module.scaling[adapter_name]
    return module.lora_B[adapter_name](a * torch.sigmoid(module.lora_disel_gate[adapter_name](x)))


MERGE_ERROR = (
    "Cannot merge the DISeL adapter '{adapter}': its update depends on the input through the gate "
    "sigmoid(W_g x + b_g), so there is no fixed weight delta to fold into the base weight. Nothing was merged. Keep "
    "the adapter unmerged for inference, or use `unload()` to remove it."
)
