"""Decoding: greedy `generate` with the KV cache, DISeL against unmerged and merged LoRA, in interleaved rounds."""

import copy
import gc
import statistics
import time

from device import describe, synchronize
from models import DECODE, build_base, lora_config
from rounds import interleaved_rounds, ratio_stats


DECODE_RANK, DECODE_BATCHES = 16, (1, 8)


class DecodeBench:
    """Greedy `generate` with the KV cache on the DECODE model: LoRA and DISeL unmerged (one PEFT model carrying both,
    switched with `set_adapter`, on the same base weights), and LoRA merged into a copy of the base weights (a plain
    model, what LoRA users deploy), at rank DECODE_RANK on all linear layers.

    A timing is one `generate` call (the prompt's prefill, then `new_tokens` decoding steps, exactly: EOS is
    suppressed), divided by `new_tokens`.

    Args:
        new_tokens (`int`): Tokens generated per call.
        device (`torch.device`): Where everything runs.
    """

    VARIANTS = ("lora", "disel", "lora_merged")

    def __init__(self, new_tokens: int, device):
        import torch

        from peft import get_peft_model

        self.torch, self.new_tokens, self.device = torch, new_tokens, device
        base = build_base(DECODE, device, use_cache=True).requires_grad_(False)
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
            b: torch.randint(0, DECODE.vocab_size, (b, DECODE.seq), generator=gen).to(device) for b in DECODE_BATCHES
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
        synchronize(self.device)
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
        synchronize(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if out.shape[1] != ids.shape[1] + n:
            raise AssertionError(f"{variant}: generated {out.shape[1] - ids.shape[1]} tokens, expected {n}")
        return wall / n, cpu / n

    def rounds(self, rounds: int) -> tuple:
        """Two dicts {(variant, batch): [seconds per token, one per round]}, wall and CPU (see
        `interleaved_rounds`)."""
        entries = [(v, b) for b in DECODE_BATCHES for v in self.VARIANTS]
        return interleaved_rounds(entries, lambda e: self.run(*e), rounds)

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
            synchronize(self.device)

        return step


def decode_table(bench: DecodeBench, times: tuple, results: dict) -> None:
    """Print the decoding ratios and put DISeL's into `results` (`decode_bN`, `decode_merged_bN`, ...)."""
    wall, cpu = times
    print(
        f"\nDecoding: greedy generate with the KV cache, {DECODE.hidden_size}-wide {DECODE.num_hidden_layers}-layer "
        f"Llama, r={DECODE_RANK} on all linear layers ({bench.n_adapted} adapted), prompt {DECODE.seq} + "
        f"{bench.new_tokens} new tokens, on {describe(bench.device)}; ratios: median over rounds of the per-round "
        "ratio [IQR]"
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

    cuda = bench.device.type == "cuda"
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


def measure_decode(device, rounds: int, new_tokens: int, results: dict, profile: bool = False) -> None:
    """The decoding measurement (on one thread on the CPU, as a served model often runs per request)."""
    import torch

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    bench = DecodeBench(new_tokens, device)
    decode_table(bench, bench.rounds(rounds), results)
    if profile:
        profile_decode(bench)
    del bench
    gc.collect()
    torch.set_num_threads(threads)
