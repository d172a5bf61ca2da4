"""The frontier's statistics (demo/frontier.py): retention cost, LoRA's Pareto curve, DISeL's cost at matched
accuracy as a fraction of LoRA's, and its bootstrap range over seeds and, where the runs carry per-problem results, the
test problems (a paired bootstrap)."""

import itertools
import random
import statistics


MIN_INSIDE = 0.9  # an interval only if the point is inside LoRA's accuracy range in this share of the resamples


def relative_ppl_change(result: dict, base: dict) -> float:
    """Mean relative perplexity change (%) over the retention evaluation sets, versus the base model."""
    changes = [100.0 * (result["ppl"][k] / base["ppl"][k] - 1.0) for k in base["ppl"]]
    return sum(changes) / len(changes)


def _mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pareto(curve):
    """The points of `curve` ([(accuracy, cost), ...]) that no other point beats on both (higher or equal accuracy at
    lower or equal cost), sorted by accuracy: along them, cost rises with accuracy."""
    keep = [(a, c) for a, c in curve if not any((a2 >= a and c2 <= c) and (a2, c2) != (a, c) for a2, c2 in curve)]
    return sorted(set(keep))


def interpolate_cost(curve, acc):
    """The cost at accuracy `acc`, linear between the Pareto points of `curve` ([(accuracy, cost), ...]); None outside
    the accuracy range they cover (no extrapolation)."""
    pts = pareto(curve)
    if not pts or acc < pts[0][0] or acc > pts[-1][0]:
        return None
    for (a0, c0), (a1, c1) in itertools.pairwise(pts):
        if a0 <= acc <= a1:
            return c0 + (c1 - c0) * (acc - a0) / (a1 - a0)
    return pts[0][1]  # a single point, at exactly its accuracy


def _ratio(cost, lora_cost):
    return cost / lora_cost if lora_cost is not None and lora_cost > 0 else None


def _per_problem(rows) -> int:
    """The number of test problems when every run of `rows` carries its per-problem results (all of the same
    length), else 0."""
    lengths = {len(r["correct"]) if isinstance(r.get("correct"), list) else 0 for r in rows}
    return lengths.pop() if len(lengths) == 1 else 0


def _resampled_acc(correct, counts, n):
    """Accuracy (%) of one run on a resample of the test problems (`counts`: how often each problem was drawn)."""
    return 100 * sum(c * k for c, k in zip(correct, counts)) / n


def frontier_summary(base, runs, settings, seeds, n_boot=2000, boot_seed=0):
    """Per point: accuracy and retention cost (mean perplexity change vs base, %) per seed, their mean and standard
    deviation. For every point that is not LoRA's: LoRA's cost at the same accuracy (interpolated along the Pareto
    points of LoRA's mean curve), the ratio and the difference, the LoRA points that beat it or that it beats on both
    axes, and a 5-95% range of the ratio over bootstrap resamples.

    A resample draws each point's seeds with replacement (LoRA's curve included) and, when every run carries its
    per-problem results (`correct`), the test problems with replacement, the same draw for every run (a paired
    bootstrap: the runs share the test set), so that the range also holds the test set's own sampling error.

    Args:
        base (`dict`): The base model's result.
        runs (`dict`): {(setting, seed): result}.
        settings (`list`): The points, each with `curve`, `knob`, `method`, `lr`, `gate_lr_ratio` and
            `gate_bottleneck_dim`.
        seeds (`list[int]`): The training seeds of every point.
        n_boot (`int`): Bootstrap resamples.
        boot_seed (`int`): Seed of the resampling.
    """
    points = []
    for s in settings:
        rs = [runs[(s, seed)] for seed in seeds]
        acc = [100 * r["target_acc"] for r in rs]
        cost = [relative_ppl_change(r, base) for r in rs]
        p = {"curve": s.curve, "knob": s.knob, "method": s.method, "lr": s.lr, "gate_lr_ratio": s.gate_lr_ratio}
        p.update(gate_bottleneck_dim=s.gate_bottleneck_dim, seeds=list(seeds), acc=acc, cost=cost)
        p["run"] = [s.method, s.lr, s.gate_lr_ratio, s.gate_bottleneck_dim]  # the same runs may be on two curves
        p["acc_mean"], p["acc_sd"] = _mean_sd(acc)
        p["cost_mean"], p["cost_sd"] = _mean_sd(cost)
        p["ppl_mean"] = {k: _mean_sd([r["ppl"][k] for r in rs])[0] for k in base["ppl"]}
        p["sentiment_mean"] = _mean_sd([100 * r["sentiment_acc"] for r in rs])[0]
        p["train_seconds_mean"] = _mean_sd([r.get("train_seconds", 0.0) for r in rs])[0]
        points.append(p)
    lora = [p for p in points if p["curve"] == "LoRA lr"]
    others = [p for p in points if p["curve"] != "LoRA lr"]
    lora_curve = [(p["acc_mean"], p["cost_mean"]) for p in lora]
    for p in others:
        p["lora_cost"] = interpolate_cost(lora_curve, p["acc_mean"])
        p["ratio"] = _ratio(p["cost_mean"], p["lora_cost"])
        p["cost_diff"] = None if p["lora_cost"] is None else p["cost_mean"] - p["lora_cost"]
        a, c = p["acc_mean"], p["cost_mean"]
        p["beaten_by"] = [q["knob"] for q in lora if q["acc_mean"] >= a and q["cost_mean"] <= c]
        p["beats"] = [q["knob"] for q in lora if a >= q["acc_mean"] and c <= q["cost_mean"]]
    n = len(seeds)
    n_problems = _per_problem(list(runs.values()))
    correct = {str(p["run"]): [runs[(s, seed)].get("correct") for seed in seeds] for s, p in zip(settings, points)}
    resampled = [name for name, on in (("test-problem", n_problems), ("seed", n > 1)) if on]
    n_boot = n_boot if resampled else 0
    draws = _bootstrap(points, lora, others, correct, n, n_problems, n_boot, boot_seed)
    for p in others:
        d = draws[id(p)]
        inside = sorted(r for r in d if r is not None)
        p["boot_inside"] = len(inside) / len(d) if d else None
        p["ratio_lo"] = p["ratio_hi"] = None
        if d and len(inside) >= MIN_INSIDE * len(d):
            p["ratio_lo"] = inside[round(0.05 * (len(inside) - 1))]
            p["ratio_hi"] = inside[round(0.95 * (len(inside) - 1))]
    front = pareto(lora_curve)  # the accuracies interpolate_cost covers
    acc_range = (front[0][0], front[-1][0]) if front else None
    n_test = base.get("n_problems") or 0
    acc = base["target_acc"] if not lora else max(p["acc_mean"] for p in lora) / 100
    return {
        "base": {"target_acc": 100 * base["target_acc"], "ppl": base["ppl"], "sentiment": 100 * base["sentiment_acc"]},
        "points": points,
        "lora_acc_range": acc_range,
        "n_seeds": n,
        "n_boot": n_boot,
        "n_test": n_test,
        # what the bootstrap resamples: the seeds, and the test problems where the runs carry per-problem results
        "resampled": resampled,
        # the test set's own sampling error of an accuracy near LoRA's best
        "acc_se": 100 * (acc * (1 - acc) / n_test) ** 0.5 if n_test else None,
    }


def _bootstrap(points, lora, others, correct, n, n_problems, n_boot, boot_seed) -> dict:
    """{id(point): [cost ratio to LoRA's interpolated cost, or None, per resample]} for the points of `others`."""
    rng = random.Random(boot_seed)
    draws = {id(p): [] for p in others}
    for _ in range(n_boot):
        counts = None
        if n_problems:  # one draw of the test problems for every run
            counts = [0] * n_problems
            for _ in range(n_problems):
                counts[rng.randrange(n_problems)] += 1
        means = {}
        for p in points:
            key = str(p["run"])
            if key in means:
                continue
            idx = [rng.randrange(n) for _ in range(n)] if n > 1 else [0]
            if counts is None:
                acc = [p["acc"][i] for i in idx]
            else:
                acc = [_resampled_acc(correct[key][i], counts, n_problems) for i in idx]
            means[key] = (sum(acc) / len(idx), sum(p["cost"][i] for i in idx) / len(idx))
        curve = [means[str(p["run"])] for p in lora]
        for p in others:
            a, c = means[str(p["run"])]
            draws[id(p)].append(_ratio(c, interpolate_cost(curve, a)))
    return draws
