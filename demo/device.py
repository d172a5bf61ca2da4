"""The device the demo, the frontier and the benchmark run on: `--device auto|cpu|cuda|cuda:N|mps`.

`auto` (the default) takes the first CUDA GPU when torch sees one, else the CPU. Apple's MPS is used only when asked
for (`--device mps`): the demo's figures have not been measured there. A device that is asked for but not there is an
error that says how to get it, never a silent fallback to the CPU.
"""

import torch
from model import DemoError


DEVICE_HELP = (
    "where to run: 'auto' (default: the first CUDA GPU if torch sees one, else the CPU), 'cpu', 'cuda', 'cuda:N' or "
    "'mps'"
)
CUDA_HINT = (
    "Install torch's CUDA build into the venv, e.g. `make install TORCH_SPEC=torch==2.13.0+cu128 "
    "TORCH_INDEX=https://download.pytorch.org/whl/cu128` (see README.md), or run on the CPU with --device cpu."
)


def pick_device(name: str = "auto") -> torch.device:
    """The torch device for a `--device` value (see the module docstring); raises DemoError if it is not usable."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DemoError(f"--device {name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DemoError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU. {CUDA_HINT}")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise DemoError(f"--device {name}: torch sees {count} CUDA GPU(s), numbered 0 to {count - 1}.")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DemoError(f"--device {name}: MPS is not available to this torch (it needs Apple silicon and macOS).")
        return torch.device("mps")
    raise DemoError(f"--device {name}: {device.type} devices are not supported here; use auto, cpu, cuda[:N] or mps.")


def describe(device: torch.device) -> str:
    """The device as the scripts print it, e.g. 'cuda:0 (NVIDIA H200)' or 'cpu (1 torch thread(s))'."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} torch thread(s))"
    return str(device)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on the CPU), before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Restart the accelerator's peak-memory counter (CUDA only; the CPU's peak is the process's, see model.py)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device):
    """Peak memory allocated by torch on a CUDA device since `reset_peak_memory`, in MiB; None elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def input_device(model) -> torch.device:
    """Where a model's token ids go: the device of its input embeddings (also for a model placed with device_map)."""
    return model.get_input_embeddings().weight.device
