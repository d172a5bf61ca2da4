"""Generation throughput in vLLM of a DISeL adapter against a plain LoRA adapter of the same rank, in one engine.

Runs in the vLLM venv, on the model and adapters that `make_reference.py --bench` writes with the main venv (a random
Llama and two untrained adapters on every linear layer: speed does not depend on what the weights are):

    .venv/bin/python vllm_disel/tests/make_reference.py --bench build/vllm-disel/bench
    .venv-vllm/bin/python vllm_disel/bench_throughput.py build/vllm-disel/bench

Each round generates, for each batch size, `--new-tokens` tokens per request (greedy, EOS ignored) with DISeL, with
plain LoRA and without an adapter, the order alternating between rounds. Tokens per second are generated tokens over
the wall time of the `generate` call (prefill of the short prompts included). The ratio DISeL / LoRA is taken per
round and summarised by its median and quartiles. `make bench-vllm` runs both steps.
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, help="the folder written by make_reference.py --bench")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    rank = json.loads((args.models / "disel" / "adapter_config.json").read_text())["r"]
    llm = LLM(
        model=str(args.models / "base"),
        enable_lora=True,
        max_lora_rank=rank,
        max_loras=2,
        dtype="float32",
        enforce_eager=True,
        max_model_len=args.prompt_tokens + args.new_tokens + 8,
        max_num_seqs=max(args.batch_sizes),
        seed=0,
    )
    adapters = {
        "disel": LoRARequest("disel", 1, str(args.models / "disel")),
        "lora": LoRARequest("lora", 2, str(args.models / "lora")),
        "base": None,
    }
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)

    def run(method: str, batch: int, seed: int) -> float:
        prompts = [
            TokensPrompt(
                prompt_token_ids=[4 + (seed * 7 + i * 13 + j * 5) % (vocab - 4) for j in range(args.prompt_tokens)]
            )
            for i in range(batch)
        ]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=adapters[method], use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert sum(len(o.outputs[0].token_ids) for o in outputs) == batch * args.new_tokens
        return batch * args.new_tokens / elapsed

    for batch in args.batch_sizes:  # warm-up: every adapter loaded and every shape seen once
        for method in adapters:
            run(method, batch, seed=0)
    speeds = {(m, b): [] for m in adapters for b in args.batch_sizes}
    for r in range(args.rounds):
        order = ["disel", "lora", "base"] if r % 2 == 0 else ["base", "lora", "disel"]
        for batch in args.batch_sizes:
            for method in order:
                speeds[(method, batch)].append(run(method, batch, seed=r + 1))

    result = {"rank": rank, "new_tokens": args.new_tokens, "rounds": args.rounds, "batch": {}}
    print(f"tokens/s (median over {args.rounds} rounds), rank {rank}, {args.new_tokens} new tokens per request")
    print("batch   disel    lora    base   disel/lora (median, IQR)")
    for batch in args.batch_sizes:
        ratios = [d / lo for d, lo in zip(speeds[("disel", batch)], speeds[("lora", batch)])]
        q1, med, q3 = quartiles(ratios)
        row = {m: statistics.median(speeds[(m, batch)]) for m in adapters}
        result["batch"][batch] = {**row, "disel_over_lora": med, "iqr": [q1, q3]}
        print(
            f"{batch:>5} {row['disel']:>7.1f} {row['lora']:>7.1f} {row['base']:>7.1f}   {med:.3f} ({q1:.3f}-{q3:.3f})"
        )
    print(json.dumps(result))
    llm.llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
