"""The demo's outputs: the comparison table and the gain-vs-retention plot."""

import os

from data import DataError


RETENTION_SETS = ("pydoc", "licences", "english")


def relative_ppl_change(result: dict, base: dict) -> float:
    """Mean relative perplexity change (%) over the retention evaluation sets, versus the base model."""
    changes = [100.0 * (result["ppl"][k] / base["ppl"][k] - 1.0) for k in base["ppl"]]
    return sum(changes) / len(changes)


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
