"""Peak training memory: one fresh process per variant (`disel_overhead.py --mem-child JOB`).

With glibc's mmap threshold pinned (`MALLOC_MMAP_THRESHOLD_=65536`) freed tensors go back to the OS at once, so the
resident set size follows the live tensors. The process builds the base model, reads its RSS, resets the kernel's RSS
high-water mark (`/proc/self/clear_refs`), adds one adapter and runs two training steps (one thread); "peak" is the
high-water mark minus the RSS of the loaded base model. On a GPU: torch's allocations there.
"""

import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from models import SHAPES, batch_for, build_base, load_4bit, lora_config, loss_of, make_optimizer, train_step


SCRIPT = Path(__file__).resolve().parent / "disel_overhead.py"


@dataclass
class MemoryJob:
    """What one memory process measures.

    Args:
        variant (`str`): lora, dora, disel, disel_b8, or base (no adapter).
        r (`int`): The rank.
        shape (`str`): The name of a shape of `models.SHAPES`.
        base_4bit (`str`, *optional*): The folder of the saved small Llama, loaded in 4-bit as the base.
        seq (`int`, *optional*): Tokens per sequence (default: the shape's).
    """

    variant: str
    r: int
    shape: str = "small"
    base_4bit: str | None = None
    seq: int | None = None


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def mem_child(job: MemoryJob, device) -> None:
    """Measure `job` in this process and print {"peak_kib", "process_kib"} as JSON."""
    import torch

    from peft import get_peft_model

    torch.set_num_threads(1)  # memory does not depend on it; one thread is faster on a busy machine
    shape = SHAPES[job.shape]
    model = build_base(shape, device) if job.base_4bit is None else load_4bit(job.base_4bit, device)
    ids = batch_for(shape, device, job.seq)
    gc.collect()
    base_rss = rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    if device.type == "cuda":  # on a GPU: torch's allocations there (the host's RSS holds only the runtime)
        torch.cuda.synchronize(device)
        base_rss = torch.cuda.memory_allocated(device) // 1024
        torch.cuda.reset_peak_memory_stats(device)
    if job.variant != "base":
        model = get_peft_model(model, lora_config(job.variant, job.r))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params) if params else None
    model.train()
    for _ in range(2):
        if optimizer is None:
            with torch.no_grad():
                loss_of(model, ids, shape)
        else:
            train_step(model, optimizer, ids, shape)
    process = rss_kib("VmHWM") if device.type != "cuda" else torch.cuda.max_memory_allocated(device) // 1024
    print(json.dumps({"peak_kib": process - base_rss, "process_kib": process}))


def measure_memory(job: MemoryJob, device) -> dict:
    """Run `job` in a fresh process; {"peak_kib": over the loaded base, "process_kib": the whole process}."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), "--device", str(device), "--mem-child", json.dumps(asdict(job))]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
