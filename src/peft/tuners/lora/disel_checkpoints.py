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
"""DISeL checkpoints in other formats: the paper's standalone `disel` package (github.com/alizindari/DISeL), and the first
release of this build (disel.1).

A checkpoint of the reference package is converted once, explicitly, into a normal DISeL adapter folder:

    python -m peft.tuners.lora.disel_checkpoints REFERENCE_CHECKPOINT NEW_FOLDER

`PeftModel.from_pretrained` on an unconverted one raises an error that prints this command. The adapters of this
build's first release, whose config has `use_disel: true` plus a `disel_config` dict, load as they are. Both are
recognised by `PeftConfig.from_peft_type` only when a config has keys its class does not know (`disel_gate_*`,
`disel_config`), so no code of this module runs for any other adapter.

That package trains DISeL on top of an unmodified PEFT: its config is a `LoraConfig` subclass whose
`adapter_config.json` has `peft_type: "LORA"`, no `use_disel` and five extra top-level keys:

    disel_gate_bias_init, disel_gate_normalize, disel_gate_weight_init, disel_gate_bottleneck_dim,
    disel_gate_lr_multiplier

and each gated LoRA layer holds a `lora_disel_gate` `ModuleDict` (named `disel_gate` in its earliest version) with, per
adapter, either a full gate or a bottleneck gate:

    full: linear.weight (r, d_in), linear.bias (r,)
                logits = s * (linear.weight @ x + linear.bias)
    bottleneck: proj_down.weight (k, d_in), proj_up.weight (r, k), proj_up.bias (r,)
                logits = s * (proj_up.weight @ proj_down.weight @ x + proj_up.bias)

with `s = 1/sqrt(d_in)` if `disel_gate_normalize` else `1`: the normalization scales the bias too (and is a
non-persistent buffer, never saved). Only layers with a `lora_A` (linear layers) get a gate; its LoRA embedding layers
stay plain, ungated LoRA. The gates are saved by `save_pretrained` in `adapter_model.safetensors` (keys without the
adapter name, e.g. `base_model.model.<module>.lora_disel_gate.linear.weight`), or in a separate
`gate_weights.safetensors` or legacy `gate_weights.pt` next to it, whose keys are the model's parameter names, with the
adapter name (e.g. `base_model.model.<module>.lora_disel_gate.default.linear.weight`).

In this implementation `logits = norm * W x + b` (`norm * U (V x) + b` for a bottleneck gate), with the same `norm`, so
the weights map as they are and the bias is multiplied by `s`.
"""

import argparse
import json
import math
import os
import shutil
import sys
import warnings
from typing import Optional, Union

import torch
from safetensors.torch import load_file as safe_load_file
from safetensors.torch import save_file as safe_save_file


REFERENCE_CONFIG_KEYS = (
    "disel_gate_bias_init",
    "disel_gate_normalize",
    "disel_gate_weight_init",
    "disel_gate_bottleneck_dim",
    "disel_gate_lr_multiplier",
)
# the reference's defaults, used for a key its config file lacks
REFERENCE_CONFIG_DEFAULTS = {
    "disel_gate_bias_init": -3.0,
    "disel_gate_normalize": False,
    "disel_gate_weight_init": "random",
    "disel_gate_bottleneck_dim": None,
    "disel_gate_lr_multiplier": 5.0,
}
# the separate gate files, in the order in which the reference looks for them
REFERENCE_GATE_FILE_NAMES = ("gate_weights.safetensors", "gate_weights.pt")
# the name of the gate container on a LoRA layer: ours and the reference's, and the reference's earliest one
GATE_CONTAINER = "lora_disel_gate"
REFERENCE_GATE_CONTAINERS = (GATE_CONTAINER, "disel_gate")
# (submodule, parameter) of the reference gates -> our parameter
_FULL_GATE_PARAMS = {("linear", "weight"): "weight", ("linear", "bias"): "bias"}
_BOTTLENECK_GATE_PARAMS = {
    ("proj_down", "weight"): "weight",
    ("proj_up", "weight"): "weight_up",
    ("proj_up", "bias"): "bias",
}
_REFERENCE_GATE_PARAMS = {**_FULL_GATE_PARAMS, **_BOTTLENECK_GATE_PARAMS}
_OUR_GATE_PARAMS = ("weight", "weight_up", "bias")
# the gate logit of an always-open gate: sigmoid(100) is exactly 1 in float16, bfloat16, float32 and float64
OPEN_GATE_LOGIT = 100.0


def is_reference_disel_config(config_dict: dict) -> bool:
    """
    Whether `config_dict` (the content of an `adapter_config.json`) was written by the reference `disel` package: a
    LoRA config with at least one of its `disel_gate_*` keys.

    Args:
        config_dict (`dict`):
            The loaded `adapter_config.json`.

    Returns:
        `bool`: `True` for a reference DISeL config, `False` otherwise (including a config of this implementation,
        which uses `use_disel`).
    """
    if not isinstance(config_dict, dict) or config_dict.get("peft_type") != "LORA":
        return False
    return any(key in config_dict for key in REFERENCE_CONFIG_KEYS)


def get_reference_gate_lr_ratio(config_dict: dict) -> float:
    """
    The gate learning-rate ratio of a reference DISeL config (`disel_gate_lr_multiplier`, 5.0 when absent).

    The reference stores it in its config for its optimizer factory. Here it is no config option but the
    `gate_lr_ratio` argument of [`~peft.optimizers.create_disel_optimizer`], so [`convert_reference_disel_config`]
    drops it; pass this value there to continue training with the reference's setting.

    Args:
        config_dict (`dict`):
            The loaded reference `adapter_config.json`.

    Returns:
        `float`: The ratio of the gate learning rate to the learning rate of the LoRA weights.
    """
    value = config_dict.get("disel_gate_lr_multiplier")
    return float(REFERENCE_CONFIG_DEFAULTS["disel_gate_lr_multiplier"] if value is None else value)


def convert_reference_disel_config(config_dict: dict) -> dict:
    """
    Convert a reference DISeL config dict into keyword arguments of this implementation's `LoraConfig`.

    The `disel_gate_*` keys are removed and replaced by `use_disel`, with the gate options of [`DiselConfig`]:
    `gate_bias_init`, `gate_normalize` and `gate_bottleneck_dim` (the reference's defaults fill missing keys). All
    other keys are kept. `disel_gate_lr_multiplier` has no counterpart in the config (see
    [`get_reference_gate_lr_ratio`]), and `disel_gate_weight_init` is dropped: it only initialized the gates, whose
    trained weights the checkpoint holds.

    Two differences are translated rather than copied:

    - The reference allows a bottleneck that is not smaller than the rank, which this implementation refuses (such a
      gate is no cheaper than the full one and expresses nothing more). Then `gate_bottleneck_dim` becomes `None` and
      the bottleneck gates are loaded as full gates `W = U V`, exactly: pass the converted `gate_bottleneck_dim` to
      [`convert_reference_disel_state_dict`], which then folds them. A warning says so.
    - With `disel_gate_normalize`, the reference scales the bias by `1/sqrt(d_in)` as well, so its initial gate logit
      is `disel_gate_bias_init / sqrt(d_in)`, which depends on the layer. `gate_bias_init` is copied as it is: it only
      affects newly created gates, and the converted state dict carries the trained biases in this implementation's
      parametrization.

    Args:
        config_dict (`dict`):
            The loaded reference `adapter_config.json`; it is not modified.

    Returns:
        `dict`: A new dict for `LoraConfig(**converted)`.

    Raises:
        ValueError: If `config_dict` is no reference DISeL config, or also sets this implementation's `use_disel`.
    """
    if not is_reference_disel_config(config_dict):
        raise ValueError(
            "Not a DISeL config of the reference `disel` package: expected `peft_type` 'LORA' and at least one of the "
            f"keys {list(REFERENCE_CONFIG_KEYS)}."
        )
    if config_dict.get("use_disel") or config_dict.get("disel_config") is not None:
        raise ValueError(
            "The config has both the reference package's `disel_gate_*` keys and this implementation's `use_disel`; "
            "it is unclear which gate options apply."
        )
    values = {key: config_dict.get(key, default) for key, default in REFERENCE_CONFIG_DEFAULTS.items()}
    bottleneck = values["disel_gate_bottleneck_dim"]
    if bottleneck is not None:
        ranks = [config_dict.get("r", 8), *(config_dict.get("rank_pattern") or {}).values()]
        if bottleneck >= min(ranks):
            warnings.warn(
                f"The reference DISeL config has `disel_gate_bottleneck_dim={bottleneck}`, not smaller than the rank "
                f"(r={min(ranks)}): the bottleneck gates are converted to full gates `W = U V`, which compute the "
                "same gate values."
            )
            bottleneck = None

    converted = {key: value for key, value in config_dict.items() if key not in REFERENCE_CONFIG_KEYS}
    # `disel_gate_weight_init` only initialized the gates, whose trained weights the checkpoint holds
    converted["use_disel"] = {
        "gate_bias_init": values["disel_gate_bias_init"],
        "gate_normalize": values["disel_gate_normalize"],
        "gate_bottleneck_dim": bottleneck,
    }
    return converted


def find_reference_gate_files(model_dir: Union[str, os.PathLike]) -> list[str]:
    """
    The separate gate files of a reference DISeL checkpoint directory: `gate_weights.safetensors` and the legacy
    `gate_weights.pt`, those that exist, in the reference's order of preference.

    The reference reads the gates from `adapter_model.safetensors` when that file has any, and otherwise from the first
    of these files only.

    Args:
        model_dir (`str` or `os.PathLike`):
            The local checkpoint directory.

    Returns:
        `list[str]`: The paths of the gate files found (empty if none).
    """
    paths = [os.path.join(os.fspath(model_dir), name) for name in REFERENCE_GATE_FILE_NAMES]
    return [path for path in paths if os.path.isfile(path)]


def load_reference_gate_file(path: Union[str, os.PathLike], device: str = "cpu") -> dict[str, torch.Tensor]:
    """
    Load a separate reference gate file: `*.safetensors` with safetensors, any other file (the legacy `*.pt`) with
    `torch.load(..., weights_only=True)`, which refuses to unpickle anything but tensors and plain containers.

    Args:
        path (`str` or `os.PathLike`):
            The gate file.
        device (`str`, *optional*, defaults to `"cpu"`):
            The device to load the tensors onto.

    Returns:
        `dict[str, torch.Tensor]`: The tensors by key, with the reference's key names (see
        [`convert_reference_disel_state_dict`]).

    Raises:
        ValueError: If the file does not hold a flat mapping of names to tensors.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        state_dict = safe_load_file(path, device=device)
    else:
        state_dict = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise ValueError(f"The DISeL gate file {path} does not hold a flat mapping of parameter names to tensors.")
    return dict(state_dict)


def merge_reference_gate_files(state_dict: dict, model_dir: Union[str, os.PathLike], device: str = "cpu") -> dict:
    """
    Add the gates of a separate reference gate file to an adapter state dict, as the reference's loader does: only if
    the adapter state dict has no gate parameter, from the first file of [`find_reference_gate_files`].

    The gate-file keys keep the reference's names (with the adapter name); convert the result with
    [`convert_reference_disel_state_dict`].

    Args:
        state_dict (`dict`):
            The state dict loaded from `adapter_model.safetensors` (or `.bin`); it is not modified.
        model_dir (`str` or `os.PathLike`):
            The local checkpoint directory.
        device (`str`, *optional*, defaults to `"cpu"`):
            The device to load the gate tensors onto.

    Returns:
        `dict`: A new state dict, with the gate file's tensors if one was used.

    Raises:
        ValueError: If a key of the gate file is also a key of `state_dict`.
    """
    merged = dict(state_dict)
    paths = find_reference_gate_files(model_dir)
    if not paths or any(_parse_gate_key(key) is not None for key in state_dict):
        return merged
    for path in paths[:1]:
        gates = load_reference_gate_file(path, device=device)
        clashes = sorted(set(gates) & set(merged))
        if clashes:
            raise ValueError(
                f"The DISeL gate file {path} has keys that the adapter state dict has too: {clashes[:3]}."
            )
        merged.update(gates)
    return merged


def _parse_gate_key(key: str) -> Optional[tuple[str, str, list[str], list[str]]]:
    """`(prefix, container, middle, tail)` if a segment of `key` names a gate container, else `None`."""
    segments = key.split(".")
    for index in range(len(segments) - 1, -1, -1):
        if segments[index] in REFERENCE_GATE_CONTAINERS:
            rest = segments[index + 1 :]
            return ".".join(segments[:index]), segments[index], rest[:-2], rest[-2:]
    return None


def _reference_gate_entry(key: str) -> Optional[tuple[str, str, tuple[str, str]]]:
    """`(layer prefix, adapter name or "", (submodule, parameter))` for a reference gate key, else `None`."""
    parsed = _parse_gate_key(key)
    if parsed is None:
        return None
    prefix, _, middle, tail = parsed
    if tuple(tail) not in _REFERENCE_GATE_PARAMS:
        return None
    return prefix, ".".join(middle), tuple(tail)


def _is_our_gate_key(key: str) -> bool:
    parsed = _parse_gate_key(key)
    if parsed is None:
        return False
    _, container, middle, tail = parsed
    # `<prefix>.lora_disel_gate.<param>`: `middle` and `tail` split the single segment after the container
    return container == GATE_CONTAINER and not middle and len(tail) == 1 and tail[0] in _OUR_GATE_PARAMS


def is_reference_disel_state_dict(state_dict: dict) -> bool:
    """
    Whether `state_dict` holds any gate parameter in the reference package's format (see
    [`convert_reference_disel_state_dict`]); a state dict of this implementation holds none.

    Args:
        state_dict (`dict`):
            An adapter state dict, possibly merged with a separate gate file.

    Returns:
        `bool`: `True` if at least one key is a reference gate key.
    """
    return any(_reference_gate_entry(key) is not None for key in state_dict)


def convert_reference_disel_state_dict(
    state_dict: dict, gate_normalize: bool = False, gate_bottleneck_dim: Optional[int] = None
) -> dict:
    """
    Convert the gate parameters of a reference DISeL state dict to this implementation's keys and parametrization.

    Reference gate keys, from `adapter_model.safetensors` or merged in from a separate gate file (with or without the
    adapter name after the container, which may also be the earliest name `disel_gate`), are mapped per layer to
    `<layer>.lora_disel_gate.{weight, weight_up, bias}`, without the adapter name, as `set_peft_model_state_dict`
    expects:

    - full gate: `linear.weight` -> `weight`, `linear.bias` -> `bias`;
    - bottleneck gate: `proj_down.weight` -> `weight` (V), `proj_up.weight` -> `weight_up` (U), `proj_up.bias` ->
      `bias`; or, with `gate_bottleneck_dim=None`, the full gate `weight = U @ V` (computed in float32) and `bias`;
    - with `gate_normalize`, the bias is multiplied by `1/sqrt(d_in)` (`d_in` from the layer's gate weight), since the
      reference scales the whole logit `(W x + b) / sqrt(d_in)` and this implementation only the input term.

    A LoRA embedding layer (`lora_embedding_A`) without a gate, which the reference leaves ungated, gets an always-open
    gate (zero weights, bias `OPEN_GATE_LOGIT`, so `sigmoid` is exactly 1): it computes the same plain LoRA update. All
    other keys are returned unchanged, keys already in this implementation's format included.

    Args:
        state_dict (`dict`):
            The state dict to convert; it is not modified.
        gate_normalize (`bool`, *optional*, defaults to `False`):
            The converted `gate_normalize` (the reference's `disel_gate_normalize`).
        gate_bottleneck_dim (`int`, *optional*):
            The converted `gate_bottleneck_dim`; `None` (a full gate) folds bottleneck gates.

    Returns:
        `dict`: A new state dict.

    Raises:
        ValueError: For a gate key that cannot be mapped (named in the message): an unknown gate parameter, a layer
            with both gate kinds or with gates of several adapters, a missing gate weight that the conversion needs, or
            a bottleneck size other than `gate_bottleneck_dim`.
    """
    converted = {}
    layers: dict[str, dict[tuple[str, str], tuple[str, torch.Tensor]]] = {}
    layer_adapters: dict[str, set[str]] = {}
    for key, value in state_dict.items():
        entry = _reference_gate_entry(key)
        if entry is None:
            if _parse_gate_key(key) is not None and not _is_our_gate_key(key):
                raise ValueError(
                    f"Cannot map the DISeL gate key {key!r}: a reference gate parameter is one of "
                    f"{['.'.join(name) for name in _REFERENCE_GATE_PARAMS]} (after the adapter name, if any), and a "
                    f"converted one is one of {list(_OUR_GATE_PARAMS)}, without the adapter name."
                )
            converted[key] = value
            continue
        prefix, adapter, name = entry
        layer_adapters.setdefault(prefix, set()).add(adapter)
        if len(layer_adapters[prefix]) > 1:
            raise ValueError(
                f"Cannot map the DISeL gate key {key!r}: the layer {prefix!r} has gate parameters of several adapters "
                f"({sorted(layer_adapters[prefix])}); convert one adapter at a time."
            )
        layers.setdefault(prefix, {})[name] = (key, value)

    for prefix, params in layers.items():
        target = f"{prefix}.{GATE_CONTAINER}" if prefix else GATE_CONTAINER
        for our_name in _OUR_GATE_PARAMS:
            if f"{target}.{our_name}" in converted:
                raise ValueError(
                    f"Cannot map the DISeL gate keys of the layer {prefix!r}: the state dict has both reference gate "
                    f"keys and the converted key {target}.{our_name!r}."
                )
        converted.update(_convert_layer_gate(target, params, gate_normalize, gate_bottleneck_dim))

    for key, value in state_dict.items():
        if not key.endswith(".lora_embedding_A") and key != "lora_embedding_A":
            continue
        target = key[: -len("lora_embedding_A")] + GATE_CONTAINER
        if any(f"{target}.{name}" in converted for name in _OUR_GATE_PARAMS):
            continue
        r, num_embeddings = value.shape
        kw = {"dtype": value.dtype, "device": value.device}
        converted[f"{target}.weight"] = torch.zeros(gate_bottleneck_dim or r, num_embeddings, **kw)
        if gate_bottleneck_dim:
            converted[f"{target}.weight_up"] = torch.zeros(r, gate_bottleneck_dim, **kw)
        converted[f"{target}.bias"] = torch.full((r,), OPEN_GATE_LOGIT, **kw)
    return converted


def _convert_layer_gate(
    target: str, params: dict, gate_normalize: bool, gate_bottleneck_dim: Optional[int]
) -> dict[str, torch.Tensor]:
    """The converted gate parameters of one layer, from its reference ones `{(submodule, param): (key, value)}`."""
    names = set(params)
    keys = ", ".join(repr(key) for key, _ in params.values())
    is_full = bool(names & set(_FULL_GATE_PARAMS))
    if is_full and names - set(_FULL_GATE_PARAMS):
        raise ValueError(f"Cannot map the DISeL gate keys {keys}: they mix a full gate and a bottleneck gate.")
    if is_full and gate_bottleneck_dim is not None:
        raise ValueError(
            f"Cannot map the DISeL gate keys {keys}: a full gate cannot be loaded as a bottleneck gate "
            f"(`gate_bottleneck_dim={gate_bottleneck_dim}`)."
        )
    weight_name = ("linear", "weight") if is_full else ("proj_down", "weight")
    weight = params.get(weight_name, (None, None))[1]
    out = {}

    if is_full or gate_bottleneck_dim is not None:
        if weight is not None:
            if not is_full and weight.shape[0] != gate_bottleneck_dim:
                raise ValueError(
                    f"Cannot map the DISeL gate key {params[weight_name][0]!r}: its bottleneck size {weight.shape[0]} "
                    f"is not `gate_bottleneck_dim={gate_bottleneck_dim}`."
                )
            out[f"{target}.weight"] = weight
        if ("proj_up", "weight") in params:
            out[f"{target}.weight_up"] = params[("proj_up", "weight")][1]
    else:
        # a bottleneck gate loaded as a full gate: W = U V
        missing = [".".join(name) for name in _BOTTLENECK_GATE_PARAMS if name[1] == "weight" and name not in params]
        if missing:
            raise ValueError(
                f"Cannot map the DISeL gate keys {keys} to a full gate: the bottleneck factor(s) {missing} are "
                "missing."
            )
        up = params[("proj_up", "weight")][1]
        out[f"{target}.weight"] = (up.float() @ weight.float()).to(up.dtype)

    bias_name = ("linear", "bias") if is_full else ("proj_up", "bias")
    if bias_name in params:
        bias_key, bias = params[bias_name]
        if gate_normalize:
            if weight is None:
                raise ValueError(
                    f"Cannot map the DISeL gate key {bias_key!r}: with `gate_normalize` the bias is rescaled by "
                    f"1/sqrt(d_in), and d_in comes from the gate weight {'.'.join(weight_name)!r}, which is missing."
                )
            bias = (bias.float() / math.sqrt(weight.shape[-1])).to(bias.dtype)
        out[f"{target}.bias"] = bias
    return out


CONVERT_COMMAND = "python -m peft.tuners.lora.disel_checkpoints"


def upgrade_config_kwargs(kwargs: dict) -> dict:
    """
    The keyword arguments of a saved DISeL config in an older format, for `LoraConfig` of this build.

    `PeftConfig.from_peft_type` calls this only when a config has keys that its class does not know, and one of them is
    `disel_config` or starts with `disel_gate_`.

    Args:
        kwargs (`dict`):
            The loaded `adapter_config.json`; it is not modified.

    Returns:
        `dict`: For this build's first release (`use_disel: true` with a `disel_config` dict), the same config with
        `use_disel` holding that dict.

    Raises:
        ValueError: For a checkpoint of the reference package, with the command that converts it.
    """
    if is_reference_disel_config(kwargs):
        raise ValueError(
            "This adapter was saved by the standalone DISeL reference package (its config has `disel_gate_*` keys), "
            "whose gates PEFT does not read as they are. Convert it once into a DISeL adapter of this build:\n"
            f"    {CONVERT_COMMAND} <reference checkpoint folder> <new folder>\n"
            "then load the new folder with `PeftModel.from_pretrained`."
        )
    kwargs = dict(kwargs)
    options = kwargs.pop("disel_config", None)
    if options is not None and kwargs.get("use_disel") is True:
        kwargs["use_disel"] = upgrade_disel_options(options)
    return kwargs


# options of earlier releases of this build that only initialized the gates: their trained values are in the weights
REMOVED_OPTIONS = ("gate_weight_init",)


def upgrade_disel_options(options: dict) -> dict:
    """
    The `use_disel` dict of an adapter saved by an earlier release of this build (disel.1 or disel.2), for this one:
    `gate_weight_init` is dropped without a warning, as it only initialized the gates, whose trained weights the
    adapter holds. `LoraConfig` calls this only for a `use_disel` dict, that is for DISeL adapters.

    Args:
        options (`dict`):
            The saved `use_disel` options; they are not modified.

    Returns:
        `dict`: The options without the removed ones.
    """
    return {key: value for key, value in options.items() if key not in REMOVED_OPTIONS}


def release_1_hint(kwargs: dict) -> Optional[str]:
    """
    What to write instead, for code written for an earlier release of this build, e.g. `LoraConfig(use_disel=True,
    disel_config=DiselConfig(...))` or `DiselConfig(gate_lr_ratio=2.0)`.

    Args:
        kwargs (`dict`):
            The keyword arguments that were passed.

    Returns:
        `str`: The hint, or `None` if none of the old arguments was passed.
    """
    options = kwargs.get("disel_config")
    if options is not None:
        shown = dict(vars(options) if not isinstance(options, dict) else options)
        ratio = shown.pop("gate_lr_ratio", None)
        shown = upgrade_disel_options(shown)
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        hint = (
            f", and the gate learning rate goes to create_disel_optimizer(..., gate_lr_ratio={ratio})" if ratio else ""
        )
        return (
            "`LoraConfig(disel_config=...)` is the form of this build's first release (disel.1). The options now go "
            f"into `use_disel`: write `LoraConfig(use_disel=DiselConfig({args}))`{hint}."
        )
    if "gate_lr_ratio" in kwargs:
        return (
            "`gate_lr_ratio` is no `DiselConfig` option since release disel.2: it is an argument of the optimizer, "
            f"`create_disel_optimizer(model, torch.optim.AdamW, lr=..., gate_lr_ratio={kwargs['gate_lr_ratio']!r})`."
        )
    if "gate_weight_init" in kwargs:
        return (
            "`gate_weight_init` is no `DiselConfig` option since release disel.3: it was an ablation (zero gate "
            "weights); the gates start with `nn.Linear`'s initialization. Remove the argument."
        )
    return None


def convert_reference_checkpoint(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> dict:
    """
    Convert a local checkpoint folder of the reference package into a DISeL adapter folder of this build.

    `dst` gets `adapter_config.json` and `adapter_model.safetensors` in this build's format; the other files of `src`
    (a README, tokenizer files) are copied as they are.

    Args:
        src (`str` or `os.PathLike`):
            The reference checkpoint: `adapter_config.json` with `disel_gate_*` keys, `adapter_model.safetensors` (or
            `.bin`), and possibly a separate `gate_weights.safetensors` / `gate_weights.pt`.
        dst (`str` or `os.PathLike`):
            The new folder; it must not exist yet or be empty.

    Returns:
        `dict`: The converted config, as written to `dst/adapter_config.json`.
    """
    from .config import LoraConfig

    src, dst = os.fspath(src), os.fspath(dst)
    with open(os.path.join(src, "adapter_config.json")) as f:
        config_dict = json.load(f)
    config = LoraConfig(**convert_reference_disel_config(config_dict))
    if os.path.isfile(os.path.join(src, "adapter_model.safetensors")):
        state_dict = safe_load_file(os.path.join(src, "adapter_model.safetensors"))
    else:
        state_dict = load_reference_gate_file(os.path.join(src, "adapter_model.bin"))
    state_dict = merge_reference_gate_files(state_dict, src)
    options = config.use_disel
    state_dict = convert_reference_disel_state_dict(state_dict, options.gate_normalize, options.gate_bottleneck_dim)

    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"{dst} is not empty: choose a new folder for the converted adapter.")
    os.makedirs(dst, exist_ok=True)
    skip = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", *REFERENCE_GATE_FILE_NAMES}
    for name in sorted(set(os.listdir(src)) - skip):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    config.save_pretrained(dst)
    safe_save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(dst, "adapter_model.safetensors"))
    with open(os.path.join(dst, "adapter_config.json")) as f:
        return json.load(f)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog=CONVERT_COMMAND, description="Convert a checkpoint of the standalone DISeL reference package."
    )
    parser.add_argument("src", help="the reference checkpoint folder")
    parser.add_argument("dst", help="the new folder for the DISeL adapter of this build")
    args = parser.parse_args(argv)
    with open(os.path.join(args.src, "adapter_config.json")) as f:
        ratio = get_reference_gate_lr_ratio(json.load(f))
    config = convert_reference_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}: a DISeL adapter with use_disel={config['use_disel']}")
    print(f"to train on with the reference's gate learning rate: create_disel_optimizer(..., gate_lr_ratio={ratio:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
