#!/usr/bin/env python
"""DISeL's overhead over LoRA (and DoRA): training-step and inference speed, peak memory, trainable parameters.

    .venv/bin/python bench/disel_overhead.py            # `make bench`: small Llama at r=16/64 and a 7B-shaped block
    .venv/bin/python bench/disel_overhead.py --quick    # `make bench-quick`: small Llama (fp32, 4-bit), fewer rounds
    .venv/bin/python bench/disel_overhead.py --decode-only --profile-decode   # decoding alone, with a profile

Everything is built from configs (no Hub access), fp32, `target_modules="all-linear"`, `lora_dropout=0`. It runs on
the first CUDA GPU when torch sees one, else on the CPU (`--device` chooses; the device is printed and is the first
field of the JSON line). On a GPU the clocks are read after `torch.cuda.synchronize`, memory is torch's peak allocation
on the GPU, and the one-thread tables are left out.

QLoRA: the small Llama is also saved to a temporary folder and loaded back in 4-bit through bitsandbytes (nf4, float32
compute, on the device: bitsandbytes' CPU or CUDA kernels), prepared with `prepare_model_for_kbit_training` (without gradient checkpointing, so that the time
is that of the adapters), and measured the same way: DISeL/LoRA train and inference time and peak memory on a 4-bit
base, on one thread (with two on a shared CPU, bitsandbytes' training step stalled ~10x longer at OpenMP barriers);
the quick run at r=16 with 128 tokens per sequence, the full run at r=16 and 64 as above. Skipped when bitsandbytes is
not installed.

Speed: all adapters of one model sit on the same base weights (one PEFT model, one adapter per variant and rank,
switched with `set_adapter`); "base" is an unwrapped copy of the base model. Each round times every variant once, in an
order rotated from round to round; the reported number for a variant is the median over rounds of its time divided by
LoRA's time at the same rank in the same round, with the interquartile range of those per-round ratios. A training step
is forward + backward + fused AdamW step (`fused=True`, as Trainer's default `adamw_torch_fused`) + zero_grad;
inference is a forward in `torch.inference_mode` and `eval()`. Besides the wall-clock ratio (the headline number), the
tables show the ratio of process CPU time, the ratio of the fastest rounds, and the ratio of matmul FLOPs.

On a machine shared with other jobs, every op that ATen parallelizes over the two threads (tensors of more than 32768
elements) can stall at OpenMP's barrier until the scheduler runs the other thread again, so wall time then counts
parallel ops more than FLOPs. The full run therefore also times the small model on one thread
(`torch.set_num_threads(1)`, CPU time): the intrinsic cost of each variant without those stalls.

Memory: one fresh process per variant (this script with `--mem-child`; see memory.py): "peak" is the RSS high-water
mark of two training steps minus the RSS of the loaded base model, i.e. adapter weights, gradients, AdamW state,
activations and temporaries. The ratio of whole-process peaks (which include the frozen weights and the Python/torch
runtime) is reported too.

Decoding: greedy `generate` with the KV cache (a 16-token prompt, then 32 new tokens, 64 in the full run; EOS
suppressed) on a 1024-wide 4-layer Llama with r=16 on all linear layers, at batch 1 and 8, on one thread on the CPU.
DISeL and LoRA run unmerged on the same base weights; LoRA merged into a copy of them is what LoRA users deploy. The
rounds are interleaved as above; `decode_bN` is DISeL / unmerged LoRA at batch N, `decode_merged_bN` DISeL / merged
LoRA. `--profile-decode` prints torch.profiler tables of one decoding step (batch 1) and the aten op calls each
variant adds per adapted layer.

The last line of output is one JSON object with the DISeL/LoRA ratios at equal rank.

The modules next to this script each do one job: models.py (shapes, adapters, the training step), rounds.py
(interleaved rounds and their ratios), memory.py, speed.py, decode.py and flops.py (parameter and FLOP formulas).
"""

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))

from decode import measure_decode
from device import DEVICE_HELP, describe, pick_device
from flops import param_table
from memory import MemoryJob, measure_memory, mem_child
from model import DemoError
from models import BLOCK, BOTTLENECK, SMALL, save_small_base
from speed import Bench, measure_speed, speed_table


NUM_THREADS = 2
# DISeL/LoRA at equal rank: what each ratio should stay under
GOALS = {
    "train_r16": 1.02,
    "train_r64": 1.05,
    "infer_r16": 1.01,
    "infer_r64": 1.04,
    "mem_r16": 1.03,
    "mem_r64": 1.03,
    "block4096_train_r16": 1.02,
    "block4096_infer_r16": 1.02,
    "decode_b1": 1.03,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model only, fewer rounds and variants")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement (default 9, quick 5)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables (LoRA vs DISeL)")
    parser.add_argument(
        "--profile-decode",
        action="store_true",
        help="also print torch.profiler tables of one decoding step (LoRA vs DISeL, batch 1) and the ops per layer",
    )
    parser.add_argument(
        "--decode-only", action="store_true", help="only the decoding measurement (and --profile-decode)"
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--mem-child", metavar="JOB", help=argparse.SUPPRESS)  # a memory.MemoryJob as JSON
    return parser.parse_args(argv)


def device_name(device) -> str:
    """The device for the JSON line: 'cpu', or e.g. 'cuda:0 (NVIDIA H200)'."""
    return "cpu" if device.type == "cpu" else describe(device)


def memory_section(variants, ranks, device, results):
    """Peak training memory of the small Llama, one process per variant and rank."""
    print("\nPeak training memory (2 steps, fresh process per variant; MiB over the loaded base model)")
    mem = {(v, r): measure_memory(MemoryJob(v, r), device) for r in ranks for v in variants}
    print(f"{'variant':<14}{'rank':>5}{'peak MiB':>10}{'/LoRA':>8}{'process MiB':>13}{'/LoRA':>8}")
    for (v, r), m in mem.items():
        ref = mem[("lora", r)]
        ratio, pratio = m["peak_kib"] / ref["peak_kib"], m["process_kib"] / ref["process_kib"]
        print(f"{v:<14}{r:>5}{m['peak_kib'] / 1024:>10.1f}{ratio:>8.3f}{m['process_kib'] / 1024:>13.1f}{pratio:>8.3f}")
        if v.startswith("disel"):
            tag = "" if v == "disel" else v[len("disel") :]
            results[f"mem{tag}_r{r}"] = round(ratio, 4)
            results[f"mem_process{tag}_r{r}"] = round(pratio, 4)


def small_section(args, variants, ranks, rounds, device, results):
    """Speed of the small Llama (and, in the full run on the CPU, on one thread), then the parameter table."""
    import torch

    bench = Bench(SMALL, variants, ranks, device)
    times = measure_speed(bench, rounds)
    speed_table("Small Llama (hidden 512, 4 layers), ratios to LoRA at the same rank", bench, times, results, "")
    if not args.quick and device.type == "cpu":
        # the same on one thread: no OpenMP barriers, so CPU time is the intrinsic cost of each variant
        torch.set_num_threads(1)
        times = measure_speed(bench, max(3, rounds - 2))
        speed_table("Small Llama on ONE thread (contention-free reference)", bench, times, results, "1thread_")
        torch.set_num_threads(NUM_THREADS)
    if args.profile:
        for r in ranks:
            bench.profile(r, "train")
    param_table(bench.model)
    del bench
    gc.collect()


def qlora_section(args, ranks, rounds, device, results):
    """The small model on a 4-bit base (QLoRA): speed interleaved as above, memory one process per variant.

    On one thread: with two on this shared CPU, a 4-bit training step stalled at OpenMP barriers ~10x longer; the quick
    run keeps to r=16 and sequences of 128 tokens."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        print("\n(4-bit base skipped: bitsandbytes is not installed)")
        return
    torch.set_num_threads(1)
    qlora_ranks = [16] if args.quick else ranks
    seq = 128 if args.quick else SMALL.seq
    with tempfile.TemporaryDirectory(prefix="disel-bench-") as folder:
        save_small_base(folder, device)
        mem4 = {
            (v, r): measure_memory(MemoryJob(v, r, base_4bit=folder, seq=seq), device)
            for r in qlora_ranks
            for v in ("lora", "disel")
        }
        bench = Bench(SMALL, ["lora", "disel"], qlora_ranks, device, base_4bit=folder, seq=seq)
        speed_table(
            f"Small Llama on a 4-bit base (bitsandbytes nf4, float32 compute), batch {SMALL.batch} x seq {seq}, "
            f"{'ONE thread' if device.type == 'cpu' else device}, ratios to LoRA at the same rank",
            bench,
            measure_speed(bench, rounds),
            results,
            "4bit_",
        )
        del bench
        gc.collect()
    torch.set_num_threads(NUM_THREADS)
    for r in qlora_ranks:
        m_lora, m_disel = mem4[("lora", r)], mem4[("disel", r)]
        results[f"4bit_mem_r{r}"] = round(m_disel["peak_kib"] / m_lora["peak_kib"], 4)
        results[f"4bit_mem_process_r{r}"] = round(m_disel["process_kib"] / m_lora["process_kib"], 4)
        print(
            f"4-bit base r={r}: DISeL/LoRA train {results[f'4bit_train_r{r}']:.3f}, infer "
            f"{results[f'4bit_infer_r{r}']:.3f}, peak training memory over the loaded base "
            f"{results[f'4bit_mem_r{r}']:.3f} (LoRA {m_lora['peak_kib'] / 1024:.1f} MiB, DISeL "
            f"{m_disel['peak_kib'] / 1024:.1f} MiB), whole process {results[f'4bit_mem_process_r{r}']:.3f}"
        )


def block_section(args, ranks, rounds, device, results):
    """Speed and memory of one Llama-2-7B-shaped block (the full run only)."""
    if args.quick:
        for key in ("block4096_train_r16", "block4096_infer_r16", "block4096_train_r64", "block4096_infer_r64"):
            results[key] = None
        return
    bench = Bench(BLOCK, ["lora", "dora", "disel"], ranks, device)
    speed_table(
        f"One Llama-2-7B-shaped block (hidden 4096, inter 11008, 32 heads), batch {BLOCK.batch} x seq {BLOCK.seq}",
        bench,
        measure_speed(bench, max(3, rounds - 2)),
        results,
        "block4096_",
    )
    if args.profile:
        bench.profile(16, "train")
    del bench
    gc.collect()
    m_lora, m_disel = (measure_memory(MemoryJob(v, 16, shape="block"), device) for v in ("lora", "disel"))
    results["block4096_mem_r16"] = round(m_disel["peak_kib"] / m_lora["peak_kib"], 4)
    results["block4096_mem_process_r16"] = round(m_disel["process_kib"] / m_lora["process_kib"], 4)
    print(
        f"\nBlock peak training memory r=16 over the loaded base: LoRA {m_lora['peak_kib'] / 1024:.1f} MiB, DISeL "
        f"{m_disel['peak_kib'] / 1024:.1f} MiB, ratio {results['block4096_mem_r16']:.3f} (mostly adapter weights and "
        f"AdamW state at 128 tokens); whole process {results['block4096_mem_process_r16']:.3f}"
    )


def print_goals(results):
    print("\nGoals (DISeL/LoRA at equal rank):")
    for key, goal in GOALS.items():
        value = results.get(key)
        verdict = "n/a" if value is None else ("met" if value <= goal else "NOT met")
        print(f"  {key:<22} {'-' if value is None else f'{value:.3f}':>7}  goal <= {goal:.2f}  {verdict}")


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
    except DemoError as e:
        raise SystemExit(f"bench failed: {e}") from None
    if args.mem_child:
        mem_child(MemoryJob(**json.loads(args.mem_child)), device)
        return

    import torch

    torch.set_num_threads(NUM_THREADS)
    t_start = time.perf_counter()
    rounds = args.rounds or (5 if args.quick else 9)
    new_tokens = 32 if args.quick else 64
    ranks = [16, 64]
    variants = ["lora", "disel"] if args.quick else ["lora", "dora", "disel", f"disel_b{BOTTLENECK}"]
    print(
        f"device {describe(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} "
        f"CPUs, fp32; {rounds} rounds; small Llama batch {SMALL.batch} x seq {SMALL.seq}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    results = {}
    if args.decode_only:
        measure_decode(device, rounds, new_tokens, results, profile=args.profile_decode)
        print(json.dumps({"device": device_name(device), **results}))
        return

    memory_section(variants, ranks, device, results)
    small_section(args, variants, ranks, rounds, device, results)
    measure_decode(device, rounds, new_tokens, results, profile=args.profile_decode)
    qlora_section(args, ranks, rounds, device, results)
    block_section(args, ranks, rounds, device, results)
    print_goals(results)
    print(
        f"\n(total {time.perf_counter() - t_start:.0f} s on {describe(device)}, load average now "
        f"{os.getloadavg()[0]:.1f})"
    )
    ordered = {"device": device_name(device), **{k: results.get(k) for k in GOALS}}
    ordered.update({k: v for k, v in sorted(results.items()) if k not in ordered})
    print(json.dumps(ordered))


if __name__ == "__main__":
    main()
