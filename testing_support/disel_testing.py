"""What the fork's own tests share: the tiny Llama and its tokenizer, the DISeL tensor counts, a free port, the
environment of launched processes, and the per-rank JSON results of launched scripts.

Its users: integration/ (the tests and the scripts they launch), vllm_disel/tests/ (run in the vLLM venv) and
demo/test_demo.py. The venvs cannot import each other's packages, so this is a plain file that each puts on
`sys.path` (`<repository>/testing_support`); it imports only the standard library at the top, and transformers and
tokenizers (present in every venv) inside the functions that need them.
"""

import json
import os
import socket
from pathlib import Path


# every word the tests use (anything else would be <unk>)
WORDS = [
    *["the", "a", "is", "was", "it", "and", "of", "on", "in", "under", "what", "where", "how", "many"],
    *["cat", "dog", "bird", "fish", "mat", "tree", "sky", "sea", "sat", "ran", "flew", "swam"],
    *["big", "small", "red", "blue", "green", "colour", "yes", "no", "question", "answer"],
    *["one", "two", "three", "four", "five"],
]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
# sentences in that vocabulary to train the tiny Llama on
TRAIN_TEXT = [
    "the cat sat on the mat .",
    "the dog ran under the tree .",
    "a bird flew in the sky .",
    "a fish swam in the sea .",
    "the red cat sat on a blue mat .",
    "the big dog ran in the sea .",
]

# the tiny Llama's shape: 2 decoder layers, 64 wide (the width of bitsandbytes' 4-bit block), 4 query heads of 16
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
# a tiny Llama with heads 64 wide, a head size that vLLM's and llama.cpp's kernels take: 2 query heads, 1 key/value head
HEAD64_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "tie_word_embeddings": False,
    "dtype": "float32",
}
# prompts in that vocabulary, for the suites that compare generated tokens (vLLM, llama.cpp)
PROMPTS = [
    "the cat sat on the",
    "a bird flew in",
    "what colour is the sky ?",
    "the big dog ran under",
    "where is the small fish ?",
    "one two three",
]
# the linear layers of a Llama decoder layer ("all-linear" targets all of them)
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# the name of DISeL's gate modules in a PEFT model's parameter and state-dict keys
GATE = "lora_disel_gate"


def gate_tensors(modules: int = len(LLAMA_LINEAR), layers: int = TINY_LLAMA["num_hidden_layers"]) -> int:
    """How many gate tensors a DISeL adapter on `modules` linear layers per decoder layer has: a weight and a bias
    each (28 for "all-linear" on the tiny Llama)."""
    return 2 * modules * layers


def adapter_tensors(modules: int = len(LLAMA_LINEAR), layers: int = TINY_LLAMA["num_hidden_layers"]) -> int:
    """How many trainable tensors a DISeL adapter on `modules` linear layers per decoder layer has: lora_A, lora_B and
    the gate's weight and bias each (56 for "all-linear" on the tiny Llama)."""
    return 4 * modules * layers


def make_tokenizer():
    """A word-level tokenizer built in code (nothing from the Hub): specials, `WORDS`, and punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + list(".,:?!"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def llama_config(tokenizer=None, **shape):
    """A LlamaConfig of the given shape for `tokenizer` (by default `make_tokenizer()`): its vocabulary size (equal, or
    lm-eval resizes the embeddings before loading an adapter) and special tokens; 256 positions unless given.

    Args:
        tokenizer: the tokenizer the model is for; `make_tokenizer()` when None.
        shape: LlamaConfig arguments, e.g. `**TINY_LLAMA`; they override the tokenizer's ids too.
    """
    from transformers import LlamaConfig

    tokenizer = make_tokenizer() if tokenizer is None else tokenizer
    return LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "max_position_embeddings": 256,
            **shape,
        }
    )


def make_base_model(seed: int = 0):
    """The tiny random LlamaForCausalLM (`TINY_LLAMA`) for `make_tokenizer`, the same for the same seed."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(**TINY_LLAMA)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_base_model(folder) -> Path:
    """Saves the tiny model and its tokenizer to `folder` (a local model directory for from_pretrained)."""
    folder = Path(folder)
    make_base_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (another process may take it before it is bound again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(*, hide_gpus: bool = True, drop: tuple = (), **updates) -> dict:
    """The environment of a process a test launches: this one's, offline, one thread per process (the machine's cores
    are shared), and by default no GPU.

    Args:
        hide_gpus: set CUDA_VISIBLE_DEVICES to "" (a CPU run also on a machine with a GPU).
        drop: names of variables to leave out.
        updates: variables to set (strings).
    """
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(updates)
    return env


def write_rank_result(folder, rank: int, **fields) -> Path:
    """Writes what rank `rank` of a launched script found to `folder/rank<rank>.json`, for the test to read with
    `read_rank_results` (instead of parsing printed lines)."""
    path = Path(folder) / f"rank{rank}.json"
    path.write_text(json.dumps({"rank": rank, **fields}, indent=1))
    return path


def read_rank_results(folder, world_size: int) -> list[dict]:
    """The results of ranks 0 .. world_size - 1 that `write_rank_result` wrote to `folder`, in rank order; fails if a
    rank wrote none, or if another rank did."""
    folder = Path(folder)
    found = sorted(p.name for p in folder.glob("rank*.json"))
    expected = sorted(f"rank{rank}.json" for rank in range(world_size))
    assert found == expected, f"expected the results of {world_size} ranks in {folder}, found {found}"
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def run_launched(cmd: list, *, env: dict, timeout: float, cwd=None) -> str:
    """Runs `cmd` (a launcher or a script) to the end and returns its output (stdout and stderr); fails with the end of
    that output if it exits with an error."""
    import subprocess

    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n{output[-6000:]}"
    return output
