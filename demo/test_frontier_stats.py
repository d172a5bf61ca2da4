"""The frontier's paired bootstrap (demo/frontier_stats.py): resampling the test problems, the same draw for every
run, widens the verdict's range by the test set's own sampling error, and the verdict says which resampling it used."""

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))

from frontier import LORA_LR, Setting
from frontier_stats import frontier_summary
from report import verdict_lines


N_PROBLEMS = 150


def _run(acc, cost, per_problem=True, last=False):
    """A run at `acc` (%) target accuracy and `cost` (%) perplexity change over the base's 10, right on the first
    problems of the test set (`last`: on the last ones)."""
    n_right = round(acc / 100 * N_PROBLEMS)
    res = {"target_acc": n_right / N_PROBLEMS, "ppl": {"a": 10 * (1 + cost / 100)}, "sentiment_acc": 0.5}
    if per_problem:
        correct = [1] * n_right + [0] * (N_PROBLEMS - n_right)
        res["correct"] = correct[::-1] if last else correct
    return res


def _summary(per_problem):
    lora = [Setting("LoRA lr", "lora", lr) for lr in (2.5e-4, 5e-4, 1e-3)]
    ref = Setting("DISeL gate lr ratio", "disel", LORA_LR, 5.0)
    points = [(10, 10), (20, 20), (30, 30), (20, 10)]
    runs = {}
    for s, (acc, cost) in zip([*lora, ref], points):
        for seed, spread in ((0, -0.5), (1, 0.5)):
            # DISeL right on other problems than LoRA: a paired draw moves their accuracies apart
            runs[(s, seed)] = _run(acc, cost + spread, per_problem, last=s is ref)
    base = {"target_acc": 0.0, "ppl": {"a": 10.0}, "sentiment_acc": 0.5, "n_problems": N_PROBLEMS}
    return frontier_summary(base, runs, [*lora, ref], [0, 1], n_boot=300)


def test_paired_bootstrap_over_problems_widens_the_range():
    seeds_only, paired = _summary(per_problem=False), _summary(per_problem=True)
    assert seeds_only["resampled"] == ["seed"] and paired["resampled"] == ["test-problem", "seed"]
    a, b = seeds_only["points"][3], paired["points"][3]
    assert a["ratio"] == b["ratio"] == pytest.approx(0.5)  # the point estimate does not depend on the resampling
    # with every seed at the same accuracy, only the problem draws move the accuracy, and with it LoRA's cost there
    assert b["ratio_hi"] - b["ratio_lo"] > 2 * (a["ratio_hi"] - a["ratio_lo"])
    assert b["ratio_lo"] < 0.5 < b["ratio_hi"]
    lines = verdict_lines(paired)
    assert "[5-95% over test-problem and seed resamples]" in lines[0]
    assert any(
        line.startswith("Uncertainty:") and "hold the fixed test set's own sampling error" in line for line in lines
    )
    assert "[5-95% over seed resamples]" in verdict_lines(seeds_only)[0]
