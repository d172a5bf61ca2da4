"""Session fixtures of the llama.cpp tests: the tiny Llama and its adapters (PEFT), their GGUF files (the vendored
converters of build/llamacpp/src, `python llamacpp_disel/build.py tree`), and llama-cpp-python runners.

Run with the main venv after `make install-llamacpp` (patched PEFT + the patched llama-cpp-python).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LLAMA_CPP = ROOT / "build" / "llamacpp" / "src" / "vendor" / "llama.cpp"
PRISTINE = ROOT / "build" / "llamacpp" / "pristine"
sys.path.insert(0, str(HERE))

import fixtures  # noqa: E402


NEW_TOKENS = 8


def convert(script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a converter (convert_hf_to_gguf.py or convert_lora_to_gguf.py) with this Python; output captured."""
    if not script.exists():
        pytest.fail(f"{script} is missing: run `make install-llamacpp` (or `python llamacpp_disel/build.py tree`)")
    return subprocess.run(
        [sys.executable, script.name, *args],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def convert_adapter(adapter: Path, base: Path, out: Path, pristine: bool = False) -> subprocess.CompletedProcess:
    script = (PRISTINE if pristine else LLAMA_CPP) / "convert_lora_to_gguf.py"
    return convert(script, str(adapter), "--base", str(base), "--outtype", "f32", "--outfile", str(out))


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """A folder with base/ (HF), base.gguf (float32), and for each adapter of fixtures.ADAPTERS its PEFT folder and its
    GGUF file (<name>.gguf), converted with the patched converter."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("llamacpp")
    base = fixtures.build_base(work / "base")
    done = convert(
        LLAMA_CPP / "convert_hf_to_gguf.py", str(base), "--outtype", "f32", "--outfile", str(work / "base.gguf")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in fixtures.ADAPTERS:
        fixtures.train_adapter(base, work / name, name)
        done = convert_adapter(work / name, base, work / f"{name}.gguf")
        assert done.returncode == 0, done.stderr[-3000:]
    return work


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    tokenizer = fixtures.make_tokenizer()
    return [tokenizer(p).input_ids for p in fixtures.PROMPTS]


class LlamaRunner:
    """The float32 GGUF base model in llama-cpp-python (1 thread) with GGUF adapters applied at the given scales."""

    def __init__(self, base_gguf: Path, adapters: list[tuple[Path, float]], verbose: bool = False):
        import ctypes

        from llama_cpp import Llama
        from llama_cpp import llama_cpp as lib

        self.llm = Llama(
            model_path=str(base_gguf),
            n_ctx=128,
            n_batch=64,
            n_threads=1,
            logits_all=True,
            type_k=0,  # GGML_TYPE_F32: a float32 KV cache (llama.cpp's default F16 cache rounds keys and values)
            type_v=0,
            verbose=verbose,
        )
        self.adapters = []
        for path, _ in adapters:
            adapter = lib.llama_adapter_lora_init(self.llm._model.model, str(path).encode())
            if not adapter:  # a NULL pointer: llama.cpp logged why
                raise ValueError(f"llama.cpp refused the adapter {path}")
            self.adapters.append(adapter)
        if adapters:
            ptrs = (lib.llama_adapter_lora_p_ctypes * len(adapters))(*self.adapters)
            scales = (ctypes.c_float * len(adapters))(*[scale for _, scale in adapters])
            if lib.llama_set_adapters_lora(self.llm._ctx.ctx, ptrs, len(adapters), scales):
                raise ValueError("llama_set_adapters_lora failed")

    def logits(self, ids: list[int]) -> np.ndarray:
        """The logits at every position of `ids`."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def greedy(self, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
        """Greedy decoding without stopping at EOS, one token at a time on the KV cache."""
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(out[-1:])
        return out

    def close(self):
        self.llm.close()


@torch.no_grad()
def peft_greedy(model, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy `generate` (no early stop at EOS)."""
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


@torch.no_grad()
def peft_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].double().numpy()
