"""Shared pieces of the integration tests: a tiny Llama with an offline word-level tokenizer, and DISeL helpers.

Imported by path (the test files put this folder on sys.path), also by the scripts the distributed tests launch.
"""

import argparse
from pathlib import Path

import torch


# every word the tests use (anything else would be <unk>)
WORDS = [
    *["the", "a", "is", "was", "it", "and", "of", "on", "in", "under", "what", "where", "how", "many"],
    *["cat", "dog", "bird", "fish", "mat", "tree", "sky", "sea", "sat", "ran", "flew", "swam"],
    *["big", "small", "red", "blue", "green", "colour", "yes", "no", "question", "answer"],
    *["one", "two", "three", "four", "five"],
]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
GATE = "lora_disel_gate"


def make_tokenizer():
    """A word-level tokenizer built in code (nothing from the Hub): specials, words, and punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + list(".,:?!"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def llama_config(**shape):
    """A LlamaConfig of the given shape for the tokenizer of `make_tokenizer`: its vocabulary size (equal, or lm-eval
    resizes the embeddings before loading an adapter) and special tokens; 256 positions unless given."""
    from transformers import LlamaConfig

    tokenizer = make_tokenizer()
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{"max_position_embeddings": 256, **shape},
    )


def make_base_model(seed=0):
    """A 2-layer, 64-wide random LlamaForCausalLM (widths that real models have), the same for the same seed."""
    from transformers import LlamaForCausalLM

    config = llama_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_base_model(folder):
    """Saves the tiny model and its tokenizer to `folder` (a local model directory for from_pretrained)."""
    folder = Path(folder)
    make_base_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def parse_launch_args():
    """The arguments of the launched training scripts (DDP and FSDP2)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    return parser.parse_args()


def disel_config(**kwargs):
    from peft import LoraConfig

    kwargs = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", **kwargs}
    return LoraConfig(task_type="CAUSAL_LM", use_disel=True, **kwargs)


def gate_state(model):
    """Detached copies of the DISeL gate parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if GATE in n}


def check_gates_moved_and_agree(gates, gates_before, label):
    """Assert that every gate moved from `gates_before` and that both processes hold the same gates, and say so."""
    import torch.distributed as dist

    assert gates.keys() == gates_before.keys()
    assert all(not torch.equal(gates[n], gates_before[n]) for n in gates), "a gate did not move"
    flat = torch.cat([gates[n].flatten() for n in sorted(gates)])
    per_rank = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, flat)
    assert all(torch.equal(per_rank[0], other) for other in per_rank[1:]), "the gates differ across ranks"
    print(f"{label}: {len(gates)} {GATE} tensors identical on both ranks", flush=True)


class DiselOptimizerMixin:
    """For a transformers `Trainer` (or TRL's): `create_optimizer` puts the DISeL gates in their own group at
    `gate_lr_ratio` x the learning rate, with `create_disel_optimizer`.

    Under DeepSpeed, `Trainer(optimizers=(optimizer, None))` is not enough: transformers' `deepspeed_init` drops a passed
    optimizer (`trainer.optimizer = None`) and calls `create_optimizer`, which would build the default AdamW with the
    gates at the LoRA lr.
    """

    gate_lr_ratio = 5.0

    def create_optimizer(self, model=None):
        from peft.optimizers import create_disel_optimizer

        if self.optimizer is None:
            self.optimizer = create_disel_optimizer(
                self.model if model is None else model,
                torch.optim.AdamW,
                lr=self.args.learning_rate,
                gate_lr_ratio=self.gate_lr_ratio,
                weight_decay=self.args.weight_decay,
            )
        return self.optimizer


def probe_ids():
    """A fixed batch to compare the outputs of a trained model with those of its reloaded adapter."""
    tokenizer = make_tokenizer()
    text = ["the cat sat on the mat .", "what colour is the sky ? blue ."]
    return tokenizer(text, padding=True, return_tensors="pt")


TRAIN_TEXT = [
    "the cat sat on the mat .",
    "the dog ran under the tree .",
    "a bird flew in the sky .",
    "a fish swam in the sea .",
    "the red cat sat on a blue mat .",
    "the big dog ran in the sea .",
]


def lm_batch(texts):
    """A padded causal LM batch with labels (padding left out of the loss)."""
    batch = make_tokenizer()(texts, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch
