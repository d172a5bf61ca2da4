"""Evaluation: target-task accuracy (greedy exact match), perplexity on retention texts, zero-shot sentiment accuracy.

All functions take a causal LM (a plain model or a PeftModel) and its tokenizer (left padding), run without gradients
on the model's device and show a tqdm progress bar.
"""

import math
import re
import time

import torch
import torch.nn.functional as F
from data import prompt
from device import input_device
from tqdm.auto import tqdm


ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)
NUMBER = re.compile(r"-?\d+")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding (transformers' forward counts from the first column otherwise)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def parse_answer(text: str):
    """The N of "The answer is N" in a generated answer; without that phrase, its first integer; else None."""
    m = ANSWER.search(text) or NUMBER.search(text)
    return int(m.group(1) if m.re is ANSWER else m.group(0)) if m else None


@torch.no_grad()
def arithmetic_accuracy(model, tokenizer, problems, batch_size=32, max_new_tokens=40, desc="arithmetic", keep=5):
    """Greedy decoding, exact match of the parsed answer (see `parse_answer`); returns (accuracy, examples, correct):
    the first `keep` problems with their generated text, and 1 or 0 for every problem in order."""
    model.eval()
    device = input_device(model)
    correct, shown = [], []
    bar = tqdm(total=len(problems), desc=desc, unit="q", leave=False)
    for chunk in batches(problems, batch_size):
        enc = tokenizer([prompt(p.question) for p in chunk], return_tensors="pt", padding=True).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for p, text in zip(chunk, texts):
            ok = parse_answer(text) == p.answer
            correct.append(int(ok))
            if len(shown) < keep:
                shown.append({"question": p.question, "answer": p.answer, "generated": text, "correct": bool(ok)})
        bar.update(len(chunk))
    bar.close()
    return sum(correct) / max(len(problems), 1), shown, correct


def text_chunks(tokenizer, text: str, seq_len: int, n_chunks: int) -> torch.Tensor:
    """`n_chunks` windows of `seq_len` tokens spread evenly over `text` (deterministic), as a (n, seq_len) tensor."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if len(ids) < seq_len:
        raise ValueError(f"text too short for perplexity: {len(ids)} tokens < seq_len={seq_len}")
    n_chunks = min(n_chunks, len(ids) // seq_len)
    starts = torch.linspace(0, len(ids) - seq_len, n_chunks).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, chunks: torch.Tensor, batch_size=4, desc="perplexity", on_batch=None):
    """Token-level perplexity of the model on the (n, seq_len) chunks (every token but the first of each chunk)."""
    model.eval()
    device = input_device(model)
    nll, count = 0.0, 0
    for batch in tqdm(list(batches(chunks, batch_size)), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


SENTIMENT_PROMPT = "Review: {text}\nIs this review positive or negative? Answer:"


def label_token_ids(tokenizer):
    """First token ids of " positive" and " negative" (they must differ)."""
    ids = [tokenizer(f" {w}", add_special_tokens=False)["input_ids"][0] for w in ("positive", "negative")]
    if ids[0] == ids[1]:
        raise ValueError("the tokenizer gives ' positive' and ' negative' the same first token")
    return ids


@torch.no_grad()
def sentiment_accuracy(model, tokenizer, examples, batch_size=16, desc="sentiment"):
    """Zero-shot: the label whose first token gets the higher next-token logit after the prompt."""
    model.eval()
    pos_id, neg_id = label_token_ids(tokenizer)
    device = input_device(model)
    correct = 0
    for chunk in tqdm(list(batches(examples, batch_size)), desc=desc, unit="batch", leave=False):
        enc = tokenizer([SENTIMENT_PROMPT.format(text=e.text) for e in chunk], return_tensors="pt", padding=True)
        enc = enc.to(device)
        logits = (
            model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=position_ids(enc["attention_mask"]),
                logits_to_keep=1,
            )
            .logits[:, -1]
            .cpu()
        )
        pred = ["positive" if p > n else "negative" for p, n in zip(logits[:, pos_id], logits[:, neg_id])]
        correct += sum(p == e.label for p, e in zip(pred, chunk))
    return correct / max(len(examples), 1)


def evaluate_model(model, tokenizer, problems, chunks, sentiment, eval_batch_size, recorder=None) -> dict:
    """Target accuracy on `problems`, perplexity on each retention set of `chunks` and zero-shot sentiment accuracy.

    Args:
        model: A causal LM or a PeftModel (left-padding tokenizer).
        tokenizer: Its tokenizer.
        problems (`list`): The arithmetic problems to answer by greedy decoding.
        chunks (`dict[str, torch.Tensor]`): The perplexity windows of each retention text (see `text_chunks`).
        sentiment (`list`): The labelled sentiment examples.
        eval_batch_size (`int`): The batch of greedy decoding and of sentiment scoring.
        recorder (`DiselGateRecorder`, *optional*): Records the gates during the retention windows (the
            out-of-domain split of the gate diagnostics).

    Returns:
        `dict`: target_acc, n_problems, correct (1/0 per problem, in order), ppl, sentiment_acc, eval_seconds and a
        few examples.
    """
    t0 = time.time()
    acc, examples, correct = arithmetic_accuracy(model, tokenizer, problems, batch_size=eval_batch_size)
    if recorder is not None:
        recorder.set_split("retention text (out-of-domain)")
        recorder.start()
    ppl = {name: perplexity(model, c, batch_size=4, desc=f"ppl {name}") for name, c in chunks.items()}
    if recorder is not None:
        recorder.stop()
    sent = sentiment_accuracy(model, tokenizer, sentiment, batch_size=eval_batch_size)
    return {
        "target_acc": acc,
        "n_problems": len(problems),
        "correct": correct,
        "ppl": ppl,
        "sentiment_acc": sent,
        "eval_seconds": time.time() - t0,
        "examples": examples,
    }
