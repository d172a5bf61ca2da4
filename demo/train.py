"""Fine-tuning for the demo: the same data, rank, targets, steps and LoRA learning rate for every method.

- "lora":  plain LoRA, AdamW over all adapter parameters.
- "disel": LoRA with DISeL gates (`LoraConfig(use_disel=True)`), optimizer from `peft.optimizers.create_disel_optimizer`
  (gates at `gate_lr_ratio` x the LoRA lr, no weight decay on the gates).
- "dora":  DoRA (`use_dora=True`), an optional extra reference point.

On a bitsandbytes 4-bit/8-bit base (QLoRA), the model first goes through `peft.prepare_model_for_kbit_training`.
"""

import math
import random
import time

import torch
import torch.nn.functional as F
from data import prompt, target
from device import input_device
from evaluate import position_ids
from model import DemoError
from settings import METHODS, TrainConfig
from tqdm.auto import tqdm


def lora_config(method: str, cfg: TrainConfig):
    from peft import DiselConfig, LoraConfig

    kwargs = {
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(cfg.targets),
        "layers_to_transform": None if cfg.layers is None else list(cfg.layers),
        "task_type": "CAUSAL_LM",
    }
    if method == "disel":
        disel = DiselConfig(gate_bias_init=cfg.gate_bias_init, gate_bottleneck_dim=cfg.gate_bottleneck_dim)
        return LoraConfig(use_disel=disel, **kwargs)
    if method == "dora":
        return LoraConfig(use_dora=True, **kwargs)
    if method == "lora":
        return LoraConfig(**kwargs)
    raise ValueError(f"unknown method {method!r}, expected one of {METHODS}")


def make_optimizer(model, method: str, cfg: TrainConfig):
    """AdamW at the LoRA lr; for DISeL through peft's `create_disel_optimizer` (gates at gate_lr_ratio x lr, no decay)."""
    if method == "disel":
        from peft.optimizers import create_disel_optimizer

        return create_disel_optimizer(
            model, torch.optim.AdamW, lr=cfg.lr, gate_lr_ratio=cfg.gate_lr_ratio, weight_decay=cfg.weight_decay
        )
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainConfig):
    warm = max(1, int(cfg.warmup * cfg.steps))

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    return f


def encode_batch(tokenizer, problems):
    """Left-padded prompt+answer+eos ids, attention mask, and the number of trailing positions that carry the loss."""
    eos = tokenizer.eos_token_id
    rows, n_target = [], 0
    for p in problems:
        q = tokenizer(prompt(p.question), add_special_tokens=False)["input_ids"]
        a = tokenizer(target(p), add_special_tokens=False)["input_ids"] + [eos]
        rows.append((q, a))
        n_target = max(n_target, len(a))
    length = max(len(q) + len(a) for q, a in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (q, a) in enumerate(rows):
        seq = q + a
        ids[i, length - len(seq) :] = torch.tensor(seq)
        mask[i, length - len(seq) :] = 1
        labels[i, length - len(a) :] = torch.tensor(a)
    return ids, mask, labels, n_target


def answer_loss(model, ids, mask, labels, n_target):
    """Cross-entropy on the answer tokens only; with left padding they are the last positions of every row, so only
    `n_target + 1` positions go through the LM head."""
    keep = n_target + 1
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep, use_cache=False
    ).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, -n_target:].flatten(), ignore_index=-100)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(model, tokenizer, problems, method: str, cfg: TrainConfig, desc=None):
    """Wrap `model` with the method's adapter, train it; returns (peft_model, info dict)."""
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    if cfg.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    try:
        peft_model = get_peft_model(model, lora_config(method, cfg))
    except ValueError as e:
        raise DemoError(
            f"Could not add the {method} adapter: {e}\nChoose --targets (module names) and --layers that exist in "
            "this model."
        ) from e
    optimizer = make_optimizer(peft_model, method, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    rng = random.Random(cfg.seed)
    device = input_device(peft_model)
    order = []
    losses = []
    peft_model.train()
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc=desc or f"train {method}", unit="step", leave=False)
    for _ in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(problems)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [problems[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        ids, mask, labels, n_target = encode_batch(tokenizer, batch)
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        loss = answer_loss(peft_model, ids, mask, labels, n_target)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    peft_model.eval()
    info = {
        "train_seconds": time.time() - t0,
        "trainable_params": count_trainable(peft_model),
        "loss_first10": sum(losses[:10]) / max(1, len(losses[:10])),
        "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "losses": [round(x, 4) for x in losses],
        "optimizer_groups": [
            {
                "n_params": sum(p.numel() for p in g["params"]),
                "lr": g.get("initial_lr", g["lr"]),
                "weight_decay": g["weight_decay"],
            }
            for g in optimizer.param_groups
        ],
    }
    return peft_model, info
