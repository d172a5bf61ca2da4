"""Parameter and FLOP formulas of LoRA and the DISeL gate on Llama's linear layers, and the parameter table (checked
against an instantiated model)."""

from models import BOTTLENECK, SMALL, Shape


def llama_linears(hidden, inter, kv=None):
    """(d_in, d_out) of the seven linear layers of a Llama decoder layer."""
    kv = kv or hidden
    return [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]


def lora_count(linears, r, layers):
    return layers * sum(r * (d_in + d_out) for d_in, d_out in linears)


def gate_count(linears, r, layers, k=None):
    """The gate's parameters: r * (d_in + 1) per layer, or with a bottleneck of k: k * (d_in + r) + r."""
    return layers * sum(k * (d_in + r) + r if k else r * (d_in + 1) for d_in, _ in linears)


def flop_ratios(shape: Shape, r: int, bottleneck=None) -> tuple:
    """DISeL/LoRA ratio of matmul FLOPs per token (train, infer): a floor for the time ratio of compute-bound runs.

    The frozen base costs its forward and the input-gradient GEMMs in backward (2x), the adapters also their weight
    gradients (3x); causal attention is counted at half the sequence, the LM head when the model has one.
    """
    hidden, layers = shape.hidden_size, shape.num_hidden_layers
    linears = llama_linears(hidden, shape.intermediate_size)
    base = layers * (sum(i * o for i, o in linears) + 2 * (shape.seq // 2) * hidden)
    if shape.lm_head:
        base += hidden * shape.vocab_size
    lora, gate = lora_count(linears, r, layers), gate_count(linears, r, layers, bottleneck)
    train = (2 * base + 3 * (lora + gate)) / (2 * base + 3 * lora)
    return train, (base + lora + gate) / (base + lora)


def param_table(checked_model=None):
    """Print LoRA's and the gate's trainable parameters; with `checked_model` (the small Llama carrying adapters named
    `<variant>_r<rank>`), check the gate formula against its parameters."""
    print("\nTrainable parameters (all-linear): LoRA, and what the DISeL gate adds on top")
    print(
        f"{'model':<22}{'r':>4}{'LoRA':>13}{'full gate':>13}{'(%LoRA)':>9}{'gate b4':>11}{'(%)':>7}{'gate b8':>11}{'(%)':>7}"
    )
    models = [
        ("small Llama (4 layers)", llama_linears(SMALL.hidden_size, SMALL.intermediate_size), 4),
        ("Llama-2-7B (32 layers)", llama_linears(4096, 11008), 32),
    ]
    for name, linears, layers in models:
        for r in (16, 64):
            lora = lora_count(linears, r, layers)
            full, b4, b8 = (gate_count(linears, r, layers, k) for k in (None, 4, 8))
            print(
                f"{name:<22}{r:>4}{lora:>13,}{full:>13,}{100 * full / lora:>8.1f}%{b4:>11,}{100 * b4 / lora:>6.1f}%"
                f"{b8:>11,}{100 * b8 / lora:>6.1f}%"
            )
    if checked_model is not None:
        check_gate_counts(checked_model)
        print("(gate counts checked against the instantiated small model)")


def check_gate_counts(model):
    """Raise if a gate of `model` (the small Llama) has another parameter count than `gate_count` says."""
    counts = {}
    for pname, p in model.named_parameters():
        if ".lora_disel_gate." in pname:
            adapter = pname.split(".lora_disel_gate.")[1].split(".")[0]
            counts[adapter] = counts.get(adapter, 0) + p.numel()
    linears = llama_linears(SMALL.hidden_size, SMALL.intermediate_size)
    for adapter, n in counts.items():
        variant, r = adapter.rsplit("_r", 1)
        expected = gate_count(linears, int(r), 4, BOTTLENECK if variant.startswith("disel_b") else None)
        if n != expected:
            raise AssertionError(f"{adapter} lora_disel_gate: {n} parameters, formula says {expected}")
