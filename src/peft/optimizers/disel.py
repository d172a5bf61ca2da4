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

"""
This module contains the optimizer helper of DISeL, which trains the gates with their own learning rate.
"""

import warnings

import torch
from torch import nn
from torch.optim import Optimizer
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names


_GATE_CONTAINER = "lora_disel_gate"


def _is_gate_parameter(param_name: str) -> bool:
    """Whether `param_name` is a DISeL gate parameter (`...lora_disel_gate.<adapter>.<name>`)."""
    return _GATE_CONTAINER in param_name.split(".")[:-2]


def create_disel_optimizer(
    model: nn.Module,
    optimizer_cls: type[Optimizer],
    *,
    lr: float,
    gate_lr_ratio: float = 5.0,
    weight_decay: float = 0.0,
    **kwargs,
) -> Optimizer:
    """
    Creates an optimizer for a model with DISeL adapters (`LoraConfig(use_disel=True)`), with the gates in their own
    parameter group.

    DISeL: Dynamic Input-Sensitive LoRA, https://huggingface.co/papers/2605.19028

    The gate parameters (those of the `lora_disel_gate` modules) are trained at `lr * gate_lr_ratio` without weight
    decay; the paper trains them at 5x the LoRA learning rate (e.g. 1e-3 vs 2e-4). The gate learning rate is the main
    knob of the adaptation-versus-retention trade-off: a higher ratio lets the gates open faster (more adaptation), a
    lower one keeps them closed longer (more retention of the pre-trained behaviour). All other trainable parameters
    (`lora_A`, `lora_B`, `modules_to_save`, ...) are trained at `lr`, with `weight_decay` except for biases and layer
    norm weights, as in `create_loraplus_optimizer`. Frozen parameters are left out.

    Pass the result to a transformers `Trainer` as `Trainer(..., optimizers=(optimizer, None))`. With DeepSpeed, the
    `Trainer` ignores `optimizers` and builds its own optimizer, which would train the gates at `lr`: create this one
    in an override of `Trainer.create_optimizer` instead.

    Example:

    ```py
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from peft.optimizers import create_disel_optimizer

    >>> model = get_peft_model(base_model, LoraConfig(use_disel=True, target_modules="all-linear"))
    >>> optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=2e-4, weight_decay=0.01)
    ```

    Args:
        model (`torch.nn.Module`):
            The model to be optimized: a `PeftModel`, its `base_model`, or the model it injected the adapters into. It
            must have at least one trainable DISeL gate.
        optimizer_cls (`type[torch.optim.Optimizer]`):
            The optimizer class to be used, e.g. `torch.optim.AdamW`.
        lr (`float`):
            The learning rate of the non-gate parameters.
        gate_lr_ratio (`float`, *optional*, defaults to `5.0`):
            The learning rate of the gates relative to `lr`, for the gates of all DISeL adapters. The paper's default
            is 5; lower values keep the gates closed longer (more retention), higher ones let them open faster (more
            adaptation).
        weight_decay (`float`, *optional*, defaults to `0.0`):
            The weight decay of the non-gate parameters other than biases and norm weights. The gates never get weight
            decay.
        kwargs (`dict`):
            Additional keyword arguments to be passed to the optimizer, e.g. `betas` or `eps`.

    Returns:
        `torch.optim.Optimizer`: An instance of `optimizer_cls` with the parameters grouped as described above (empty
        groups are left out).
    """
    if isinstance(gate_lr_ratio, bool) or not isinstance(gate_lr_ratio, (int, float)) or not gate_lr_ratio > 0:
        raise ValueError(f"`gate_lr_ratio` must be a positive number, got {gate_lr_ratio!r}.")

    # the weight decay grouping of `create_loraplus_optimizer`: no decay for biases and layer norm weights
    decay_names = get_parameter_names(model, ALL_LAYERNORM_LAYERS)
    decay_names = {name for name in decay_names if "bias" not in name}

    decay, no_decay, gates = [], [], []
    has_frozen_gates = False
    for name, param in model.named_parameters():
        is_gate = _is_gate_parameter(name)
        if not param.requires_grad:
            has_frozen_gates = has_frozen_gates or is_gate
            continue
        if is_gate:
            gates.append(param)
        elif name in decay_names:
            decay.append(param)
        else:
            no_decay.append(param)

    if not gates:
        if has_frozen_gates:
            raise ValueError(
                "`create_disel_optimizer` found DISeL gates, but none of them is trainable: set `requires_grad=True` "
                "on the gates of the adapter to train (e.g. with `model.set_adapter(...)`), or use a regular optimizer."
            )
        raise ValueError(
            "`create_disel_optimizer` found no DISeL gate in the model: it is meant for adapters created with "
            "`LoraConfig(use_disel=True)`. For other LoRA adapters, use a regular optimizer (or "
            "`peft.optimizers.create_loraplus_optimizer`)."
        )
    half = sorted({str(p.dtype) for p in gates if p.dtype in (torch.float16, torch.bfloat16)})
    if half:
        warnings.warn(
            f"DISeL gates are trained in {', '.join(half)}. Half precision is coarse near the initial gate bias (bfloat16 "
            "values near -3 are 0.0156 apart), so small updates round away and the gates barely train. Keep the adapter "
            "weights in float32 (`autocast_adapter_dtype=True`, the default of `get_peft_model`)."
        )

    param_groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        {"params": gates, "weight_decay": 0.0, "lr": lr * gate_lr_ratio},
    ]
    param_groups = [group for group in param_groups if group["params"]]

    kwargs["lr"] = lr
    optimizer = optimizer_cls(param_groups, **kwargs)
    eight_bit_names = ["Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"]
    if optimizer_cls.__name__ in eight_bit_names:
        # as transformers' Trainer and `create_loraplus_optimizer` do: keep embedding weights in 32-bit optimizer states
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
