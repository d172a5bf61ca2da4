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

Memory: one fresh process per variant (this script with `--mem-child`), with glibc's mmap threshold pinned
(`MALLOC_MMAP_THRESHOLD_=65536`) so that freed tensors go back to the OS at once and the resident set size follows the
live tensors. The process builds the base model, reads its RSS, resets the kernel's RSS high-water mark
(`/proc/self/clear_refs`), adds one adapter and runs two training steps (one thread); "peak" is the high-water mark
minus the RSS of the loaded base model, i.e. adapter weights, gradients, AdamW state, activations and temporaries. The
ratio of whole-process peaks (which include the frozen weights and the Python/torch runtime) is reported too.

Decoding: greedy `generate` with the KV cache (a 16-token prompt, then 32 new tokens, 64 in the full run; EOS
suppressed) on a 1024-wide 4-layer Llama with r=16 on all linear layers, at batch 1 and 8, on one thread on the CPU.
DISeL and LoRA run unmerged on the same base weights; LoRA merged into a copy of them is what LoRA users deploy. The
rounds are interleaved as above; `decode_bN` is DISeL / unmerged LoRA at batch N, `decode_merged_bN` DISeL / merged
LoRA. `--profile-decode` prints torch.profiler tables of one decoding step (batch 1) and the aten op calls each
variant adds per adapted layer.

The last line of output is one JSON object with the DISeL/LoRA ratios at equal rank.
"""

import argparse
import copy
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))

from device import DEVICE_HELP, describe, pick_device, synchronize
from model import DemoError


NUM_THREADS = 2
SMALL = {
    "hidden_size": 512,
    # a multiple of 64: bitsandbytes' 4-bit inference on CPUs with AVX512-BF16 repacks the weights in blocks of 64
    # input features, and fails on a width that is not one
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "vocab_size": 8000,
}
# one Llama-2-7B decoder layer; a tiny vocabulary so that the block dominates
BLOCK = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 1,
    "num_attention_heads": 32,
    "vocab_size": 32,
}
# decoding: the width at which DISeL's per-layer ops show next to the GEMMs at batch 1
DECODE = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "vocab_size": 8000,
}
DECODE_RANK, DECODE_PROMPT, DECODE_BATCHES = 16, 16, (1, 8)
SMALL_BATCH, SMALL_SEQ = 4, 256
BLOCK_BATCH, BLOCK_SEQ = 1, 128
BOTTLENECK = 8
# the device everything runs on (--device; main sets it, and hands it to the memory processes)
DEVICE = None


def import_torch(threads=None):
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch


def lora_config(variant: str, r: int):
    from peft import DiselConfig, LoraConfig

    kwargs = {"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear", "lora_dropout": 0.0}
    if variant == "dora":
        kwargs["use_dora"] = True
    elif variant == "disel":
        kwargs["use_disel"] = True
    elif variant == f"disel_b{BOTTLENECK}":
        kwargs["use_disel"] = DiselConfig(gate_bottleneck_dim=BOTTLENECK)
    elif variant != "lora":
        raise ValueError(variant)
    return LoraConfig(**kwargs)


def build_base(shape: dict, seed: int = 0, use_cache: bool = False):
    """The model of `shape` in float32 on DEVICE (random weights, the same for the same seed)."""
    torch = import_torch()
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, attn_implementation="sdpa", use_cache=use_cache)
    # the 7B block has no LM head: its loss is a function of the hidden states
    model = (LlamaModel if shape is BLOCK else LlamaForCausalLM)(config)
    return model.float().to(DEVICE)


def save_small_base(folder: str) -> str:
    """The small Llama (float32, same seed as `build_base`) saved to `folder`, to be loaded back in 4-bit."""
    build_base(SMALL).save_pretrained(folder)
    return folder


def load_4bit(folder: str):
    """The saved small Llama loaded in 4-bit (nf4, float32 compute) on DEVICE and prepared for k-bit training."""
    torch = import_torch()
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from peft import prepare_model_for_kbit_training

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    # bitsandbytes quantizes the weights where device_map places them: its CPU or its CUDA kernels
    device_map = "cpu" if DEVICE.type == "cpu" else {"": DEVICE.index or 0}
    model = LlamaForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map=device_map, dtype=torch.float32, attn_implementation="sdpa"
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def make_optimizer(params):
    torch = import_torch()
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except RuntimeError:  # a torch without the fused CPU kernel
        return torch.optim.AdamW(params, lr=1e-5)


def batch_for(shape: dict, seq: int | None = None):
    """Random token ids for `shape`; `seq` overrides the sequence length of the small model."""
    torch = import_torch()
    gen = torch.Generator().manual_seed(1)
    batch, seq = (BLOCK_BATCH, BLOCK_SEQ) if shape is BLOCK else (SMALL_BATCH, seq or SMALL_SEQ)
    return torch.randint(0, shape["vocab_size"], (batch, seq), generator=gen).to(DEVICE)


def loss_of(model, ids, shape):
    if shape is BLOCK:
        return model(input_ids=ids).last_hidden_state.pow(2).mean()
    return model(input_ids=ids, labels=ids).loss


def train_step(model, optimizer, ids, shape):
    loss_of(model, ids, shape).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


# --- memory: one process per variant ----------------------------------------------------------------------------


def mem_child(variant: str, r: int, shape_name: str) -> None:
    torch = import_torch(1)  # memory does not depend on it; one thread is faster on a busy machine
    from peft import get_peft_model

    seq = None
    if shape_name.startswith("4bit:"):  # "4bit:<sequence length>:<folder of the saved small Llama>"
        _, seq, folder = shape_name.split(":", 2)
        shape, model, seq = SMALL, load_4bit(folder), int(seq)
    else:
        shape = BLOCK if shape_name == "block" else SMALL
        model = build_base(shape)
    ids = batch_for(shape, seq)
    gc.collect()
    base_rss = rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    if DEVICE.type == "cuda":  # on a GPU: torch's allocations there (the host's RSS holds only the runtime)
        torch.cuda.synchronize(DEVICE)
        base_rss = torch.cuda.memory_allocated(DEVICE) // 1024
        torch.cuda.reset_peak_memory_stats(DEVICE)
    if variant != "base":
        model = get_peft_model(model, lora_config(variant, r))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params) if params else None
    model.train()
    for _ in range(2):
        if optimizer is None:
            with torch.no_grad():
                loss_of(model, ids, shape)
        else:
            train_step(model, optimizer, ids, shape)
    process = rss_kib("VmHWM") if DEVICE.type != "cuda" else torch.cuda.max_memory_allocated(DEVICE) // 1024
    print(json.dumps({"peak_kib": process - base_rss, "process_kib": process}))


def measure_memory(variant: str, r: int, shape_name: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--device",
        str(DEVICE),
        "--mem-child",
        variant,
        str(r),
        shape_name,
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- speed: interleaved rounds --------------------------------------------------------------------------------------


class Bench:
    """One base model and a PEFT model carrying one adapter per (variant, rank) on a copy of the same base weights.

    With `base_4bit` (the folder of the saved small Llama), both are that model loaded in 4-bit.
    """

    def __init__(self, shape: dict, variants: list, ranks: list, base_4bit: str | None = None, seq: int | None = None):
        torch = import_torch()
        from peft import get_peft_model

        self.torch, self.shape, self.ranks = torch, shape, ranks
        self.base = build_base(shape) if base_4bit is None else load_4bit(base_4bit)
        self.base.requires_grad_(False)
        self.ids = batch_for(shape, seq)
        names = [(v, r) for r in ranks for v in variants]
        self.names = names
        model = None
        for v, r in names:
            name = f"{v}_r{r}"
            if model is None:
                # a 4-bit model is loaded a second time rather than deep-copied
                base = copy.deepcopy(self.base) if base_4bit is None else load_4bit(base_4bit)
                model = get_peft_model(base, lora_config(v, r), adapter_name=name)
            else:
                model.add_adapter(name, lora_config(v, r))
        self.model = model
        self.optimizers = {}
        for v, r in names:
            self.activate(v, r)
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizers[(v, r)] = make_optimizer(params)

    def activate(self, v, r):
        self.model.base_model.set_adapter(f"{v}_r{r}")

    def run(self, v, r, mode: str, steps: int) -> tuple:
        """(wall seconds, process CPU seconds) per step."""
        torch = self.torch
        model = self.base if v == "base" else self.model
        if v != "base":
            self.activate(v, r)
        synchronize(DEVICE)
        if mode == "train":
            model.train()
            opt = self.optimizers[(v, r)]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                train_step(model, opt, self.ids, self.shape)
        else:
            model.eval()
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                for _ in range(steps):
                    model(input_ids=self.ids)
        synchronize(DEVICE)
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    def rounds(self, mode: str, rounds: int, steps: int) -> tuple:
        """Two dicts {(variant, rank): [seconds per step, one per round]}, wall and CPU; order rotated each round."""
        entries = list(self.names)
        if mode == "infer":
            entries = [("base", 0)] + entries
        for v, r in entries:  # warm-up, also creates the AdamW state
            self.run(v, r, mode, 1)
        wall, cpu = {e: [] for e in entries}, {e: [] for e in entries}
        for i in range(rounds):
            k = i % len(entries)
            for e in entries[k:] + entries[:k]:
                w, c = self.run(*e, mode, steps)
                wall[e].append(w)
                cpu[e].append(c)
        return wall, cpu


def quantiles(values):
    values = sorted(values)
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def ratio_stats(times, e, ref):
    return quantiles([a / b for a, b in zip(times[e], times[ref])])


def speed_table(title, bench, times_by_mode, results, prefix):
    print(f"\n{title}")
    print(
        f"{'variant':<14}{'rank':>5}  {'mode':<6}{'ms/step':>9}  {'/LoRA wall':>10} {'(IQR)':>16}  {'/LoRA CPU':>9}"
        f" {'(IQR)':>16}  {'min/min':>7}  {'FLOPs':>6}"
    )
    for mode, (wall, cpu) in times_by_mode.items():
        for v, r in wall:
            ms = statistics.median(wall[(v, r)]) * 1e3
            for ref_r in [r] if v != "base" else bench.ranks:
                q1, med, q3 = ratio_stats(wall, (v, r), ("lora", ref_r))
                c1, cmed, c3 = ratio_stats(cpu, (v, r), ("lora", ref_r))
                best = min(wall[(v, r)]) / min(wall[("lora", ref_r)])
                rank = f"{ref_r}" if v != "base" else f"({ref_r})"
                flops = ""
                if v.startswith("disel"):
                    bottleneck = BOTTLENECK if v != "disel" else None
                    flops = f"{flop_ratios(bench.shape, r, bottleneck)[0 if mode == 'train' else 1]:.3f}"
                print(
                    f"{v:<14}{rank:>5}  {mode:<6}{ms:>9.0f}  {med:>10.3f} [{q1:.3f}, {q3:.3f}]  {cmed:>9.3f}"
                    f" [{c1:.3f}, {c3:.3f}]  {best:>7.3f}  {flops:>6}"
                )
                if v.startswith("disel"):
                    tag = "" if v == "disel" else v[len("disel") :]
                    results[f"{prefix}{mode}{tag}_r{ref_r}"] = round(med, 4)
                    results[f"cpu_{prefix}{mode}{tag}_r{ref_r}"] = round(cmed, 4)
                    results[f"min_{prefix}{mode}{tag}_r{ref_r}"] = round(best, 4)
    print(
        "(/LoRA: median over rounds of the per-round ratio, [IQR]; min/min: ratio of the fastest rounds, the least "
        "disturbed by other jobs; FLOPs: DISeL/LoRA matmul FLOPs per token, the floor for compute-bound time)"
    )


# --- decoding: greedy generate with the KV cache ----------------------------------------------------------------


class DecodeBench:
    """Greedy `generate` with the KV cache on the DECODE model: LoRA and DISeL unmerged (one PEFT model carrying both,
    switched with `set_adapter`, on the same base weights), and LoRA merged into a copy of the base weights (a plain
    model, what LoRA users deploy), at rank DECODE_RANK on all linear layers.

    A timing is one `generate` call (the prompt's prefill, then `new_tokens` decoding steps, exactly: EOS is
    suppressed), divided by `new_tokens`.
    """

    VARIANTS = ("lora", "disel", "lora_merged")

    def __init__(self, new_tokens: int):
        torch = import_torch()
        from peft import get_peft_model

        self.torch, self.new_tokens = torch, new_tokens
        base = build_base(DECODE, use_cache=True).requires_grad_(False)
        merged = get_peft_model(copy.deepcopy(base), lora_config("lora", DECODE_RANK))
        with torch.no_grad():  # a trained-looking B, so that merging changes the weights (the time does not care)
            for name, param in merged.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.01)
        self.merged = merged.merge_and_unload().eval()
        # adapter names without "lora_", which PEFT warns about
        model = get_peft_model(base, lora_config("lora", DECODE_RANK), adapter_name="lora-unmerged")
        model.add_adapter("disel", lora_config("disel", DECODE_RANK))
        self.model = model.eval()
        self.n_adapted = sum(1 for m in model.modules() if hasattr(m, "lora_A") and "disel" in m.lora_A)
        gen = torch.Generator().manual_seed(2)
        self.prompts = {
            b: torch.randint(0, DECODE["vocab_size"], (b, DECODE_PROMPT), generator=gen).to(DEVICE)
            for b in DECODE_BATCHES
        }

    def model_for(self, variant):
        if variant == "lora_merged":
            return self.merged
        self.model.base_model.set_adapter("lora-unmerged" if variant == "lora" else variant)
        return self.model

    def run(self, variant: str, batch: int) -> tuple:
        """(wall, process CPU) seconds per generated token of one greedy `generate` call."""
        model, ids = self.model_for(variant), self.prompts[batch]
        n = self.new_tokens
        synchronize(DEVICE)
        t0, c0 = time.perf_counter(), time.process_time()
        with self.torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=self.torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        synchronize(DEVICE)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if out.shape[1] != ids.shape[1] + n:
            raise AssertionError(f"{variant}: generated {out.shape[1] - ids.shape[1]} tokens, expected {n}")
        return wall / n, cpu / n

    def rounds(self, rounds: int) -> tuple:
        """Two dicts {(variant, batch): [seconds per token, one per round]}, wall and CPU; every entry once per round,
        in an order rotated from round to round."""
        entries = [(v, b) for b in DECODE_BATCHES for v in self.VARIANTS]
        for e in entries:  # warm-up
            self.run(*e)
        wall, cpu = {e: [] for e in entries}, {e: [] for e in entries}
        for i in range(rounds):
            k = i % len(entries)
            for e in entries[k:] + entries[:k]:
                w, c = self.run(*e)
                wall[e].append(w)
                cpu[e].append(c)
        return wall, cpu

    def one_step(self, variant: str, batch: int = 1):
        """A callable that runs one decoding step (one new token, with the KV cache of the prompt) of `variant`."""
        torch = self.torch
        model, ids = self.model_for(variant), self.prompts[batch]
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)

        def step():
            # the cache grows by one position per call, as it does in generate
            with torch.inference_mode():
                model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            synchronize(DEVICE)

        return step


def decode_table(bench: DecodeBench, times: tuple, results: dict) -> None:
    wall, cpu = times
    print(
        f"\nDecoding: greedy generate with the KV cache, {DECODE['hidden_size']}-wide {DECODE['num_hidden_layers']}-layer "
        f"Llama, r={DECODE_RANK} on all linear layers ({bench.n_adapted} adapted), prompt {DECODE_PROMPT} + "
        f"{bench.new_tokens} new tokens, on {describe(DEVICE)}; ratios: median over rounds of the per-round ratio [IQR]"
    )
    print(
        f"{'batch':>5}  {'variant':<12}{'ms/token':>9}  {'/LoRA unmerged':>14} {'(IQR)':>16}  {'CPU':>6}  "
        f"{'min/min':>7}  {'/LoRA merged':>12} {'(IQR)':>16}  {'CPU':>6}"
    )
    for b in DECODE_BATCHES:
        for v in DecodeBench.VARIANTS:
            ms = statistics.median(wall[(v, b)]) * 1e3
            q1, med, q3 = ratio_stats(wall, (v, b), ("lora", b))
            m1, mmed, m3 = ratio_stats(wall, (v, b), ("lora_merged", b))
            cmed, cmerged = (ratio_stats(cpu, (v, b), (ref, b))[1] for ref in ("lora", "lora_merged"))
            best = min(wall[(v, b)]) / min(wall[("lora", b)])
            print(
                f"{b:>5}  {v:<12}{ms:>9.2f}  {med:>14.3f} [{q1:.3f}, {q3:.3f}]  {cmed:>6.3f}  {best:>7.3f}  {mmed:>12.3f} "
                f"[{m1:.3f}, {m3:.3f}]  {cmerged:>6.3f}"
            )
            if v == "disel":
                results[f"decode_b{b}"] = round(med, 4)
                results[f"cpu_decode_b{b}"] = round(cmed, 4)
                results[f"min_decode_b{b}"] = round(best, 4)
            if v in ("disel", "lora"):
                tag = "" if v == "disel" else "_lora"
                results[f"decode{tag}_merged_b{b}"] = round(mmed, 4)
                results[f"cpu_decode{tag}_merged_b{b}"] = round(cmerged, 4)
    print(
        "(decode_bN: DISeL / unmerged LoRA at batch N; decode_merged_bN: DISeL / merged LoRA; decode_lora_merged_bN: "
        "unmerged / merged LoRA; CPU: the same ratio of process CPU time; min/min: ratio of the fastest rounds, the least "
        "disturbed by other jobs)"
    )


def profile_decode(bench: DecodeBench, rows: int = 25) -> None:
    """torch.profiler tables of one decoding step at batch 1, LoRA and DISeL, and the ops each adds per layer."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ops = {}
    for v in ("lora_merged", "lora", "disel"):
        step = bench.one_step(v)
        step()  # warm-up
        with profile(activities=activities) as prof:
            step()
        events = prof.key_averages()
        ops[v] = sum(e.count for e in events if e.key.startswith("aten::"))
        if v != "lora_merged":
            print(f"\n--- profile: one decoding step, {v} r={DECODE_RANK}, batch 1 ({ops[v]} aten op calls) ---")
            print(events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=rows))
    per_layer = {v: (ops[v] - ops["lora_merged"]) / bench.n_adapted for v in ("lora", "disel")}
    print(
        f"aten op calls per decoding step: merged LoRA {ops['lora_merged']}, LoRA {ops['lora']}, DISeL {ops['disel']}; "
        f"per adapted layer over the merged model: LoRA {per_layer['lora']:.1f}, DISeL {per_layer['disel']:.1f} "
        f"({bench.n_adapted} layers)"
    )


def device_name() -> str:
    """The device for the JSON line: 'cpu', or e.g. 'cuda:0 (NVIDIA H200)'."""
    return "cpu" if DEVICE.type == "cpu" else describe(DEVICE)


def decode(args, rounds: int, results: dict) -> None:
    """The decoding measurement (on one thread on the CPU, as a served model often runs per request)."""
    torch = import_torch()
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    bench = DecodeBench(new_tokens=32 if args.quick else 64)
    decode_table(bench, bench.rounds(rounds), results)
    if args.profile_decode:
        profile_decode(bench)
    del bench
    gc.collect()
    torch.set_num_threads(threads)


# --- trainable parameters -------------------------------------------------------------------------------------------


def llama_linears(hidden, inter, kv=None):
    kv = kv or hidden
    return [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]


def lora_count(linears, r, layers):
    return layers * sum(r * (d_in + d_out) for d_in, d_out in linears)


def gate_count(linears, r, layers, k=None):
    return layers * sum(k * (d_in + r) + r if k else r * (d_in + 1) for d_in, _ in linears)


def flop_ratios(shape: dict, r: int, bottleneck=None) -> tuple:
    """DISeL/LoRA ratio of matmul FLOPs per token (train, infer): a floor for the time ratio of compute-bound runs.

    The frozen base costs its forward and the input-gradient GEMMs in backward (2x), the adapters also their weight
    gradients (3x); causal attention is counted at half the sequence, the LM head when the model has one.
    """
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    linears = llama_linears(hidden, shape["intermediate_size"])
    seq = BLOCK_SEQ if shape is BLOCK else SMALL_SEQ
    base = layers * (sum(i * o for i, o in linears) + 2 * (seq // 2) * hidden)
    if shape is not BLOCK:
        base += hidden * shape["vocab_size"]
    lora, gate = lora_count(linears, r, layers), gate_count(linears, r, layers, bottleneck)
    train = (2 * base + 3 * (lora + gate)) / (2 * base + 3 * lora)
    return train, (base + lora + gate) / (base + lora)


def param_table(checked_model=None):
    print("\nTrainable parameters (all-linear): LoRA, and what the DISeL gate adds on top")
    print(
        f"{'model':<22}{'r':>4}{'LoRA':>13}{'full gate':>13}{'(%LoRA)':>9}{'gate b4':>11}{'(%)':>7}{'gate b8':>11}{'(%)':>7}"
    )
    models = [
        ("small Llama (4 layers)", llama_linears(SMALL["hidden_size"], SMALL["intermediate_size"]), 4),
        ("Llama-2-7B (32 layers)", llama_linears(4096, 11008), 32),
    ]
    for name, linears, layers in models:
        for r in (16, 64):
            lora = lora_count(linears, r, layers)
            full, b4, b8 = (gate_count(linears, r, layers, k) for k in (None, 4, 8))
            print(
                f"{name:<22}{r:>4}{lora:>13,}{full:>13,}{100 * full / lora:>8.1f}%{b4:>11,}{100 * b4 / lora:>6.1f}%"
                f"{b8:>11,}{100 * b8 / lora:>6.1f}%"
            )
    if checked_model is not None:
        # the formulas above against the instantiated small model
        counts = {}
        for pname, p in checked_model.named_parameters():
            for key in ("lora_A", "lora_B", "lora_disel_gate"):
                if f".{key}." in pname:
                    adapter = pname.split(f".{key}.")[1].split(".")[0]
                    counts[(adapter, key)] = counts.get((adapter, key), 0) + p.numel()
        linears = llama_linears(SMALL["hidden_size"], SMALL["intermediate_size"])
        for (adapter, key), n in counts.items():
            variant, r = adapter.rsplit("_r", 1)
            r = int(r)
            if key == "lora_disel_gate":
                expected = gate_count(linears, r, 4, BOTTLENECK if variant.startswith("disel_b") else None)
            else:
                expected = None
            if expected is not None and n != expected:
                raise AssertionError(f"{adapter} {key}: {n} parameters, formula says {expected}")
        print("(gate counts checked against the instantiated small model)")


# --- profiling ------------------------------------------------------------------------------------------------------


def profile(bench, r, mode, rows=15):
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE.type == "cuda"
    for v in ("lora", "disel"):
        bench.run(v, r, mode, 1)
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            bench.run(v, r, mode, 2)
        print(f"\n--- profile {v} r={r} {mode} (2 steps) ---")
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


# --- main -----------------------------------------------------------------------------------------------------------


def main():
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
    parser.add_argument("--mem-child", nargs=3, metavar=("VARIANT", "R", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global DEVICE
    try:
        DEVICE = pick_device(args.device)
    except DemoError as e:
        raise SystemExit(f"bench failed: {e}") from None
    if args.mem_child:
        v, r, shape_name = args.mem_child
        mem_child(v, int(r), shape_name)
        return

    torch = import_torch(NUM_THREADS)
    cpu = DEVICE.type == "cpu"
    t_start = time.perf_counter()
    rounds = args.rounds or (5 if args.quick else 9)
    ranks = [16, 64]
    variants = ["lora", "disel"] if args.quick else ["lora", "dora", "disel", f"disel_b{BOTTLENECK}"]
    print(
        f"device {describe(DEVICE)}; torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} "
        f"CPUs, fp32; {rounds} rounds; small Llama batch {SMALL_BATCH} x seq {SMALL_SEQ}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    results = {}
    if args.decode_only:
        decode(args, rounds, results)
        print(json.dumps({"device": device_name(), **results}))
        return

    # memory, one process per variant
    print("\nPeak training memory (2 steps, fresh process per variant; MiB over the loaded base model)")
    mem_variants = ["lora", "disel"] if args.quick else ["lora", "dora", "disel", f"disel_b{BOTTLENECK}"]
    mem = {}
    for r in ranks:
        for v in mem_variants:
            mem[(v, r)] = measure_memory(v, r, "small")
    print(f"{'variant':<14}{'rank':>5}{'peak MiB':>10}{'/LoRA':>8}{'process MiB':>13}{'/LoRA':>8}")
    for (v, r), m in mem.items():
        ref = mem[("lora", r)]
        ratio, pratio = m["peak_kib"] / ref["peak_kib"], m["process_kib"] / ref["process_kib"]
        print(f"{v:<14}{r:>5}{m['peak_kib'] / 1024:>10.1f}{ratio:>8.3f}{m['process_kib'] / 1024:>13.1f}{pratio:>8.3f}")
        if v.startswith("disel"):
            tag = "" if v == "disel" else v[len("disel") :]
            results[f"mem{tag}_r{r}"] = round(ratio, 4)
            results[f"mem_process{tag}_r{r}"] = round(pratio, 4)

    # speed, small model
    bench = Bench(SMALL, variants, ranks)
    times = {mode: bench.rounds(mode, rounds, 1) for mode in ("train", "infer")}
    speed_table("Small Llama (hidden 512, 4 layers), ratios to LoRA at the same rank", bench, times, results, "")
    if not args.quick and cpu:
        # the same on one thread: no OpenMP barriers, so CPU time is the intrinsic cost of each variant
        torch.set_num_threads(1)
        times = {mode: bench.rounds(mode, max(3, rounds - 2), 1) for mode in ("train", "infer")}
        speed_table("Small Llama on ONE thread (contention-free reference)", bench, times, results, "1thread_")
        torch.set_num_threads(NUM_THREADS)
    if args.profile:
        for r in ranks:
            profile(bench, r, "train")
    param_table(bench.model)
    del bench
    gc.collect()

    decode(args, rounds, results)

    # the small model on a 4-bit base (QLoRA): speed interleaved as above, memory one process per variant
    if importlib.util.find_spec("bitsandbytes") is not None:
        # on one thread: with two on this shared CPU, a 4-bit training step stalled at OpenMP barriers ~10x longer;
        # the quick run keeps to r=16 and sequences of 128 tokens
        torch.set_num_threads(1)
        qlora_ranks = [16] if args.quick else ranks
        qlora_seq = 128 if args.quick else SMALL_SEQ
        mem4 = {}
        with tempfile.TemporaryDirectory(prefix="disel-bench-") as folder:
            save_small_base(folder)
            for r in qlora_ranks:
                for v in ("lora", "disel"):
                    mem4[(v, r)] = measure_memory(v, r, f"4bit:{qlora_seq}:{folder}")
            bench = Bench(SMALL, ["lora", "disel"], qlora_ranks, base_4bit=folder, seq=qlora_seq)
            times = {mode: bench.rounds(mode, rounds, 1) for mode in ("train", "infer")}
            speed_table(
                f"Small Llama on a 4-bit base (bitsandbytes nf4, float32 compute), batch {SMALL_BATCH} x seq {qlora_seq}, "
                f"{'ONE thread' if cpu else DEVICE}, ratios to LoRA at the same rank",
                bench,
                times,
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
    else:
        print("\n(4-bit base skipped: bitsandbytes is not installed)")

    # speed, one 7B-shaped block
    if not args.quick:
        block_variants = ["lora", "dora", "disel"]
        bench = Bench(BLOCK, block_variants, ranks)
        block_rounds = max(3, rounds - 2)
        times = {mode: bench.rounds(mode, block_rounds, 1) for mode in ("train", "infer")}
        speed_table(
            f"One Llama-2-7B-shaped block (hidden 4096, inter 11008, 32 heads), batch {BLOCK_BATCH} x seq {BLOCK_SEQ}",
            bench,
            times,
            results,
            "block4096_",
        )
        if args.profile:
            profile(bench, 16, "train")
        del bench
        gc.collect()
        m_lora, m_disel = (measure_memory(v, 16, "block") for v in ("lora", "disel"))
        results["block4096_mem_r16"] = round(m_disel["peak_kib"] / m_lora["peak_kib"], 4)
        results["block4096_mem_process_r16"] = round(m_disel["process_kib"] / m_lora["process_kib"], 4)
        print(
            f"\nBlock peak training memory r=16 over the loaded base: LoRA {m_lora['peak_kib'] / 1024:.1f} MiB, DISeL "
            f"{m_disel['peak_kib'] / 1024:.1f} MiB, ratio {results['block4096_mem_r16']:.3f} (mostly adapter weights and "
            f"AdamW state at 128 tokens); whole process {results['block4096_mem_process_r16']:.3f}"
        )
    else:
        for key in ("block4096_train_r16", "block4096_infer_r16", "block4096_train_r64", "block4096_infer_r64"):
            results[key] = None

    goals = {
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
    print("\nGoals (DISeL/LoRA at equal rank):")
    for key, goal in goals.items():
        value = results.get(key)
        verdict = "n/a" if value is None else ("met" if value <= goal else "NOT met")
        print(f"  {key:<22} {'-' if value is None else f'{value:.3f}':>7}  goal <= {goal:.2f}  {verdict}")
    print(
        f"\n(total {time.perf_counter() - t_start:.0f} s on {describe(DEVICE)}, load average now "
        f"{os.getloadavg()[0]:.1f})"
    )
    ordered = {"device": device_name(), **{k: results.get(k) for k in goals}}
    ordered.update({k: v for k, v in sorted(results.items()) if k not in ordered})
    print(json.dumps(ordered))


if __name__ == "__main__":
    main()
