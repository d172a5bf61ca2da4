"""Reference data for the vLLM tests, computed with the project's patched PEFT and transformers (the main `.venv`).

Run with the main venv's Python (the vLLM venv has its own transformers and no patched PEFT):

    .venv/bin/python vllm_disel/tests/make_reference.py OUT_DIR

It writes to OUT_DIR:

- `base/`: a tiny random 2-layer Llama (hidden 128, 2 query heads of 64, 1 key/value head) with a word-level tokenizer
  built in code, saved in float32;
- one folder per adapter, saved with `save_pretrained`: DISeL adapters trained a few steps at a high learning rate so
  that their gates open, a plain LoRA adapter, and two DISeL adapters that the vLLM plugin must refuse (a gate on the
  embedding, a gate on lm_head);
- `reference.json`: for every prompt and every adapter (and the base model), the greedy continuation computed with
  PEFT + transformers, the log-probability of each generated token, the margin between the two best tokens at each
  step (to spot near ties), and each DISeL adapter's mean gate opening on the prompts; also `disel_a` with its gates
  forced fully open (what serving it as a plain LoRA adapter would give), which must differ from `disel_a`.

With `--bench`, it writes instead the model and adapters of the throughput benchmark (`bench_throughput.py`): a wider
random Llama and a DISeL and a plain LoRA adapter of the same rank, untrained (random A, B and gates). With
`--source-hash`, it prints the hash of what the reference depends on (see `source_hash`) and writes nothing.

Nothing touches the Hugging Face Hub.
"""

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SUPPORT = ROOT / "testing_support"
sys.path.insert(0, str(SUPPORT))

from disel_testing import HEAD64_LLAMA, PROMPTS, TRAIN_TEXT, llama_config, make_tokenizer  # noqa: E402


NEW_TOKENS = 8
TEXT_A = TRAIN_TEXT
TEXT_B = [
    "what colour is the sky ? blue .",
    "what colour is the sea ? blue .",
    "what colour is the tree ? green .",
    "where is the cat ? on the mat .",
    "where is the fish ? in the sea .",
    "how many dogs ? two . how many cats ? three .",
    "one two three four five .",
]
# name -> (LoraConfig options, DiselConfig options or None for plain LoRA, training text, steps)
ADAPTERS = {
    # the defaults: full gate, bias -3, no normalization; every linear layer (q, k, v, o, gate, up, down)
    "disel_a": ({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, {}, TEXT_A, 40),
    # another rank, gate_normalize, and only some of the projections packed by vLLM (q and v of qkv, up of gate_up)
    "disel_b": (
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        {"gate_normalize": True, "gate_bias_init": -2.0},
        TEXT_B,
        40,
    ),
    # a bottleneck gate W_g = U V and rsLoRA scaling
    "disel_c": (
        {"r": 8, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True},
        {"gate_bottleneck_dim": 4},
        TEXT_A + TEXT_B,
        40,
    ),
    "lora": ({"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}, None, TEXT_B, 40),
}
# saved untrained: the plugin refuses them at load time
REFUSED = {
    "disel_embed": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"]},
    "disel_lm_head": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]},
}


def build_base(folder: Path) -> Path:
    """A random float32 LlamaForCausalLM with the shapes of a real (if very small) model, and its tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = llama_config(**HEAD64_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # a wider spread of logits than the default init, so that greedy decoding has clear winners
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora_config(options: dict, disel: dict | None):
    from peft import DiselConfig, LoraConfig

    kwargs = {"lora_dropout": 0.0, "task_type": "CAUSAL_LM", **options}
    if disel is None:
        return LoraConfig(**kwargs)
    return LoraConfig(use_disel=DiselConfig(**disel), **kwargs)


def train(base_dir: Path, config, text: list[str], steps: int, seed: int):
    """A few full-batch steps at a high learning rate; DISeL gates at 5x (create_disel_optimizer)."""
    from peft import get_peft_model
    from peft.optimizers import create_disel_optimizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    if config.use_disel:
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2, gate_lr_ratio=5.0)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = make_tokenizer()(text, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), loss.item()


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int) -> dict:
    """Greedy decoding without stopping at EOS (vLLM runs with ignore_eos), with each chosen token's log-probability
    and the log-probability margin to the runner-up."""
    tokens, logprobs, margins = [], [], []
    seq = list(ids)
    for _ in range(new_tokens):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, 2)
        tok = int(top.indices[0])
        tokens.append(tok)
        logprobs.append(float(top.values[0]))
        margins.append(float(top.values[0] - top.values[1]))
        seq.append(tok)
    return {"tokens": tokens, "logprobs": logprobs, "margins": margins}


@torch.no_grad()
def gate_openings(model, prompts: list[list[int]]) -> tuple[float, float]:
    """The mean gate opening sigmoid(W_g x + b_g) over every gated layer, rank and prompt token, and the fraction of
    gates above 0.5."""
    from peft.tuners.lora.disel import DiselGate

    total, above, count = 0.0, 0, 0

    def hook(gate, args, logits):
        nonlocal total, above, count
        gates = torch.sigmoid(logits.float())
        total += gates.sum().item()
        above += (gates > 0.5).sum().item()
        count += gates.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DiselGate)]
    for ids in prompts:
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return total / count, above / count


@torch.no_grad()
def open_gates(model) -> None:
    """Set every gate bias to +inf: sigmoid = 1, the adapter's plain LoRA update."""
    from peft.tuners.lora.disel import DiselGate

    for module in model.modules():
        if isinstance(module, DiselGate):
            module.bias.fill_(float("inf"))


def build_bench(out: Path, hidden: int, layers: int, rank: int) -> None:
    """The throughput benchmark's model (head size 64, 4 query heads per key/value head, an MLP of 8/3 x hidden rounded
    to a multiple of 64) and its two adapters: DISeL and plain LoRA at rank `rank` on every linear layer."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    tokenizer = make_tokenizer()
    heads = hidden // 64
    config = llama_config(
        hidden_size=hidden,
        intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=64,
        max_position_embeddings=1024,
        dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    options = {"r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear", "init_lora_weights": False}
    for name, disel in (("disel", {}), ("lora", None)):
        torch.manual_seed(1)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(out / "base"), lora_config(options, disel))
        model.save_pretrained(out / name)


def source_hash() -> str:
    """A hash of what the reference depends on: this script, the shared test-support module, and every Python file of
    the `peft` package this Python imports (the assembled tree that runs, build/peft/src/peft after `make install`), so
    that a change of any topic of the series rebuilds the reference. `peft` is located, not imported."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"no peft package for {sys.executable}: run `make install`")
    package = Path(next(iter(spec.submodule_search_locations)))
    h = hashlib.sha1()
    for path in [Path(__file__).resolve(), SUPPORT / "disel_testing.py"]:
        h.update(path.read_bytes())
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="the folder to write (not with --source-hash)")
    parser.add_argument("--bench", action="store_true", help="write the throughput benchmark's model and adapters")
    parser.add_argument("--hidden", type=int, default=1024, help="--bench: hidden size (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=4, help="--bench: number of layers")
    parser.add_argument("--rank", type=int, default=16, help="--bench: rank of both adapters")
    parser.add_argument(
        "--source-hash", action="store_true", help="print the hash of the reference's inputs, and exit"
    )
    args = parser.parse_args(argv)
    if args.source_hash:
        print(source_hash())
        return 0
    if args.out is None:
        parser.error("the folder to write (OUT) is required")
    torch.set_num_threads(1)
    if args.bench:
        args.out.mkdir(parents=True, exist_ok=True)
        build_bench(args.out, args.hidden, args.layers, args.rank)
        return 0
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base_dir = build_base(out / "base")
    tokenizer = make_tokenizer()
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    assert all(tokenizer.unk_token_id not in ids for ids in prompts), "a prompt word is not in the vocabulary"

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ref = {
        "source": source_hash(),
        "new_tokens": NEW_TOKENS,
        "prompts": PROMPTS,
        "prompt_ids": prompts,
        "vocab_size": len(tokenizer),
        "outputs": {"base": [greedy(base, ids, NEW_TOKENS) for ids in prompts]},
        "adapters": {},
    }
    for seed, (name, (options, disel, text, steps)) in enumerate(ADAPTERS.items()):
        config = lora_config(options, disel)
        model, loss = train(base_dir, config, text, steps, seed)
        model.save_pretrained(out / name)
        info = {"use_disel": disel is not None, "rank": options["r"], "final_loss": loss}
        if disel is not None:
            info["mean_gate"], info["frac_gates_above_half"] = gate_openings(model, prompts)
        ref["adapters"][name] = info
        ref["outputs"][name] = [greedy(model, ids, NEW_TOKENS) for ids in prompts]
        print(f"{name}: {info}", flush=True)
        if name == "disel_a":
            open_gates(model)
            ref["outputs"]["disel_a_ungated"] = [greedy(model, ids, NEW_TOKENS) for ids in prompts]
    for name, options in REFUSED.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora_config(options, {}))
        model.save_pretrained(out / name)
    (out / "reference.json").write_text(json.dumps(ref, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
