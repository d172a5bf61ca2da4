"""The tiny Llama and the jsonl dataset of the Axolotl tests, written to a folder (nothing from the Hub).

python make_fixtures.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "testing_support"))

from disel_testing import HEAD64_LLAMA, llama_config, make_tokenizer  # noqa: E402


TEXTS = [
    "the cat sat on the mat .",
    "the dog ran under the tree .",
    "a bird flew in the sky .",
    "a fish swam in the sea .",
    "what colour is the sky ? blue .",
    "what colour is the tree ? green .",
    "where is the cat ? on the mat .",
    "where is the fish ? in the sea .",
    "the red cat sat on a blue mat .",
    "the big dog ran in the sea .",
    "how many dogs ? two . how many cats ? three .",
    "one two three four five .",
]


def write_base(folder: Path) -> Path:
    """A random 2-layer float32 Llama (hidden 128, 2 query heads of 64, 1 key/value head) and its tokenizer."""
    from transformers import LlamaForCausalLM

    config = llama_config(**HEAD64_LLAMA)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_dataset(path: Path, repeat: int = 8) -> Path:
    """`{"text": ...}` lines for Axolotl's `type: completion`."""
    path.write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(repeat) for text in TEXTS))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    write_base(out / "base")
    write_dataset(out / "data.jsonl")
