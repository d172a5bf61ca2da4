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
"""Diagnostics of DISeL gates: record the gate openings `g(x) = sigmoid(W_g x + b_g)` while a model runs.

The learned gates are an interpretable view of which layers and ranks adapt, and to which inputs: compare e.g. the
openings on in-domain and out-of-domain data. [`DiselGateRecorder`] collects the statistics, [`plot_disel_gates`] draws
them and [`DiselGateCallback`] logs the mean opening during training with a transformers `Trainer`.
"""

import math
import os
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import TrainerCallback

from ..tuners_utils import BaseTuner
from .layer import LoraLayer


class _Accumulator:
    """Running sums of the gate openings of one layer (one split), kept on the layer's device: no host sync."""

    def __init__(self):
        self.count = 0
        self.sum = None
        self.above = None
        self.hist = None
        self.values = []

    def add(self, gates: torch.Tensor, weight: Optional[torch.Tensor], threshold: float, bins: Optional[int], keep):
        # gates: (N, r) float32; weight: (N,) float32 of 0/1 or None
        n, r = gates.shape
        acc_dtype = torch.float32 if gates.device.type == "mps" else torch.float64
        if self.sum is None:
            self.sum = torch.zeros(r, dtype=acc_dtype, device=gates.device)
            self.above = torch.zeros(r, dtype=acc_dtype, device=gates.device)
            if bins:
                self.hist = torch.zeros(r, bins, dtype=acc_dtype, device=gates.device)
        if self.sum.shape[0] != r:
            raise RuntimeError(
                f"The gate changed its number of ranks from {self.sum.shape[0]} to {r} while recording."
            )
        above = (gates > threshold).to(acc_dtype)
        values = gates.to(acc_dtype)
        if weight is None:
            self.count = self.count + n
        else:
            weight = weight.to(acc_dtype)
            self.count = self.count + weight.sum()
            values, above = values * weight[:, None], above * weight[:, None]
        self.sum += values.sum(0)
        self.above += above.sum(0)
        if bins:
            # bin index per (token, rank), offset by rank so that one bincount fills the (r, bins) table
            idx = (gates * bins).long().clamp_(0, bins - 1) + torch.arange(r, device=gates.device) * bins
            w = None if weight is None else weight[:, None].expand(n, r).reshape(-1)
            self.hist += torch.bincount(idx.reshape(-1), weights=w, minlength=r * bins).view(r, bins).to(acc_dtype)
        if keep:
            self.values.append(gates if weight is None else gates[weight.bool()])


class DiselGateStats:
    """
    Statistics of the DISeL gate openings recorded by [`DiselGateRecorder`], per split and per layer.

    `stats.splits[split][layer_name]` is a dict with:

    - `"count"` (`int`): the number of recorded tokens (positions),
    - `"mean"` (`torch.Tensor` of shape `(r,)`): the mean opening of each rank,
    - `"frac_above"` (`torch.Tensor` of shape `(r,)`): the fraction of tokens whose gate is above `threshold`,
    - `"hist"` (`torch.Tensor` of shape `(r, bins)`, int64): token counts per bin of `bin_edges` (if the recorder had
      `bins`),
    - `"values"` (`torch.Tensor` of shape `(count, r)`): the gate values (only with `keep_values=True`).

    Layer names are module names relative to the base model, in model order. Tensors are on the CPU. Use
    [`~DiselGateStats.by_module_type`] for aggregates per module type (`q_proj`, `v_proj`, ...) and
    [`~DiselGateStats.to_dict`] for a JSON-able copy.

    Args:
        splits (`dict`): The statistics, as described above.
        adapter_name (`str`): The DISeL adapter the gates belong to.
        threshold (`float`): The threshold of `"frac_above"`.
        bins (`int`, *optional*): The number of histogram bins on `[0, 1]`, `None` if no histogram was recorded.
    """

    def __init__(self, splits: dict, adapter_name: str, threshold: float, bins: Optional[int]):
        self.splits = splits
        self.adapter_name = adapter_name
        self.threshold = threshold
        self.bins = bins

    @property
    def bin_edges(self) -> Optional[torch.Tensor]:
        """The `bins + 1` edges of the histogram bins on `[0, 1]`."""
        return None if not self.bins else torch.linspace(0.0, 1.0, self.bins + 1)

    def layer_names(self, split: Optional[str] = None) -> list[str]:
        """The recorded layers of `split`, or of all splits, in model order."""
        names = OrderedDict()
        for name, layers in self.splits.items():
            if split is None or name == split:
                names.update(dict.fromkeys(layers))
        return list(names)

    def mean_matrix(self, split: str) -> tuple[list[str], torch.Tensor]:
        """The layer names and the `(num_layers, max_r)` matrix of mean openings of `split` (NaN where a layer has fewer
        ranks or no recorded token)."""
        layers = self.splits[split]
        names = list(layers)
        max_r = max((entry["mean"].numel() for entry in layers.values()), default=0)
        matrix = torch.full((len(names), max_r), float("nan"))
        for i, name in enumerate(names):
            mean = layers[name]["mean"]
            matrix[i, : mean.numel()] = mean
        return names, matrix

    def by_module_type(self, split: str) -> dict[str, dict[str, Any]]:
        """
        Aggregates of `split` per module type, the last component of the layer name (`q_proj`, `down_proj`, `lin0`...).

        Returns a dict `module_type -> {"num_layers", "count", "mean", "frac_above", "hist"}` where `count` is the
        number of gate values (tokens x ranks x layers), `mean` and `frac_above` are floats over all of them and `hist`
        (`(bins,)`, if recorded) sums the histograms of all layers and ranks.
        """
        out = OrderedDict()
        for name, entry in self.splits[split].items():
            module_type = name.rsplit(".", 1)[-1]
            agg = out.setdefault(module_type, {"num_layers": 0, "count": 0, "sum": 0.0, "above": 0.0, "hist": None})
            n = entry["count"] * entry["mean"].numel()
            agg["num_layers"] += 1
            agg["count"] += n
            agg["sum"] += float(entry["mean"].double().sum()) * entry["count"]
            agg["above"] += float(entry["frac_above"].double().sum()) * entry["count"]
            if "hist" in entry:
                hist = entry["hist"].sum(0)
                agg["hist"] = hist if agg["hist"] is None else agg["hist"] + hist
        for agg in out.values():
            count = agg["count"]
            agg["mean"] = agg.pop("sum") / count if count else float("nan")
            agg["frac_above"] = agg.pop("above") / count if count else float("nan")
            if agg["hist"] is None:
                del agg["hist"]
        return out

    def _overall(self, key: str, split: Optional[str]) -> float:
        total, count = 0.0, 0
        for name, layers in self.splits.items():
            if split is None or name == split:
                for entry in layers.values():
                    total += float(entry[key].double().sum()) * entry["count"]
                    count += entry["count"] * entry[key].numel()
        return total / count if count else float("nan")

    def mean_gate(self, split: Optional[str] = None) -> float:
        """The mean opening over all tokens, ranks and layers of `split` (all splits if `None`); NaN if empty."""
        return self._overall("mean", split)

    def frac_above(self, split: Optional[str] = None) -> float:
        """The fraction of gate values above `threshold` over all tokens, ranks and layers of `split` (all if `None`)."""
        return self._overall("frac_above", split)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (lists and numbers) of the statistics, without the raw `"values"`."""

        def clean(x):
            if isinstance(x, torch.Tensor):
                return x.tolist()
            if isinstance(x, float) and not math.isfinite(x):
                return None
            return x

        splits = {}
        for split, layers in self.splits.items():
            splits[split] = {
                "mean_gate": clean(self.mean_gate(split)),
                "layers": {
                    name: {k: clean(v) for k, v in entry.items() if k != "values"} for name, entry in layers.items()
                },
                "module_types": {
                    t: {k: clean(v) for k, v in agg.items()} for t, agg in self.by_module_type(split).items()
                },
            }
        return {"adapter_name": self.adapter_name, "threshold": self.threshold, "bins": self.bins, "splits": splits}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiselGateStats":
        """Rebuild the statistics from the output of [`~DiselGateStats.to_dict`] (e.g. loaded from a JSON file)."""
        splits = {}
        for split, content in data["splits"].items():
            splits[split] = OrderedDict()
            for name, entry in content["layers"].items():
                splits[split][name] = {
                    k: v if k == "count" else torch.tensor(v, dtype=torch.int64 if k == "hist" else torch.float32)
                    for k, v in entry.items()
                }
        return cls(splits, adapter_name=data["adapter_name"], threshold=data["threshold"], bins=data["bins"])

    def __repr__(self) -> str:
        parts = ", ".join(f"{s!r}: {len(layers)} layers" for s, layers in self.splits.items())
        return f"DiselGateStats(adapter_name={self.adapter_name!r}, splits={{{parts}}})"


class DiselGateRecorder:
    """
    Records the gate openings `g(x) = sigmoid(W_g x + b_g)` of a DISeL adapter while the model runs.

    Use it as a context manager. While recording, a forward hook on every gate of the adapter receives the gate logits
    that the adapter's forward computed, and the recorder adds `sigmoid(logits)` to running statistics per layer and
    per rank (count, mean, fraction above `threshold`, histogram on `[0, 1]`). The model outputs are unchanged (the
    hooks return nothing); the hooked layers call the gate as a module, so they skip DISeL's fused A+gate projection
    while recording. On exit, also on an exception, all hooks are removed, so the model costs nothing when not
    recording. Each recorded forward costs a few element-wise ops and reductions per layer; the statistics stay on the
    device until [`stats`] is called.

    Only the tokens that the adapter's gate actually sees are recorded: nothing while the adapters are disabled, and
    with mixed-batch inference (`adapter_names=[...]`) only the rows assigned to the adapter. All positions of the
    input count as tokens, padding included, unless a mask is given with [`set_mask`]. With gradient checkpointing, the
    recomputed forward is recorded again: counts double, means, fractions and histogram shapes do not change.

    Example:

    ```py
    >>> from peft.tuners.lora.disel_diagnostics import DiselGateRecorder, plot_disel_gates

    >>> with DiselGateRecorder(model, threshold=0.5) as recorder:
    ...     recorder.set_split("in-domain")
    ...     model(**batch_in)
    ...     recorder.set_split("out-of-domain")
    ...     model(**batch_ood)
    >>> stats = recorder.stats()
    >>> stats.by_module_type("in-domain")["q_proj"]["mean"]
    >>> plot_disel_gates(stats, "gates.png")
    ```

    Args:
        model (`torch.nn.Module`):
            A `PeftModel`, its `base_model`, or the model the adapters were injected into.
        adapter_name (`str`, *optional*):
            The DISeL adapter to record. Defaults to the active DISeL adapter; required when several are active. To
            record several adapters, use one recorder per adapter.
        threshold (`float`, *optional*, defaults to `0.5`):
            A gate counts as open for `"frac_above"` when its value is strictly above this threshold.
        bins (`int`, *optional*, defaults to `20`):
            The number of equal histogram bins on `[0, 1]`; `None` or `0` records no histogram (cheaper).
        split (`str`, *optional*, defaults to `"default"`):
            The initial split label, see [`set_split`].
        keep_values (`bool`, *optional*, defaults to `False`):
            Also keep every recorded gate value (on the CPU, `(tokens, r)` per layer) in the statistics' `"values"`.
            Costs memory and a host sync per layer call; for small analyses and tests.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter_name: Optional[str] = None,
        *,
        threshold: float = 0.5,
        bins: Optional[int] = 20,
        split: str = "default",
        keep_values: bool = False,
    ):
        if bins is not None and (not isinstance(bins, int) or bins < 0):
            raise ValueError(f"`bins` must be a non-negative integer or None, got {bins!r}.")
        self.model = model
        self.threshold = float(threshold)
        self.bins = bins or None
        self.keep_values = keep_values
        self._split = split
        self._mask = None
        self._handles = []
        self._rows: dict[str, Optional[list[int]]] = {}
        self._data: dict[str, OrderedDict] = OrderedDict()

        root = model
        if hasattr(model, "get_base_model"):
            root = model.get_base_model()
        elif isinstance(model, BaseTuner):
            root = model.model
        gated = [
            (name, module)
            for name, module in root.named_modules()
            if isinstance(module, LoraLayer) and len(getattr(module, "lora_disel_gate", {})) > 0
        ]
        if not gated:
            raise ValueError(
                "The model has no DISeL gate to record: DISeL adapters are created with `LoraConfig(use_disel=True)`."
            )
        if adapter_name is None:
            active = OrderedDict()
            for _, module in gated:
                active.update(dict.fromkeys(a for a in module.active_adapters if a in module.lora_disel_gate))
            if len(active) != 1:
                raise ValueError(
                    f"Cannot choose the DISeL adapter to record: the active DISeL adapters are {list(active)}. Pass "
                    "`adapter_name`."
                )
            adapter_name = next(iter(active))
        self.adapter_name = adapter_name
        self.layers = OrderedDict((name, module) for name, module in gated if adapter_name in module.lora_disel_gate)
        if not self.layers:
            raise ValueError(f"The model has no DISeL gate for the adapter {adapter_name!r}.")

    # --- recording ---------------------------------------------------------------------------------------------------

    @property
    def recording(self) -> bool:
        """Whether the hooks are attached."""
        return bool(self._handles)

    def start(self) -> "DiselGateRecorder":
        """Attach the hooks (idempotent). Prefer the context manager, which also removes them on an exception."""
        if not self._handles:
            for name, module in self.layers.items():
                # the layer's forward pre-hook notes which rows a mixed batch gives the adapter, and the gate's forward
                # hook records the logits that the adapter's forward computed
                self._handles.append(module.register_forward_pre_hook(self._make_rows_hook(name), with_kwargs=True))
                gate = module.lora_disel_gate[self.adapter_name]
                self._handles.append(gate.register_forward_hook(self._make_logits_hook(name)))
        return self

    def stop(self) -> None:
        """Remove the hooks; the statistics recorded so far are kept."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_split(self, split: str) -> None:
        """Record the next forward passes under the label `split` (e.g. `"in-domain"`, `"out-of-domain"`)."""
        self._split = split

    def set_mask(self, mask: Optional[torch.Tensor]) -> None:
        """
        Record only the positions where `mask` is non-zero in the next forward passes (`None`: all positions).

        `mask` must have the leading shape of the layer inputs, e.g. the `(batch, seq_len)` attention mask of a decoder
        whose LoRA layers see `(batch, seq_len, hidden)` inputs; a layer whose input does not match raises.
        """
        self._mask = None if mask is None else mask.detach() != 0

    def reset(self) -> None:
        """Drop all recorded statistics."""
        self._data = OrderedDict()

    def _make_rows_hook(self, name: str):
        def hook(module, args, kwargs):
            adapter_names = kwargs.get("adapter_names")
            if adapter_names is None:
                self._rows[name] = None
            else:
                self._rows[name] = [i for i, a in enumerate(adapter_names) if a == self.adapter_name]

        return hook

    def _make_logits_hook(self, name: str):
        def hook(gate, args, logits):
            with torch.no_grad():
                self._record(name, gate, logits.detach())

        return hook

    def _record(self, name: str, gate, logits: torch.Tensor) -> None:
        gates = torch.sigmoid(logits)
        if gate.kind == "conv":
            gates = gates.movedim(1, -1)
        mask, rows = self._mask, self._rows.get(name)
        if mask is not None and rows is not None:
            mask = mask[rows]
        weight = None
        if mask is not None:
            lead = gates.shape[:-1]
            if tuple(lead[: mask.dim()]) != tuple(mask.shape):
                raise ValueError(
                    f"The mask of shape {tuple(mask.shape)} does not match the input of layer {name!r}, which gives "
                    f"gates of shape {tuple(gates.shape)}: the mask must cover their leading dimensions."
                )
            weight = mask.to(gates.device).reshape(*mask.shape, *([1] * (len(lead) - mask.dim()))).expand(lead)
            weight = weight.reshape(-1).float()
        gates = gates.reshape(-1, gates.shape[-1]).float()
        acc = self._data.setdefault(self._split, OrderedDict()).get(name)
        if acc is None:
            acc = self._data[self._split][name] = _Accumulator()
        acc.add(gates, weight, self.threshold, self.bins, self.keep_values)
        if self.keep_values:
            acc.values[-1] = acc.values[-1].cpu()

    # --- results -----------------------------------------------------------------------------------------------------

    def stats(self) -> DiselGateStats:
        """The statistics recorded so far, as a [`DiselGateStats`] (CPU tensors; one host sync per layer and split)."""
        order = list(self.layers)
        splits = OrderedDict()
        for split, layers in self._data.items():
            splits[split] = OrderedDict()
            for name in sorted(layers, key=order.index):
                acc = layers[name]
                count = round(float(acc.count))
                denom = count if count else float("nan")
                entry = {
                    "count": count,
                    "mean": (acc.sum / denom).float().cpu(),
                    "frac_above": (acc.above / denom).float().cpu(),
                }
                if acc.hist is not None:
                    entry["hist"] = acc.hist.round().long().cpu()
                if self.keep_values:
                    r = acc.sum.shape[0]
                    entry["values"] = torch.cat(acc.values) if acc.values else torch.empty(0, r)
                splits[split][name] = entry
        return DiselGateStats(splits, adapter_name=self.adapter_name, threshold=self.threshold, bins=self.bins)


def plot_disel_gates(
    stats: Union[DiselGateStats, dict],
    path: Union[str, os.PathLike],
    splits: Optional[list[str]] = None,
    title: Optional[str] = None,
    dpi: int = 120,
) -> str:
    """
    Plot recorded DISeL gate statistics to a PNG file.

    The top row shows one heat map of the mean opening per split (layers x ranks, rows in model order), plus the
    difference between the first two splits when there are two or more. The rows below show, per module type (`q_proj`,
    `down_proj`, ...), the distribution of the gate values (all layers and ranks of that type) of each split as a
    fraction of tokens per bin, when the statistics have histograms.

    Requires matplotlib (`pip install matplotlib`); it draws without pyplot, with the Agg renderer, and does not change
    matplotlib's global backend.

    Args:
        stats ([`DiselGateStats`] or `dict`):
            The output of [`DiselGateRecorder.stats`], or its `to_dict()` form.
        path (`str` or `os.PathLike`):
            The PNG file to write; its folder is created if needed.
        splits (`list[str]`, *optional*):
            The splits to plot, in this order; defaults to all recorded splits.
        title (`str`, *optional*):
            The figure title; defaults to the adapter name.
        dpi (`int`, *optional*, defaults to `120`):
            The resolution of the PNG.

    Returns:
        `str`: The path of the written file.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("`plot_disel_gates` requires matplotlib: `pip install matplotlib`.") from exc

    if isinstance(stats, dict):
        stats = DiselGateStats.from_dict(stats)
    splits = list(stats.splits) if splits is None else list(splits)
    unknown = [s for s in splits if s not in stats.splits]
    if not splits or unknown:
        raise ValueError(f"No recorded split to plot: asked for {unknown or splits}, recorded {list(stats.splits)}.")

    matrices = {s: stats.mean_matrix(s) for s in splits}
    names = stats.layer_names()
    names = [n for n in names if any(n in matrices[s][0] for s in splits)]
    panels = []
    for s in splits:
        s_names, m = matrices[s]
        full = torch.full((len(names), m.shape[1]), float("nan"))
        for i, n in enumerate(s_names):
            full[names.index(n)] = m[i]
        panels.append((f"mean gate: {s}", full, "viridis", (0.0, 1.0)))
    if len(splits) >= 2:
        diff = panels[0][1] - panels[1][1]
        lim = max(float(diff.nan_to_num(0).abs().max()), 1e-6)
        panels.append((f"{splits[0]} - {splits[1]}", diff, "RdBu_r", (-lim, lim)))

    module_types = OrderedDict()
    if stats.bins:
        for s in splits:
            for t, agg in stats.by_module_type(s).items():
                if "hist" in agg:
                    module_types.setdefault(t, {})[s] = agg["hist"]
    hist_cols = min(4, max(len(module_types), 1))
    hist_rows = math.ceil(len(module_types) / hist_cols)

    heat_height = min(max(2.5, 0.12 * len(names) + 1.5), 30.0)
    fig = Figure(figsize=(max(4.0 * len(panels), 3.2 * hist_cols), heat_height + 2.6 * hist_rows))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + hist_rows, 1, height_ratios=[heat_height] + [2.6] * hist_rows)
    heat_grid = grid[0].subgridspec(1, len(panels))
    label_step = max(1, math.ceil(len(names) / 64))
    for i, (panel_title, matrix, cmap, (vmin, vmax)) in enumerate(panels):
        ax = fig.add_subplot(heat_grid[0, i])
        image = ax.imshow(matrix.numpy(), aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(panel_title, fontsize=9)
        ax.set_xlabel("rank")
        ticks = list(range(0, len(names), label_step))
        ax.set_yticks(ticks)
        ax.set_yticklabels([names[t] for t in ticks] if i == 0 else [], fontsize=6)
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)

    if module_types:
        # tight_layout does not space the rows of a nested grid: room for each row's titles and the x labels above
        hist_grid = grid[1:].subgridspec(hist_rows, hist_cols, hspace=0.6)
        edges = stats.bin_edges.numpy()
        centers = (edges[:-1] + edges[1:]) / 2
        for i, (module_type, hists) in enumerate(module_types.items()):
            ax = fig.add_subplot(hist_grid[i // hist_cols, i % hist_cols])
            for s, hist in hists.items():
                total = float(hist.sum())
                frac = (hist / total).numpy() if total else hist.numpy()
                ax.step(centers, frac, where="mid", label=s)
            ax.axvline(stats.threshold, color="grey", linestyle=":", linewidth=0.8)
            ax.set_title(module_type, fontsize=9)
            ax.set_xlim(0.0, 1.0)
            ax.set_xlabel("gate value", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_ylabel("fraction of tokens", fontsize=8)
                ax.legend(fontsize=7)

    fig.suptitle(title if title is not None else f"DISeL gates of adapter {stats.adapter_name!r}")
    fig.tight_layout()
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


class DiselGateCallback(TrainerCallback):
    """
    A transformers `TrainerCallback` that logs the mean DISeL gate opening during training.

    From `on_step_begin` to `on_step_end` of each optimizer step (all its gradient accumulation micro-batches), a
    [`DiselGateRecorder`] without histograms records the gates of the training batches; at each logging step, the
    callback adds to the logs `disel/mean_gate` (mean opening over tokens, ranks and layers since the last log),
    `disel/frac_open` (fraction above `threshold`) and, with `per_module_type=True`, `disel/mean_gate/<module type>`,
    then starts over. The values also go into `trainer.state.log_history`.

    Cost: per gated layer and training forward, about ten small element-wise ops and reductions, without host sync;
    hooks are attached and removed once per step, and the values are synced once per gated layer at each logging step
    only. The small ops weigh most on small models and less as the layers grow. Evaluation passes are not recorded.
    Under distributed training, each process logs the openings of its own batches.

    Callbacks see the logs in order, and transformers runs the `report_to` integrations (TensorBoard, W&B, ...) before
    the callbacks passed to the `Trainer`. For these integrations to receive the gate values too, put the callback
    first: `trainer.callback_handler.callbacks.insert(0, DiselGateCallback())`.

    Args:
        adapter_name (`str`, *optional*):
            The DISeL adapter to follow; defaults to the active one.
        threshold (`float`, *optional*, defaults to `0.5`):
            The threshold of `disel/frac_open`.
        per_module_type (`bool`, *optional*, defaults to `False`):
            Also log the mean opening per module type (`disel/mean_gate/q_proj`, ...).
        prefix (`str`, *optional*, defaults to `"disel/"`):
            The prefix of the logged keys.
    """

    def __init__(
        self,
        adapter_name: Optional[str] = None,
        threshold: float = 0.5,
        per_module_type: bool = False,
        prefix: str = "disel/",
    ):
        self.adapter_name = adapter_name
        self.threshold = threshold
        self.per_module_type = per_module_type
        self.prefix = prefix
        self.recorder = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.recorder is None:
            self.recorder = DiselGateRecorder(model, self.adapter_name, threshold=self.threshold, bins=None)
        self.recorder.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.stop()

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.recorder is None or logs is None:
            return
        stats = self.recorder.stats()
        self.recorder.reset()
        mean = stats.mean_gate()
        if not math.isfinite(mean):
            return
        new = {f"{self.prefix}mean_gate": mean, f"{self.prefix}frac_open": stats.frac_above()}
        if self.per_module_type:
            for split in stats.splits:
                for module_type, agg in stats.by_module_type(split).items():
                    new[f"{self.prefix}mean_gate/{module_type}"] = agg["mean"]
        logs.update(new)
        # the Trainer appends a copy of the logs to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(new)
