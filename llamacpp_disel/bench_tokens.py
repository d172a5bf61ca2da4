"""Generation speed in llama.cpp (llama-cpp-python, CPU, batch 1, 1 thread): a DISeL adapter against a plain LoRA adapter
of the same rank on the same model, and the base model without adapter, measured in one run.

The model is a random Llama with the shapes of SmolLM2-135M (hidden 576, 30 layers, 9 query / 3 key-value heads of 64,
MLP 1536) but this project's small test vocabulary, in float32 GGUF; the adapters target every linear layer, with
random weights (untrained: speed does not depend on the values). Rounds alternate base / LoRA / DISeL, and each figure
is the median over the rounds of decoding `--new-tokens` tokens one at a time after a `--prompt-tokens` prompt
(prefill timed separately). Needs `make install-llamacpp`; run as `make bench-llamacpp`.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tests"))

from conftest import LLAMA_CPP, LlamaRunner  # noqa: E402
from fixtures import make_tokenizer  # noqa: E402


def build(folder: Path, rank: int) -> None:
    """base/ and base.gguf, and the adapters lora/, disel/ with their GGUF files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    run = [sys.executable, "convert_hf_to_gguf.py", str(folder / "base"), "--outtype", "f32"]
    subprocess.run([*run, "--outfile", str(folder / "base.gguf")], cwd=LLAMA_CPP, check=True, capture_output=True)
    for name, disel in (("lora", False), ("disel", True)):
        torch.manual_seed(1)
        lora = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, use_disel=disel
        )
        model = get_peft_model(LlamaForCausalLM.from_pretrained(folder / "base"), lora)
        model.save_pretrained(folder / name)
        run = [sys.executable, "convert_lora_to_gguf.py", str(folder / name), "--base", str(folder / "base")]
        run += ["--outtype", "f32", "--outfile", str(folder / f"{name}.gguf")]
        subprocess.run(run, cwd=LLAMA_CPP, check=True, capture_output=True)


def measure(runner: LlamaRunner, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy generation."""
    llm = runner.llm
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = time.perf_counter() - start
    return len(prompt) / prefill, new_tokens / decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.rank)
        runners = {
            "base": LlamaRunner(folder / "base.gguf", []),
            "lora": LlamaRunner(folder / "base.gguf", [(folder / "lora.gguf", 1.0)]),
            "disel": LlamaRunner(folder / "base.gguf", [(folder / "disel.gguf", 1.0)]),
        }
        prompt = [int(t) for t in np.random.default_rng(0).integers(3, len(make_tokenizer()), args.prompt_tokens)]
        for runner in runners.values():  # warm-up
            measure(runner, prompt, 4)
        results = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                results[name].append(measure(runner, prompt, args.new_tokens))
        for runner in runners.values():
            runner.close()
    median = {name: [statistics.median(r[i] for r in rows) for i in (0, 1)] for name, rows in results.items()}
    print(f"llama.cpp, 1 thread, batch 1, rank {args.rank}, all linear layers, float32 GGUF, SmolLM2-135M shapes")
    print(
        f"median of {args.rounds} rounds: prefill of {args.prompt_tokens} tokens, decode of {args.new_tokens} tokens"
    )
    for name, (prefill, decode) in median.items():
        print(f"  {name:6s} prefill {prefill:8.1f} tokens/s   decode {decode:7.2f} tokens/s")
    (lp, ld), (dp, dd) = median["lora"], median["disel"]
    print(f"DISeL / LoRA: prefill {dp / lp:.3f}, decode {dd / ld:.3f}")


if __name__ == "__main__":
    main()
