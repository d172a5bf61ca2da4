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
  step (to spot near ties), and each DISeL adapter's mean gate opening on the prompts.

Nothing touches the Hugging Face Hub.
"""

import argparse
import json
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "integration"))

from disel_integration_utils import make_tokenizer  # noqa: E402


NEW_TOKENS = 8
PROMPTS = [
    "the cat sat on the",
    "a bird flew in",
    "what colour is the sky ?",
    "the big dog ran under",
    "where is the small fish ?",
    "one two three",
]
TEXT_A = [
    "the cat sat on the mat .",
    "the dog ran under the tree .",
    "a bird flew in the sky .",
    "a fish swam in the sea .",
    "the red cat sat on a blue mat .",
    "the big dog ran in the sea .",
]
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
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
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
    return LoraConfig(use_disel=True, disel_config=DiselConfig(**disel) if disel else None, **kwargs)


def train(base_dir: Path, config, text: list[str], steps: int, seed: int):
    """A few full-batch steps at a high learning rate; DISeL gates at 5x (create_disel_optimizer)."""
    from transformers import AutoModelForCausalLM

    from peft import get_peft_model
    from peft.optimizers import create_disel_optimizer

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
def mean_gate(model, prompts: list[list[int]]) -> float:
    """The mean gate opening sigmoid(W_g x + b_g) over every gated layer, rank and prompt token."""
    from peft.tuners.lora.disel import DiselGate

    total, count = 0.0, 0

    def hook(gate, logits):
        nonlocal total, count
        total += torch.sigmoid(logits.float()).sum().item()
        count += logits.numel()

    handles = [m.register_logits_hook(hook) for m in model.modules() if isinstance(m, DiselGate)]
    for ids in prompts:
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return total / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from peft import get_peft_model

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base_dir = build_base(out / "base")
    tokenizer = make_tokenizer()
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    assert all(tokenizer.unk_token_id not in ids for ids in prompts), "a prompt word is not in the vocabulary"

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ref = {
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
            info["mean_gate"] = mean_gate(model, prompts)
        ref["adapters"][name] = info
        ref["outputs"][name] = [greedy(model, ids, NEW_TOKENS) for ids in prompts]
        print(f"{name}: {info}", flush=True)
    for name, options in REFUSED.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora_config(options, {}))
        model.save_pretrained(out / name)
    (out / "reference.json").write_text(json.dumps(ref, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
