"""Training-step and inference speed of the variants on one base model, in interleaved rounds, and its table."""

import copy
import statistics
import time

from device import synchronize
from flops import flop_ratios
from models import BOTTLENECK, Shape, batch_for, build_base, load_4bit, lora_config, make_optimizer, train_step
from rounds import interleaved_rounds, ratio_stats


class Bench:
    """One base model and a PEFT model carrying one adapter per (variant, rank) on a copy of the same base weights.

    Args:
        shape (`Shape`): The model.
        variants (`list[str]`): lora, dora, disel, disel_b8.
        ranks (`list[int]`): One adapter per variant and rank.
        device (`torch.device`): Where everything runs.
        base_4bit (`str`, *optional*): The folder of the saved small Llama: both models are that one loaded in 4-bit.
        seq (`int`, *optional*): Tokens per sequence (default: the shape's).
    """

    def __init__(self, shape: Shape, variants: list, ranks: list, device, base_4bit: str | None = None, seq=None):
        import torch

        from peft import get_peft_model

        self.torch, self.shape, self.ranks, self.device = torch, shape, ranks, device
        self.base = build_base(shape, device) if base_4bit is None else load_4bit(base_4bit, device)
        self.base.requires_grad_(False)
        self.ids = batch_for(shape, device, seq)
        self.names = [(v, r) for r in ranks for v in variants]
        model = None
        for v, r in self.names:
            name = f"{v}_r{r}"
            if model is None:
                # a 4-bit model is loaded a second time rather than deep-copied
                base = copy.deepcopy(self.base) if base_4bit is None else load_4bit(base_4bit, device)
                model = get_peft_model(base, lora_config(v, r), adapter_name=name)
            else:
                model.add_adapter(name, lora_config(v, r))
        self.model = model
        self.optimizers = {}
        for v, r in self.names:
            self.activate(v, r)
            self.optimizers[(v, r)] = make_optimizer([p for p in model.parameters() if p.requires_grad])

    def activate(self, v, r):
        self.model.base_model.set_adapter(f"{v}_r{r}")

    def run(self, v, r, mode: str, steps: int) -> tuple:
        """(wall seconds, process CPU seconds) per step."""
        model = self.base if v == "base" else self.model
        if v != "base":
            self.activate(v, r)
        synchronize(self.device)
        if mode == "train":
            model.train()
            opt = self.optimizers[(v, r)]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                train_step(model, opt, self.ids, self.shape)
        else:
            model.eval()
            t0, c0 = time.perf_counter(), time.process_time()
            with self.torch.inference_mode():
                for _ in range(steps):
                    model(input_ids=self.ids)
        synchronize(self.device)
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    def rounds(self, mode: str, rounds: int, steps: int) -> tuple:
        """Two dicts {(variant, rank): [seconds per step, one per round]}, wall and CPU (see `interleaved_rounds`);
        the warm-up also creates the AdamW state. Inference also times the base model, as ("base", 0)."""
        entries = ([("base", 0)] if mode == "infer" else []) + list(self.names)
        return interleaved_rounds(
            entries, lambda e: self.run(*e, mode, steps), rounds, warmup=lambda e: self.run(*e, mode, 1)
        )

    def profile(self, r, mode, rows=15):
        """torch.profiler tables of two steps of LoRA and of DISeL at rank `r`."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        for v in ("lora", "disel"):
            self.run(v, r, mode, 1)
            with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                self.run(v, r, mode, 2)
            print(f"\n--- profile {v} r={r} {mode} (2 steps) ---")
            sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort_by, row_limit=rows))


def speed_table(title, bench: Bench, times_by_mode: dict, results: dict, prefix: str) -> None:
    """Print the ratios to LoRA at the same rank and put DISeL's into `results` as `<prefix><mode><tag>_r<rank>`
    (wall), `cpu_...` and `min_...`."""
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


def measure_speed(bench: Bench, rounds: int) -> dict:
    """{mode: (wall, cpu)} for training and inference, one step per timing."""
    return {mode: bench.rounds(mode, rounds, 1) for mode in ("train", "infer")}
