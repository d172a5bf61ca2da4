"""The demo's settings, each default in one place: `make demo` (run_demo.py), `make frontier` (frontier.py) and the
tests build their runs from these dataclasses.

As in transformers' example scripts, each group of settings is a dataclass whose fields carry their command-line help;
`add_arguments` turns the fields into `--kebab-case` flags and `from_args` reads them back from the parsed namespace.
A field with `metadata={"flag": None}` has no flag (it is set by the script, not the user).
"""

import argparse
import dataclasses
from dataclasses import dataclass, field


ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("lora", "disel", "dora")


def parse_layers(text: str) -> tuple | None:
    """'all', 'a-b' (inclusive) or a comma list of layer indices; None for all layers.

    Args:
        text (`str`): The layers as given on the command line.
    """
    if text in ("all", ""):
        return None
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return tuple(sorted(set(out)))


def parse_names(text: str) -> tuple:
    """A comma list of names, as a tuple without empty entries."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def format_layers(layers) -> str:
    """The command-line form of `layers` (see `parse_layers`)."""
    if layers is None:
        return "all"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


@dataclass
class TrainConfig:
    """The adapter and its training: what every method (LoRA, DISeL, DoRA) of one run shares."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: int | None = field(default=None, metadata={"help": "lora_alpha (default: 2 x rank)"})
    targets: tuple = field(
        default=ALL_TARGETS, metadata={"help": "comma list of module names to adapt", "parse": parse_names}
    )
    layers: tuple | None = field(
        default=tuple(range(20, 30)),
        metadata={
            "help": "layers to adapt: 'all', 'a-b' or '0,3,5' (default: 20-29, the top 10 of SmolLM2-135M)",
            "parse": parse_layers,
        },
    )
    steps: int = field(default=80, metadata={"help": "optimizer steps per method"})
    batch_size: int = field(default=8, metadata={"help": "problems per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "LoRA learning rate, the same for every method"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the LoRA weights"})
    warmup: float = field(default=0.1, metadata={"flag": None})  # linear warm-up share, then cosine decay
    gate_bias_init: float = field(
        default=-3.0, metadata={"flag": "--gate-bias", "help": "DISeL gate bias init (paper: -3)"}
    )
    gate_lr_ratio: float = field(default=5.0, metadata={"help": "DISeL gate lr / LoRA lr (paper: 5)"})
    gate_bottleneck_dim: int | None = field(default=None, metadata={"flag": None})  # DiselConfig.gate_bottleneck_dim
    seed: int = field(default=0, metadata={"help": "training seed: adapter init and the order of training problems"})
    quantized: bool = field(default=False, metadata={"flag": None})  # a bitsandbytes base (set from --quantize)
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "with --quantize: gradient checkpointing (prepare_model_for_kbit_training's default; off here, as "
            "the activations of short problems are small and it costs time)"
        },
    )

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2 * self.rank
        self.targets = tuple(self.targets)
        self.layers = None if self.layers is None else tuple(self.layers)


@dataclass
class DataConfig:
    """The problem sets and the retention and sentiment samples (drawn once, the same for every training seed)."""

    n_train: int = field(default=2000, metadata={"help": "training problems (a pool; steps x batch are drawn)"})
    n_val: int = field(default=100, metadata={"help": "validation problems (for tuning, --eval-on val)"})
    n_test: int = field(default=150, metadata={"help": "held-out test problems"})
    n_sentiment: int = field(default=100, metadata={"help": "sentiment examples"})
    data_seed: int = field(
        default=0,
        metadata={
            "help": "seed of the problem sets and of the retention and sentiment samples (the same for every "
            "training seed)"
        },
    )


@dataclass
class EvalConfig:
    """How a model is evaluated: perplexity windows and the batch of greedy decoding."""

    ppl_chunks: int = field(default=4, metadata={"help": "windows per retention text"})
    ppl_seq_len: int = field(default=256, metadata={"help": "tokens per perplexity window"})
    # batched greedy decoding with left padding can flip answers, so it is part of a result's identity
    eval_batch_size: int = field(default=25, metadata={"help": "batch of greedy decoding and of sentiment scoring"})


def _flag(f) -> str | None:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_arguments(parser: argparse.ArgumentParser, cls, skip=(), defaults=None) -> None:
    """Add a flag for every field of the dataclass `cls` (except those in `skip` or without a flag).

    Args:
        parser (`argparse.ArgumentParser`): The parser to extend.
        cls: A settings dataclass of this module.
        skip (`tuple[str]`): Field names that get no flag here (the caller sets them another way).
        defaults (`dict`, *optional*): Other defaults for some fields, shown in the help.
    """
    defaults = defaults or {}
    group = parser.add_argument_group(cls.__name__, cls.__doc__)
    for f in dataclasses.fields(cls):
        flag = _flag(f)
        if flag is None or f.name in skip:
            continue
        default = defaults.get(f.name, f.default)
        help_text = f.metadata.get("help", "")
        if f.type is bool:
            group.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        parse = f.metadata.get("parse")
        if parse is not None:
            shown = format_layers(default) if parse is parse_layers else ",".join(default)
            suffix = "" if "default" in help_text else f" (default: {shown})"
            group.add_argument(flag, dest=f.name, type=parse, default=default, help=help_text + suffix)
        else:
            kind = {int: int, float: float, int | None: int, float | None: float}.get(f.type, str)
            suffix = "" if default is None or "default" in help_text else f" (default: {default})"
            group.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text + suffix)


def from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of `cls` from the parsed flags; `overrides` (and the class defaults) give the other fields."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
