"""The DISeL options of an adapter, read from its `adapter_config.json` (no vLLM import here)."""

import math
from dataclasses import dataclass
from typing import Optional


# the options of PEFT's DiselConfig (`gate_weight_init`: saved by releases disel.1 and disel.2); `gate_bias_init` and
# `gate_weight_init` only matter for training
KNOWN_OPTIONS = ("gate_bias_init", "gate_weight_init", "gate_normalize", "gate_bottleneck_dim")


@dataclass(frozen=True)
class DiselSpec:
    """What serving needs to know of a DISeL adapter's gates.

    Args:
        gate_normalize: the gate logits are `W_g x / sqrt(d_in) + b_g` (else `W_g x + b_g`).
        gate_bottleneck_dim: the rank `k` of a low-rank gate `W_g = U V`, or `None` for a full gate.
    """

    gate_normalize: bool = False
    gate_bottleneck_dim: Optional[int] = None

    def gate_norm(self, d_in: int) -> float:
        """The factor on `W_g x` for a layer with `d_in` inputs."""
        return 1.0 / math.sqrt(d_in) if self.gate_normalize else 1.0


def parse_disel(config: dict) -> Optional[DiselSpec]:
    """The DISeL options of an adapter config dict, or `None` for an adapter that is not DISeL.

    Accepts the three forms PEFT writes or reads: `"use_disel": true` with the defaults, `"use_disel": true` with the
    options in `"disel_config": {...}`, and `"use_disel": {...}` with the options inline. Raises `ValueError` (or
    `TypeError` for a value of the wrong type) for anything else, including options this plugin does not know (so
    that no option is silently dropped).

    Args:
        config: the parsed `adapter_config.json`.
    """
    use_disel = config.get("use_disel", False)
    disel_config = config.get("disel_config")
    if use_disel is False or use_disel is None:
        if disel_config:
            raise ValueError(
                f"adapter_config.json has `disel_config` {disel_config!r} but `use_disel` is {use_disel!r}: a DISeL "
                "adapter needs `use_disel: true`; fix the config (or save the adapter again with PEFT)."
            )
        return None
    if use_disel is True:
        options = disel_config or {}
    elif isinstance(use_disel, dict):
        if disel_config:
            raise ValueError(
                "adapter_config.json gives the DISeL options twice (`use_disel` as a dict and `disel_config`); keep "
                "one of them."
            )
        options = use_disel
    else:
        raise ValueError(
            f"`use_disel` in adapter_config.json must be true, false or a dict of DISeL options, got {use_disel!r}."
        )
    if not isinstance(options, dict):
        raise TypeError(f"The DISeL options in adapter_config.json must be a dict, got {options!r}.")
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise ValueError(
            f"Unknown DISeL option(s) {unknown} in adapter_config.json: this version of vllm_disel knows "
            f"{list(KNOWN_OPTIONS)}. Serving the adapter without them could change its outputs; update vllm_disel."
        )
    normalize = options.get("gate_normalize", False)
    if not isinstance(normalize, bool):
        raise TypeError(f"DISeL option `gate_normalize` must be a bool, got {normalize!r}.")
    bottleneck = options.get("gate_bottleneck_dim")
    if bottleneck is not None and (isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck <= 0):
        raise ValueError(f"DISeL option `gate_bottleneck_dim` must be a positive integer or null, got {bottleneck!r}.")
    return DiselSpec(gate_normalize=normalize, gate_bottleneck_dim=bottleneck)
