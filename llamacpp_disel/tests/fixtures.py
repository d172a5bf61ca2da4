"""The tiny model and the adapters of the llama.cpp tests, built with transformers and the patched PEFT (main `.venv`).

- `build_base(folder)`: a random float32 2-layer Llama (hidden 128, 2 query heads of 64, 1 key/value head) with a
  Llama-style BPE tokenizer (byte fallback) built in code, which `convert_hf_to_gguf.py` converts;
- `train_adapter(base, folder, name)`: one adapter of `ADAPTERS`, trained a few full-batch steps at a high learning rate
  (DISeL gates at 5x) so that its gates open part of the way, saved with `save_pretrained`.

Nothing touches the Hugging Face Hub.
"""

import json
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "testing_support"))

from disel_testing import HEAD64_LLAMA, PROMPTS, TRAIN_TEXT, llama_config


TEXT_A = TRAIN_TEXT
TEXT_B = [
    "what colour is the sky ? blue .",
    "what colour is the sea ? blue .",
    "what colour is the tree ? green .",
    "where is the cat ? on the mat .",
    "where is the small fish ? in the sea .",
    "one two three four five .",
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (LoraConfig options, DiselConfig options or None for plain LoRA, training text)
ADAPTERS = {
    # the defaults: full gate, bias -3, no normalization, every linear layer
    "disel_full": ({"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR}, {}, TEXT_A),
    # a low-rank gate W_g = U V with gate_normalize, and rsLoRA's scaling
    "disel_bottleneck": (
        {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": ALL_LINEAR},
        {"gate_bottleneck_dim": 4, "gate_normalize": True},
        TEXT_A + TEXT_B,
    ),
    # other ranks and alphas per module (rank_pattern, alpha_pattern), another gate bias, some modules only
    "disel_patterns": (
        {
            "r": 8,
            "lora_alpha": 16,
            "rank_pattern": {"k_proj": 4, "down_proj": 2},
            "alpha_pattern": {"q_proj": 64, "down_proj": 4},
            "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        },
        {"gate_bias_init": -2.0},
        TEXT_B,
    ),
    "lora": ({"r": 8, "lora_alpha": 16, "target_modules": ALL_LINEAR}, None, TEXT_B),
}
STEPS = 30


def make_tokenizer():
    """A Llama-style BPE tokenizer (SentencePiece's "▁" word marker, byte fallback) whose merges spell every word of
    the texts above as one token."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    words = sorted({w for text in TEXT_A + TEXT_B + PROMPTS for w in text.split()})
    for ch in sorted({"▁", *"".join(words)}):
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in words:
        piece = "▁" + word
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                merges.append((piece[: end - 1], piece[end - 1]))
                vocab[piece[:end]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def build_base(folder: Path) -> Path:
    """A random float32 LlamaForCausalLM with the shapes of a real (if very small) model, and its tokenizer."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = llama_config(tokenizer, **HEAD64_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wider spread of logits than the default init, so that greedy decoding has clear winners
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_adapter(base: Path, folder: Path, name: str, seed: int = 0) -> Path:
    """Train the adapter `name` of ADAPTERS a few steps and save it to `folder`."""
    from transformers import AutoModelForCausalLM

    from peft import DiselConfig, LoraConfig, get_peft_model
    from peft.optimizers import create_disel_optimizer

    options, disel, text = ADAPTERS[name]
    kwargs = {"lora_dropout": 0.0, "task_type": "CAUSAL_LM", **options}
    config = LoraConfig(**kwargs) if disel is None else LoraConfig(use_disel=DiselConfig(**disel), **kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    if disel is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    else:
        optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2, gate_lr_ratio=5.0)
    batch = make_tokenizer()(text, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    for _ in range(STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


def load_peft(base: Path, adapters: list[Path], open_gates: bool = False):
    """The base model with the saved adapters (all active at once: their updates add up), in eval mode."""
    from transformers import AutoModelForCausalLM

    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    if len(adapters) > 1:
        model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    if open_gates:  # every gate bias +inf: sigmoid = 1, the adapter's plain LoRA update
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_disel_gate" in pname and pname.endswith(".bias"):
                    param.fill_(float("inf"))
    return model.eval()


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())
