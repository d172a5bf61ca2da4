"""The benchmark's models and training step: Llama shapes built from configs (no Hub access), float32, and the
adapters of each variant (`target_modules="all-linear"`, `lora_dropout=0`)."""

from dataclasses import dataclass


BOTTLENECK = 8  # the rank of the bottleneck gate variant (`disel_b8`)


@dataclass(frozen=True)
class Shape:
    """A Llama shape and the batch the benchmark feeds it.

    Args:
        name (`str`): The shape's name (in the memory processes' job).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size (`int`): The LlamaConfig.
        batch (`int`): Sequences per step.
        seq (`int`): Tokens per sequence.
        lm_head (`bool`): A LlamaForCausalLM with its LM head and loss; without, a LlamaModel whose loss is a function
            of the hidden states (so that one decoder block dominates).
    """

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    batch: int
    seq: int
    lm_head: bool = True

    def config(self, **kwargs):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            vocab_size=self.vocab_size,
            attn_implementation="sdpa",
            **kwargs,
        )


# the small Llama; its MLP width is a multiple of 64: bitsandbytes' 4-bit inference on CPUs with AVX512-BF16 repacks
# the weights in blocks of 64 input features, and fails on a width that is not one
SMALL = Shape("small", 512, 1408, 4, 8, 8000, batch=4, seq=256)
# one Llama-2-7B decoder layer; a tiny vocabulary so that the block dominates
BLOCK = Shape("block", 4096, 11008, 1, 32, 32, batch=1, seq=128, lm_head=False)
# decoding: the width at which DISeL's per-layer ops show next to the GEMMs at batch 1; `seq` is the prompt
DECODE = Shape("decode", 1024, 2816, 4, 16, 8000, batch=1, seq=16)
SHAPES = {s.name: s for s in (SMALL, BLOCK, DECODE)}


def lora_config(variant: str, r: int):
    """The LoraConfig of `variant`: lora, dora, disel or disel_b8 (DISeL with a bottleneck gate)."""
    from peft import DiselConfig, LoraConfig

    kwargs = {"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear", "lora_dropout": 0.0}
    if variant == "dora":
        kwargs["use_dora"] = True
    elif variant == "disel":
        kwargs["use_disel"] = True
    elif variant == f"disel_b{BOTTLENECK}":
        kwargs["use_disel"] = DiselConfig(gate_bottleneck_dim=BOTTLENECK)
    elif variant != "lora":
        raise ValueError(variant)
    return LoraConfig(**kwargs)


def build_base(shape: Shape, device, seed: int = 0, use_cache: bool = False):
    """The model of `shape` in float32 on `device` (random weights, the same for the same seed)."""
    import torch
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    model = (LlamaForCausalLM if shape.lm_head else LlamaModel)(shape.config(use_cache=use_cache))
    return model.float().to(device)


def save_small_base(folder: str, device) -> str:
    """The small Llama (float32, same seed as `build_base`) saved to `folder`, to be loaded back in 4-bit."""
    build_base(SMALL, device).save_pretrained(folder)
    return folder


def load_4bit(folder: str, device):
    """The saved small Llama loaded in 4-bit (nf4, float32 compute) on `device` and prepared for k-bit training."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from peft import prepare_model_for_kbit_training

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    # bitsandbytes quantizes the weights where device_map places them: its CPU or its CUDA kernels
    device_map = "cpu" if device.type == "cpu" else {"": device.index or 0}
    model = LlamaForCausalLM.from_pretrained(
        folder, quantization_config=quant, device_map=device_map, dtype=torch.float32, attn_implementation="sdpa"
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def make_optimizer(params):
    import torch

    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except RuntimeError:  # a torch without the fused CPU kernel
        return torch.optim.AdamW(params, lr=1e-5)


def batch_for(shape: Shape, device, seq: int | None = None):
    """Random token ids for `shape` (`shape.batch` x `seq`, default `shape.seq`)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, shape.vocab_size, (shape.batch, seq or shape.seq), generator=gen).to(device)


def loss_of(model, ids, shape: Shape):
    if not shape.lm_head:
        return model(input_ids=ids).last_hidden_state.pow(2).mean()
    return model(input_ids=ids, labels=ids).loss


def train_step(model, optimizer, ids, shape: Shape):
    loss_of(model, ids, shape).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
