"""The YAML options of the DISeL plugin, merged by Axolotl into its config schema."""

from typing import Any

from pydantic import BaseModel, Field


class DiselArgs(BaseModel):
    """`disel` and `disel_gate_lr_ratio` in an Axolotl YAML (the checks that need the whole config run in
    `DiselPlugin.register`)."""

    disel: bool | dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={
            "description": "Train the LoRA adapter as DISeL (`LoraConfig(use_disel=...)`): true for the defaults, or "
            "a mapping of DiselConfig options (gate_bias_init, gate_bottleneck_dim, gate_normalize, ...)."
        },
    )
    disel_gate_lr_ratio: float | None = Field(
        default=None,
        json_schema_extra={
            "description": "Learning rate of the DISeL gates relative to `learning_rate` (default 5, the paper's); "
            "the gates never get weight decay."
        },
    )
