"""The outputs of the demo and the frontier: tables, verdict lines, plots and result files (the frontier's statistics
are in frontier_stats.py)."""

import json
import os
import textwrap
from pathlib import Path

from data import DataError
from frontier_stats import relative_ppl_change


RETENTION_SETS = ("pydoc", "licences", "english")


def write_json(path: Path, obj):
    """Write `obj` to `path` as indented JSON, atomically (a reader never sees half a file)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def table(results: dict) -> str:
    """A plain-text table, one row per method; peak MiB is the peak RSS of the process during that row's phase."""
    base = results["base"]
    ppl_names = list(base["ppl"])
    head = ["method", "target acc"] + [f"ppl {k}" for k in ppl_names]
    head += ["d ppl %", "sentiment", "trainable", "peak MiB", "train s", "wall s"]
    rows = []
    for name, r in results.items():
        rows.append(
            [name, f"{r['target_acc']:.3f}"]
            + [f"{r['ppl'][k]:.2f}" for k in ppl_names]
            + [
                f"{relative_ppl_change(r, base):+.2f}",
                f"{r['sentiment_acc']:.3f}",
                fmt_params(r.get("trainable_params", 0)) if r.get("trainable_params") else "-",
                f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "-",
                f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-",
                f"{r.get('wall_seconds', 0):.0f}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


COLORS = {"base": "black", "lora": "tab:blue", "disel": "tab:red", "dora": "tab:green"}


def plot_gain_vs_retention(results: dict, path: str, title: str = "") -> str:
    """Two panels: target accuracy vs mean relative perplexity change, and vs sentiment accuracy."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise DataError("The plots need matplotlib: `pip install matplotlib`.") from e

    base = results["base"]
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = [
        (
            axes[0],
            lambda r: relative_ppl_change(r, base),
            "retention cost: mean perplexity change vs base (%)  [lower=better]",
        ),
        (axes[1], lambda r: 100 * r["sentiment_acc"], "retention: zero-shot sentiment accuracy (%)  [higher=better]"),
    ]
    for ax, xfn, xlabel in panels:
        for i, (name, r) in enumerate(results.items()):
            x, y = xfn(r), 100 * r["target_acc"]
            n = r.get("n_problems") or 0
            se = 100 * (r["target_acc"] * (1 - r["target_acc"]) / n) ** 0.5 if n else 0.0
            color = COLORS.get(name, "tab:purple")
            ax.errorbar([x], [y], yerr=[se], fmt="o", markersize=9, color=color, capsize=4, zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, 4 + 11 * (i % 2)), fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("target task: exact-match accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].axvline(0.0, color="grey", linestyle=":", linewidth=0.8)
    axes[1].axvline(100 * base["sentiment_acc"], color="grey", linestyle=":", linewidth=0.8)
    fig.suptitle(title or "gain vs retention", fontsize=10)
    fig.text(0.5, 0.005, "error bars: binomial standard error of the accuracy", ha="center", fontsize=8, color="grey")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# --- the frontier (demo/frontier.py) --------------------------------------------------------------------------------

CURVE_LABELS = {
    "LoRA lr": "LoRA: learning rate",
    "DISeL gate lr ratio": "DISeL: gate lr ratio (lr {lr:g})",
    "DISeL x5 lr": "DISeL x5: learning rate",
    "DISeL bottleneck gate": "DISeL x5, bottleneck gate (lr {lr:g})",
    "DoRA": "DoRA (lr {lr:g})",
}
CURVE_STYLE = {
    "LoRA lr": ("tab:blue", "o", "-"),
    "DISeL gate lr ratio": ("tab:red", "s", "-"),
    "DISeL x5 lr": ("tab:orange", "D", "--"),
    "DISeL bottleneck gate": ("tab:purple", "^", ""),
    "DoRA": ("tab:green", "v", ""),
}
REFERENCE = ("DISeL gate lr ratio", "x5")  # the paper's default, at the demo's LoRA learning rate


def _fmt_ratio(p):
    if p.get("ratio") is None:
        return "-"
    if p.get("ratio_lo") is None:
        return f"{p['ratio']:.2f}"
    return f"{p['ratio']:.2f} [{p['ratio_lo']:.2f}, {p['ratio_hi']:.2f}]"


def _name(p):
    if p["curve"] == "DISeL gate lr ratio":
        return f"DISeL gate lr {p['knob']} (lr {p['lr']:g})"
    if p["curve"] == "DISeL x5 lr":
        return f"DISeL gate lr x5 at lr {p['lr']:g}"
    if p["curve"] == "LoRA lr":
        return f"LoRA lr {p['lr']:g}"
    if p["gate_bottleneck_dim"]:
        return f"DISeL bottleneck gate dim {p['gate_bottleneck_dim']} (x5, lr {p['lr']:g})"
    return f"{p['curve']} (lr {p['lr']:g})"


def _no_ratio(p):
    """Why a point has no cost ratio."""
    if p["lora_cost"] is None:
        return "outside LoRA's accuracy range"
    return f"LoRA's interpolated cost there is {p['lora_cost']:+.1f}%, not a positive cost to compare with"


def _against_points(p):
    """What plain dominance says of a point, whether or not it is inside LoRA's accuracy range."""
    parts = []
    if p["beaten_by"]:
        parts.append(f"LoRA at {', '.join(p['beaten_by'])} is at least as accurate at no more cost")
    if p["beats"]:
        parts.append(f"at least as accurate as LoRA at {', '.join(p['beats'])}, at no more cost")
    return "; ".join(parts)


def verdict_lines(summary) -> list[str]:
    """The verdict, computed from the summary: DISeL's retention cost as a fraction of LoRA's at matched accuracy."""
    pts = list({str(p["run"]): p for p in reversed(summary["points"]) if p["curve"] != "LoRA lr"}.values())[::-1]
    disel = [p for p in pts if p["method"] == "disel"]  # each run once, on the first curve it belongs to
    lo, hi = summary["lora_acc_range"] or (float("nan"), float("nan"))
    several = summary["n_seeds"] > 1
    resampled = summary.get("resampled", ["seed"] if several else [])
    interval = f"[5-95% over {' and '.join(resampled)} resamples]" if resampled else "(one seed: no interval)"
    lines = []
    ref = next((p for p in disel if (p["curve"], p["knob"]) == REFERENCE), None)
    if ref is not None and ref["ratio"] is not None:
        lines.append(
            f"VERDICT: at matched target accuracy ({ref['acc_mean']:.1f}%), DISeL at the paper default (gate lr x5, "
            f"lr {ref['lr']:g}) has {_fmt_ratio(ref)} {interval} of LoRA's retention cost: {ref['cost_mean']:+.1f}% "
            f"vs {ref['lora_cost']:+.1f}% mean perplexity change on the held-out texts "
            f"({ref['cost_diff']:+.1f} points)."
        )
    elif ref is not None:
        extra = _against_points(ref)
        lines.append(
            f"VERDICT: no matched comparison for DISeL at the paper default ({ref['acc_mean']:.1f}% target accuracy, "
            f"cost {ref['cost_mean']:+.1f}%): {_no_ratio(ref)} ({lo:.1f}-{hi:.1f}%)"
            + (f"; {extra}." if extra else ".")
        )
    inside = [p for p in disel if p["ratio"] is not None]
    if inside:
        ratios = [p["ratio"] for p in inside]
        below = [p for p in inside if p["ratio"] < 1]
        sure = [p for p in inside if p.get("ratio_hi") is not None and p["ratio_hi"] < 1]
        lines.append(
            f"DISeL points compared (inside LoRA's accuracy range {lo:.1f}-{hi:.1f}%): {len(inside)} of {len(disel)}, "
            f"cost ratio {min(ratios):.2f} to {max(ratios):.2f}; below LoRA's curve at {len(below)} of {len(inside)}"
            + (
                f", with the whole {'seed-' if resampled == ['seed'] else ''}resample range below 1 at {len(sure)}"
                if resampled
                else " (one seed)"
            )
            + "."
        )
        weak = [p for p in inside if p["ratio"] >= 1 or (resampled and (p["ratio_hi"] is None or p["ratio_hi"] >= 1))]
        if weak:
            lines.append(
                "DISeL does not clearly dominate LoRA at: "
                + "; ".join(f"{_name(p)} (ratio {_fmt_ratio(p)})" for p in weak)
                + "."
            )
        elif resampled:
            lines.append(
                f"DISeL dominates LoRA at every compared DISeL point, over the {' and '.join(resampled)} resamples."
            )
    for p in disel:
        if p["ratio"] is None:
            extra = _against_points(p)
            lines.append(
                f"Not interpolated: {_name(p)} ({p['acc_mean']:.1f}%, cost {p['cost_mean']:+.1f}%): {_no_ratio(p)}"
                + (f"; {extra}." if extra else ".")
            )
        elif p["beaten_by"]:
            lines.append(f"{_name(p)}: {_against_points(p)}.")
    for p in pts:
        if p["method"] != "disel":
            where = f"cost ratio {_fmt_ratio(p)}" if p["ratio"] is not None else _no_ratio(p)
            lines.append(f"{_name(p)}: {p['acc_mean']:.1f}% at cost {p['cost_mean']:+.1f}% ({where}).")
    se = summary["acc_se"]
    test_error = f", about {se:.1f} accuracy points (binomial, {summary['n_test']} problems)," if se else ""
    if "test-problem" in resampled:
        lines.append(
            f"Uncertainty: the ranges resample the {summary['n_test']} test problems (the same draw for every run) and "
            f"the {summary['n_seeds']} training seed(s), so they hold the fixed test set's own sampling error"
            + test_error.rstrip(",")
            + "."
        )
    elif several:
        lines.append(
            f"Uncertainty: the ranges resample the {summary['n_seeds']} training seeds only (with few seeds they are "
            f"coarse and narrow); the fixed test set's own sampling error"
            + test_error
            + " is not in them (these runs carry no per-problem results to resample)."
        )
    return lines


def frontier_table(summary) -> str:
    """A markdown table, one row per point (mean +- standard deviation over seeds)."""
    base = summary["base"]
    names = list(base["ppl"])
    head = ["curve", "knob", "seeds", "target acc %", "retention cost %"] + [f"ppl {k}" for k in names]
    head += ["sentiment %", "train s", "LoRA cost at same acc", "cost - LoRA's", "cost / LoRA's"]
    head += ["acc per seed", "cost per seed"]
    rows = [["base", "-", "-", f"{base['target_acc']:.1f}", "0.0"] + [f"{base['ppl'][k]:.2f}" for k in names]]
    rows[0] += [f"{base['sentiment']:.0f}", "-", "-", "-", "-", "-", "-"]
    for p in summary["points"]:
        lora_cost = p.get("lora_cost")
        if p["curve"] == "LoRA lr":
            matched = ["-", "-"]
        elif lora_cost is None:
            matched = ["outside", "-"]
        else:
            matched = [f"{lora_cost:+.1f}", f"{p['cost_diff']:+.1f}"]
        rows.append(
            [p["curve"], p["knob"], str(len(p["seeds"])), f"{p['acc_mean']:.1f} ± {p['acc_sd']:.1f}"]
            + [f"{p['cost_mean']:+.1f} ± {p['cost_sd']:.1f}"]
            + [f"{p['ppl_mean'][k]:.2f}" for k in names]
            + [f"{p['sentiment_mean']:.0f}", f"{p['train_seconds_mean']:.0f}", *matched, _fmt_ratio(p)]
            + [", ".join(f"{a:.1f}" for a in p["acc"]), ", ".join(f"{c:+.1f}" for c in p["cost"])]
        )
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot_frontier(summary, path: str, title: str = "") -> str:
    """Target accuracy vs retention cost: one curve per knob (mean over seeds, error bars: standard deviation over
    seeds on both axes), each seed's run as a faint dot, the base model at the origin of the cost axis."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise DataError("The plots need matplotlib: `pip install matplotlib`.") from e

    fig = Figure(figsize=(9, 6.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    curves = {}
    for p in summary["points"]:
        curves.setdefault(p["curve"], []).append(p)
    for curve, pts in curves.items():
        color, marker, line = CURVE_STYLE.get(curve, ("tab:gray", "o", ""))
        for p in pts:
            ax.scatter(p["cost"], p["acc"], color=color, marker=marker, s=14, alpha=0.3, zorder=2)
        ax.errorbar(
            [p["cost_mean"] for p in pts],
            [p["acc_mean"] for p in pts],
            xerr=[p["cost_sd"] for p in pts],
            yerr=[p["acc_sd"] for p in pts],
            fmt=marker + line,
            color=color,
            markersize=7,
            capsize=3,
            label=CURVE_LABELS.get(curve, curve).format(lr=pts[0]["lr"]),
            zorder=3,
        )
        if len(pts) > 1:
            for p in pts:
                xy = (p["cost_mean"], p["acc_mean"])
                ax.annotate(p["knob"], xy, textcoords="offset points", xytext=(6, -10), fontsize=7, color=color)
    ax.scatter([0.0], [summary["base"]["target_acc"]], color="black", marker="*", s=90, label="base model", zorder=4)
    ax.axvline(0.0, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("retention cost: mean perplexity change on held-out texts vs the base model (%)  [lower is better]")
    ax.set_ylabel("target task: exact-match accuracy (%)  [higher is better]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    lines = verdict_lines(summary)
    fig.suptitle(title or "gain vs retention frontier", fontsize=10)
    ax.set_title("\n".join(textwrap.wrap(lines[0] if lines else "", 120)), fontsize=8)
    note = f"mean over {summary['n_seeds']} seed(s); error bars: standard deviation over seeds; faint: single runs"
    fig.text(0.5, 0.005, note, ha="center", fontsize=8, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
