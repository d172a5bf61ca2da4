#!/usr/bin/env python3
"""The gain-versus-retention frontier of DISeL and LoRA (`make frontier`).

A single fine-tuning run per method cannot show DISeL's promise: LoRA at a lower learning rate also forgets less, and
gains less. Here each method traces its own trade-off curve with its own knob, on the demo's model, task and
retention metrics (the evaluation sets of `make demo`), at several seeds:

- LoRA at several learning rates (too little to too much adaptation),
- DISeL at several gate learning-rate ratios at LoRA's default learning rate (the paper's main knob), and the paper's
  default ratio (5) at the other LoRA learning rates,
- DISeL with a bottleneck gate (`gate_bottleneck_dim=8`, or half the rank below r=16) and DoRA, one point each.

The seed changes the adapter init and the order of the training problems; the evaluation sets stay the same. Every
run is cached under `--out`/runs/ by a hash of its settings, so a rerun resumes and a changed setting reruns only what
it changes; the base model is evaluated once. Runs go to `--workers` processes of one torch thread each, on the device
of `--device` (the first CUDA GPU when torch sees one, else the CPU; a run on an accelerator is cached apart from one
on the CPU).

Outputs under `--out` (default build/frontier/): frontier.png (target accuracy vs retention cost, mean over seeds with
error bars), frontier.md (the table and the verdict), frontier.json (every run and the summary); with --quick or
--large they are named frontier-quick.* or frontier-large.*, next to the default's. The verdict is
computed from the runs: at DISeL's target accuracy, its retention cost as a fraction of LoRA's, interpolated along
LoRA's curve, with a bootstrap interval over seeds.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import time
import traceback
import types
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from data import DataError, build_data  # noqa: E402
from device import DEVICE_HELP, describe, pick_device  # noqa: E402
from model import DEFAULT_MODEL, DemoError, load_model, resolve_model  # noqa: E402
from report import write_json  # noqa: E402
from settings import DataConfig, EvalConfig, TrainConfig, add_arguments, from_args  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


# a run's cache key holds its settings, the library versions and a hash of the demo modules a run executes
# (`_code_hash`); bump CACHE_VERSION when something else changes results
CACHE_VERSION = 1
LORA_LR = TrainConfig.lr  # the demo's LoRA learning rate, the one DISeL's gate ratios are traced at
# the demo's: the training pool excludes the validation and test problems, so it depends on their number
N_VAL = DataConfig.n_val
# the settings the budget or a point of a curve sets, not the command line
PER_RUN = ("steps", "lr", "gate_lr_ratio", "seed", "gradient_checkpointing")


@dataclass(frozen=True)
class Setting:
    """One point of a curve (trained once per seed). `curve` names the curve it belongs to, `knob` its value there."""

    curve: str
    method: str
    lr: float
    gate_lr_ratio: float | None = None
    gate_bottleneck_dim: int | None = None

    @property
    def knob(self) -> str:
        if self.curve == "DISeL gate lr ratio":
            return f"x{self.gate_lr_ratio:g}"
        if self.gate_bottleneck_dim:
            return f"dim {self.gate_bottleneck_dim}"
        return f"lr {self.lr:g}"


BUDGETS = {
    # 77 min measured on a 2-core CPU with 2 workers
    "default": {
        "steps": 80,
        "seeds": 2,
        "n_test": 150,
        "lora_lrs": (2.5e-4, 5e-4, 1e-3, 2e-3),
        "gate_ratios": (1, 2, 5, 10),
        "disel_lrs": (5e-4, 2e-3),
        "extras": True,
    },
    # a first look (11 min measured on 2 cores): fewer points, fewer steps and test problems, one seed
    "quick": {
        "steps": 40,
        "seeds": 1,
        "n_test": 100,
        "lora_lrs": (5e-4, 1e-3, 2e-3),
        "gate_ratios": (1, 5, 10),
        "disel_lrs": (),
        "extras": False,
    },
    # more seeds and steps, a wider LoRA range (hours on a CPU)
    "large": {
        "steps": 160,
        "seeds": 4,
        "n_test": 150,
        "lora_lrs": (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3),
        "gate_ratios": (1, 2, 5, 10, 20),
        "disel_lrs": (2.5e-4, 5e-4, 2e-3, 4e-3),
        "extras": True,
    },
}


def settings_for(budget: dict, rank: int = 8) -> list[Setting]:
    out = [Setting("LoRA lr", "lora", lr) for lr in budget["lora_lrs"]]
    out += [Setting("DISeL gate lr ratio", "disel", LORA_LR, float(g)) for g in budget["gate_ratios"]]
    # the paper's default at LoRA's other learning rates; its run at LORA_LR is the ratio curve's x5 point, cached once
    lrs = sorted({*budget["disel_lrs"], LORA_LR}) if budget["disel_lrs"] else ()
    out += [Setting("DISeL x5 lr", "disel", lr, 5.0) for lr in lrs]
    if budget["extras"] and rank >= 2:
        out += [
            # the cheap gate: 8 dimensions, or half the rank below r=16 (a bottleneck must be smaller than r)
            Setting("DISeL bottleneck gate", "disel", LORA_LR, 5.0, gate_bottleneck_dim=min(8, rank // 2)),
            Setting("DoRA", "dora", LORA_LR),
        ]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller frontier (fewer points and steps, one seed)")
    size.add_argument("--large", action="store_true", help="a larger budget: 4 seeds, 160 steps, more points")
    p.add_argument("--model", default=DEFAULT_MODEL, help="'smollm2' (default, offline) or any HF model id or path")
    p.add_argument("--out", default=str(ROOT / "build" / "frontier"), help="results, plot and the per-run cache")
    p.add_argument("--cache", default=str(ROOT / "build" / "demo"), help="the demo's model and data caches")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per point (overrides the budget)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (overrides the budget)")
    p.add_argument("--n-test", type=int, default=None, help="test problems (overrides the budget)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel runs, one torch thread each (default: cores, at most 8; on an accelerator 1)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples over seeds for the verdict")
    p.add_argument("--no-plots", action="store_true")
    # the demo's settings, the same for every run
    add_arguments(p, TrainConfig, skip=PER_RUN)
    add_arguments(p, DataConfig, skip=("n_val", "n_test"))
    add_arguments(p, EvalConfig)
    args = p.parse_args(argv)
    budget = dict(BUDGETS["quick" if args.quick else "large" if args.large else "default"])
    for key in ("seeds", "steps", "n_test"):
        if getattr(args, key) is not None:
            budget[key] = getattr(args, key)
    args.budget_name = "quick" if args.quick else "large" if args.large else "default"
    args.budget = budget
    return args


def log(msg):
    print(msg, flush=True)


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _code_hash() -> str:
    """A hash of the demo modules a run executes: those `run_job` calls into, and the demo modules they import from."""
    import data
    import evaluate
    import model
    import train

    files, todo = set(), [data, evaluate, model, train]
    while todo:
        module = todo.pop()
        path = Path(getattr(module, "__file__", None) or "/")
        if path.parent != HERE or path in files:
            continue
        files.add(path)
        for value in vars(module).values():
            todo.append(
                value if isinstance(value, types.ModuleType) else sys.modules.get(getattr(value, "__module__", ""))
            )
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(files))).hexdigest()[:12]


def _versions() -> dict:
    from importlib.metadata import version

    return {"code": _code_hash(), **{pkg: version(pkg) for pkg in ("peft", "torch", "transformers")}}


def _default_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8)


class Frontier:
    """The runs of one frontier: their settings, cache files and execution."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.runs_dir = self.out / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        cache = Path(args.cache)
        self.model_path = resolve_model(args.model, cache / "smollm2", log=log)
        self.device = pick_device(args.device)
        # the workers' device (on the CPU they run one torch thread each, whatever this process has)
        self.device_label = "cpu" if self.device.type == "cpu" else describe(self.device)
        # the runs share one accelerator; on the CPU they share its cores
        self.workers = args.workers or (_default_workers() if self.device.type == "cpu" else 1)
        self.data_spec = {
            "data_seed": args.data_seed,
            "n_train": args.n_train,
            "n_val": N_VAL,
            "n_test": args.budget["n_test"],
            "n_sentiment": args.n_sentiment,
        }
        # what the evaluation of every run, the base model's included, depends on
        self.eval_spec = {
            "model": args.model if args.model == DEFAULT_MODEL else self.model_path,  # the default's path is local
            **{k: v for k, v in self.data_spec.items() if k not in ("n_train", "n_val")},  # the test sets' draw
            "ppl_chunks": args.ppl_chunks,
            "ppl_seq_len": args.ppl_seq_len,
            "eval_batch_size": args.eval_batch_size,  # batched greedy decoding with left padding can flip answers
            "versions": _versions(),
            "cache_version": CACHE_VERSION,
        }
        if self.device.type != "cpu":  # other kernels, other rounding: not the CPU's cached runs (whose keys stay)
            self.eval_spec["device"] = self.device.type
        load_data(cache, self.data_spec)  # extracts the data once, before the workers read them

    def train_config(self, setting: Setting, seed: int):
        cfg = from_args(TrainConfig, self.args, steps=self.args.budget["steps"], lr=setting.lr, seed=seed)
        if setting.method == "disel":
            cfg = replace(cfg, gate_lr_ratio=setting.gate_lr_ratio, gate_bottleneck_dim=setting.gate_bottleneck_dim)
        return cfg

    def job(self, setting: Setting | None, seed: int | None) -> dict:
        """What a run needs (sent to a worker) and where its result is cached; `setting=None` is the base model."""
        if setting is None:
            spec = {"eval": self.eval_spec}
            name = "base"
        else:
            cfg = asdict(self.train_config(setting, seed))
            if setting.method != "disel":  # the gate fields do not change a LoRA or DoRA run
                cfg = {k: v for k, v in cfg.items() if not k.startswith("gate_")}
            pool = {"n_train": self.data_spec["n_train"], "n_val": self.data_spec["n_val"]}  # the training problems
            spec = {"eval": self.eval_spec, "pool": pool, "method": setting.method, "train": cfg}
            name = f"{setting.method}-lr{setting.lr:g}"
            if setting.method == "disel":
                name += f"-g{setting.gate_lr_ratio:g}" + (
                    f"-b{setting.gate_bottleneck_dim}" if setting.gate_bottleneck_dim else ""
                )
            name += f"-s{seed}"
        path = self.runs_dir / f"{name}-{_key(spec)}.json"
        return {
            "spec": spec,
            "path": str(path),
            "name": name,
            "model_path": self.model_path,
            "device": str(self.device),
            "cache": self.args.cache,
            "data": self.data_spec,
        }

    def run_all(self, jobs: list[dict]) -> dict:
        """Run the jobs without a cached result (each once, however many curves share it); return {path: result}."""
        results, todo = {}, {}
        for job in jobs:
            path = Path(job["path"])
            if path.exists():
                results[job["path"]] = json.loads(path.read_text())
            else:
                todo[job["path"]] = job
        n_runs = len(results) + len(todo)
        log(f"{n_runs} runs: {len(results)} cached in {self.runs_dir}, {len(todo)} to run")
        if not todo:
            return results
        workers = max(1, min(self.workers, len(todo)))
        bar = tqdm(total=len(todo), desc=f"frontier ({workers} worker(s))", unit="run")
        failed = []

        def done(job, run):
            try:
                results[job["path"]] = run()
                tqdm.write(f"  {job['name']}: {_summary(results[job['path']])}")
            except Exception as e:  # noqa: BLE001  (the other runs go on; the finished ones are cached)
                failed.append(f"{job['name']}: {type(e).__name__}: {e} (log: {Path(job['path']).with_suffix('.log')})")
                tqdm.write(f"  failed: {failed[-1]}")
            bar.update(1)

        try:
            if workers == 1:
                for job in todo.values():
                    done(job, lambda job=job: run_job_logged(job))
            else:
                ctx = multiprocessing.get_context("spawn")
                pool = ProcessPoolExecutor(workers, mp_context=ctx)
                try:
                    futures = {pool.submit(run_job_logged, job): job for job in todo.values()}
                    for fut in as_completed(futures):
                        done(futures[fut], fut.result)
                finally:  # on Ctrl-C too: drop the queued runs rather than waiting for them
                    pool.shutdown(wait=False, cancel_futures=True)
        finally:
            bar.close()
        if failed:
            raise DemoError(f"{len(failed)} run(s) failed; the others are cached:\n" + "\n".join(failed))
        return results


def load_data(cache: Path, d: dict):
    """The demo's data sets (extracted into the cache the first time)."""
    counts = (d["n_train"], d["n_val"], d["n_test"], d["n_sentiment"])
    return build_data(Path(cache) / "data", Path(cache) / "downloads", *counts, d["data_seed"], log=log)


def _summary(res: dict) -> str:
    ppl = ", ".join(f"{k} {v:.2f}" for k, v in res["ppl"].items())
    return f"acc {res['target_acc']:.3f} | ppl {ppl} | {res['wall_seconds']:.0f} s"


def run_job_logged(job: dict) -> dict:
    """`run_job` with its output (progress bars, warnings, a traceback) in the run's log file, next to its result.

    Redirected at the file descriptors: loggers created by an earlier run of the same worker keep their stream."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(Path(job["path"]).with_suffix(".log"), "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            return run_job(job)
        except Exception:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def run_job(job: dict) -> dict:
    """Train (unless it is the base model) and evaluate one run; its result is written to the job's cache file."""
    import torch
    from evaluate import evaluate_model, text_chunks
    from train import train

    torch.set_num_threads(1)
    t0 = time.time()
    spec = job["spec"]
    ev = spec["eval"]
    data = load_data(job["cache"], job["data"])
    model, tokenizer = load_model(job["model_path"], device=job["device"])
    chunks = {
        k: text_chunks(tokenizer, v, ev["ppl_seq_len"], ev["ppl_chunks"]) for k, v in data.retention_eval.items()
    }
    info = {}
    if "train" in spec:
        cfg = TrainConfig(**spec["train"])
        model, info = train(model, tokenizer, data.train, spec["method"], cfg)
        info.pop("losses")
    res = evaluate_model(model, tokenizer, data.test, chunks, data.sentiment, ev["eval_batch_size"])
    res.update(info)
    res.update(spec=spec, wall_seconds=time.time() - t0)
    write_json(Path(job["path"]), res)
    return res


def run(args) -> int:
    from frontier_stats import frontier_summary
    from report import frontier_table, plot_frontier, verdict_lines

    t_start = time.time()
    budget = args.budget
    fr = Frontier(args)
    stem = "frontier" if args.budget_name == "default" else f"frontier-{args.budget_name}"
    settings = settings_for(budget, args.rank)
    seeds = list(range(budget["seeds"]))
    base_job = fr.job(None, None)
    jobs = {(s, seed): fr.job(s, seed) for s in settings for seed in seeds}
    log(
        f"frontier ({args.budget_name} budget): {len(settings)} points x {len(seeds)} seed(s), "
        f"{budget['steps']} steps x {args.batch_size}, r={args.rank}, {budget['n_test']} test problems; model {args.model}; "
        f"device {fr.device_label}, {fr.workers} worker(s)"
    )
    done = fr.run_all([base_job, *jobs.values()])
    base = done[base_job["path"]]
    runs = {(s, seed): done[job["path"]] for (s, seed), job in jobs.items()}
    summary = frontier_summary(base, runs, settings, seeds, n_boot=args.bootstrap)
    lines = verdict_lines(summary)
    tbl = frontier_table(summary)
    wall = time.time() - t_start
    png = None
    if not args.no_plots:
        png = plot_frontier(
            summary,
            str(fr.out / f"{stem}.png"),
            title=(
                f"{args.model}: {budget['steps']} steps x {args.batch_size}, r={args.rank}, {len(seeds)} seed(s) per "
                f"point, {budget['n_test']} test problems"
            ),
        )
    run_seconds = sum(r["wall_seconds"] for r in done.values())
    report = {
        "budget": {"name": args.budget_name, **budget},
        "args": {k: v for k, v in vars(args).items() if k != "budget"},
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "workers": fr.workers,
            "device": fr.device_label,
        },
        "wall_seconds": wall,
        "run_seconds": run_seconds,
        "summary": summary,
        "verdict": lines,
        "plot": png,
        "runs": [{"setting": asdict(s), "seed": seed, **r} for (s, seed), r in runs.items()],
        "base": base,
    }
    (fr.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    timing = (
        f"{len(done)} runs (base model included), {run_seconds / 60:.0f} min of run time summed over them; this "
        f"invocation: {wall:.0f} s wall with {fr.workers} worker(s) on {fr.device} (cached runs are not rerun)"
    )
    md = [tbl, "", *[f"- {line}" for line in lines], "", timing]
    (fr.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    log("")
    log(tbl)
    log("")
    for line in lines:
        log(line)
    log("")
    log(f"{timing}; {fr.out / (stem + '.md')}, {fr.out / (stem + '.json')}")
    if png:
        log(f"frontier plot: {png}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model == DEFAULT_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"\nfrontier interrupted; finished runs are cached in {Path(args.out) / 'runs'}", file=sys.stderr)
        return 130
    except (DemoError, DataError) as e:
        print(f"\nfrontier failed: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
