"""DISeL in vLLM's linear LoRA layers.

For each token t with adapter slot i(t), a DISeL layer adds

    delta_t = B_i ( sigmoid(W_i x_t + b_i) * A_i x_t )        (the scaling is folded into B_i, as vLLM does)

with vLLM's punica ops, which take each token's slot index:

1. one shrink of rank 2R over `[A_i ; W_i]` (R = max_lora_rank) gives `[A_i x | W_i x]` per token and slice;
2. the bias of each token's slot is gathered and added, and `a * sigmoid(logits)` is formed;
3. one expand with `B_i` adds the result to the base layer's output.

A slot holding a plain LoRA adapter has gate rows of zero and a bias of +inf, so its gate is exactly 1 and its rows get
`B_i A_i x`. Tokens without an adapter (index -1) read an extra bias row of -inf, so their gate is exactly 0 whatever
the punica ops do with index -1. A batch in which no token uses a slot holding a DISeL gate of the layer runs vLLM's own
LoRA path unchanged (plain LoRA adapters and rows without one, even while DISeL adapters hold other slots).

The path is chosen in Python at each forward, from the slots of the batch: that needs eager execution (no torch.compile,
no CUDA graphs, which would freeze the choice); the plugin refuses DISeL adapters otherwise (`hooks.py`).
"""

import torch
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearVariableSliceWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.model_executor.layers.linear import RowParallelLinear
from vllm.platforms import current_platform

from .gates import GateWeights


# bias of a slot without a DISeL gate (plain LoRA: sigmoid = 1) and of tokens without an adapter (sigmoid = 0)
OPEN = float("inf")
CLOSED = float("-inf")


class DiselLinearMixin:
    """Adds DISeL gates to one of vLLM's (non fully sharded) linear LoRA layer classes.

    Per slice `s` of the layer (q/k/v of a QKV projection, gate/up of a merged MLP projection, or the one slice):

    - `disel_ag_stacked[s]`: `(max_loras, 1, 2R, d_in)`, `[A ; W]` of each slot (`A` copied from `lora_a_stacked`);
    - `disel_bias[s]`: `(max_loras + 1, R)` float32, each slot's gate bias, +inf for plain LoRA slots, and -inf in the
      last row, which tokens without an adapter (index -1) read.
    """

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        super().create_lora_weights(max_loras, lora_config, model_config)
        a0 = self.lora_a_stacked[0]
        self.disel_rank = a0.shape[2]
        self.disel_max_loras = max_loras
        self.disel_ag_stacked = tuple(
            torch.zeros(max_loras, 1, 2 * self.disel_rank, a.shape[3], dtype=a.dtype, device=a.device)
            for a in self.lora_a_stacked
        )
        self.disel_bias = torch.full(
            (self.n_slices, max_loras + 1, self.disel_rank), OPEN, dtype=torch.float32, device=a0.device
        )
        self.disel_bias[:, max_loras] = CLOSED
        self.disel_slots = [False] * max_loras
        self.disel_active = False

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        for ag in self.disel_ag_stacked:
            ag[index] = 0
        self.disel_bias[:, index] = OPEN
        self._mark_disel(index, False)

    def set_lora(self, index, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)
        # the A half of [A ; W] for every slot, so that plain LoRA slots run in the gated path too
        for s, ag in enumerate(self.disel_ag_stacked):
            ag[index, :, : self.disel_rank].copy_(self.lora_a_stacked[s][index])

    def set_disel_gate(self, index: int, gates) -> None:
        """Install the DISeL gate(s) of the adapter in slot `index` (after `set_lora`); `None` keeps a plain slot.

        Args:
            index: the slot.
            gates: a `GateWeights`, or for a packed layer a list with one `GateWeights` (or `None`) per packed module.
        """
        if gates is None:
            return
        if isinstance(gates, GateWeights):
            gates = [gates] * self.n_slices  # one module's gate for all slices (a layer packed in the checkpoint)
        gates = list(gates)
        if len(gates) != self.n_slices:
            raise ValueError(
                f"vllm_disel: {len(gates)} DISeL gates for a layer of {self.n_slices} slices ({type(self).__name__})."
            )
        weights = [None if g is None else g.weight for g in gates]
        if self.tp_size > 1:
            # a gate reads the layer input as A does: slice it the way vLLM slices A for this layer
            weights = self.slice_lora_a(weights if self.n_slices > 1 else weights[0])
            weights = weights if self.n_slices > 1 else [weights]
        for s, (gate, weight) in enumerate(zip(gates, weights)):
            if gate is None:
                continue
            r = gate.bias.shape[0]
            self.disel_ag_stacked[s][index, 0, self.disel_rank : self.disel_rank + r, : weight.shape[1]].copy_(weight)
            self.disel_bias[s, index, :] = 0.0  # ranks above r have A = 0: their gates multiply zeros
            self.disel_bias[s, index, :r].copy_(gate.bias)
        self._mark_disel(index, any(g is not None for g in gates))

    def _mark_disel(self, index: int, value: bool) -> None:
        self.disel_slots[index] = value
        self.disel_active = any(self.disel_slots)

    def _uses_gates(self) -> bool:
        """Whether a token of the current batch uses a slot that holds a DISeL gate of this layer."""
        if not self.disel_active:
            return False
        # the slots of the batch's adapters, recorded with the batch's mapping (hooks.py); all slots if unknown
        batch_slots = getattr(self.punica_wrapper, "disel_batch_slots", None)
        return batch_slots is None or any(self.disel_slots[s] for s in batch_slots)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not self._uses_gates():
            return super()._apply_lora_to_output(x, output)
        original_shape = output.shape if output.ndim == 3 else None
        if x.ndim == 3 and output.ndim == 3:
            output = output.flatten(0, 1)
            x = x.flatten(0, 1)
        result = self._disel_delta(x, output)
        if original_shape is not None:
            result = result.reshape(original_shape)
        return result

    def _apply_async_impl(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        # the dual-stream path (CUDA) runs vLLM's plain LoRA ops; DISeL slots take the gated path on the main stream
        if not self._uses_gates():
            return super()._apply_async_impl(x, bias)
        return self._apply_sync(x, bias)

    def _disel_delta(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output + delta` for a 2D `x` of T tokens (in place where the platform allows it)."""
        punica = self.punica_wrapper
        rank = self.disel_rank
        num_tokens = x.shape[0]
        buffer = torch.zeros((self.n_slices, num_tokens, 2 * rank), dtype=torch.float32, device=x.device)
        shrunk = punica.add_shrink(buffer, x, self.disel_ag_stacked, 1.0)
        if not current_platform.can_update_inplace():
            buffer = shrunk
        row_parallel = isinstance(self.base_layer, RowParallelLinear) and self.tp_size > 1
        if row_parallel:
            # A and W read this rank's slice of the input: sum the partial projections before the gate
            buffer = tensor_model_parallel_all_reduce(buffer)
        # each token's bias row: its slot, or the last (closed) row for index -1 and for padding tokens
        slots = punica.token_lora_indices[:num_tokens]
        rows = torch.full((num_tokens,), self.disel_max_loras, dtype=torch.long, device=x.device)
        rows[: slots.shape[0]] = slots.remainder(self.disel_max_loras + 1)
        logits = buffer[..., rank:] + self.disel_bias[:, rows]
        gated = buffer[..., :rank] * torch.sigmoid(logits)
        if row_parallel and self.tp_rank != 0:
            # every rank now holds the whole gated product: one rank adds B's output to the partial sums
            return output
        expanded = punica.add_expand(output, gated, self.lora_b_stacked, self.output_slices, add_inputs=True)
        if not current_platform.can_update_inplace():
            output = expanded
        return output


class DiselColumnParallelLinearWithLoRA(DiselLinearMixin, ColumnParallelLinearWithLoRA):
    pass


class DiselMergedColumnParallelLinearWithLoRA(DiselLinearMixin, MergedColumnParallelLinearWithLoRA):
    pass


class DiselQKVParallelLinearWithLoRA(DiselLinearMixin, QKVParallelLinearWithLoRA):
    pass


class DiselMergedQKVParallelLinearWithLoRA(DiselLinearMixin, MergedQKVParallelLinearWithLoRA):
    pass


class DiselRowParallelLinearWithLoRA(DiselLinearMixin, RowParallelLinearWithLoRA):
    pass


class DiselReplicatedLinearWithLoRA(DiselLinearMixin, ReplicatedLinearWithLoRA):
    pass


class DiselMergedColumnParallelLinearVariableSliceWithLoRA(
    DiselLinearMixin, MergedColumnParallelLinearVariableSliceWithLoRA
):
    pass


# vLLM's linear LoRA layer class -> its DISeL subclass; the fully sharded (S-LoRA) variants and MoE layers have none
DISEL_CLASSES = {
    ColumnParallelLinearWithLoRA: DiselColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA: DiselMergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA: DiselQKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA: DiselMergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA: DiselRowParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA: DiselReplicatedLinearWithLoRA,
    MergedColumnParallelLinearVariableSliceWithLoRA: DiselMergedColumnParallelLinearVariableSliceWithLoRA,
}
