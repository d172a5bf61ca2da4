"""DISeL helpers of the integration tests: the adapter config, training data, the gate checks of the launched scripts
and the optimizer of a `Trainer`. The tiny model and its tokenizer are in testing_support/disel_testing.py.

Imported by path (the test files put this folder and testing_support/ on sys.path), also by the scripts the
distributed tests launch.
"""

import argparse

import torch
from disel_testing import GATE, gate_tensors, make_tokenizer, read_rank_results


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


def gate_report(gates, gates_before, label):
    """What a rank of a launched script found of its gates after training, for its per-rank result: how many, whether
    every one moved from `gates_before`, and whether every rank holds the same values (a collective: all ranks call it
    together). Also printed, for the log."""
    import torch.distributed as dist

    assert gates.keys() == gates_before.keys()
    moved = all(not torch.equal(gates[n], gates_before[n]) for n in gates)
    flat = torch.cat([gates[n].flatten() for n in sorted(gates)])
    per_rank = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, flat)
    identical = all(torch.equal(per_rank[0], other) for other in per_rank[1:])
    print(f"{label}: {len(gates)} {GATE} tensors, all moved {moved}, identical on all ranks {identical}", flush=True)
    return {"gate_tensors": len(gates), "gates_moved": moved, "gates_identical": identical}


def check_rank_results(folder, **expected):
    """Reads the per-rank results of a 2-process launch from `folder` and checks them: both ranks ran in a world of
    2 on gloo, every gate of the adapter ("all-linear") moved and both ranks hold the same gates, and each field of
    `expected` has its value on both ranks. Returns the results, in rank order."""
    results = read_rank_results(folder, world_size=2)
    for result in results:
        assert result["world_size"] == 2 and result["backend"] == "gloo", result
        assert result["gate_tensors"] == gate_tensors(), result
        assert result["gates_moved"], f"rank {result['rank']}: a gate did not move"
        assert result["gates_identical"], f"rank {result['rank']}: the gates differ across ranks"
        assert {k: result[k] for k in expected} == expected, result
    return results


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


def lm_batch(texts):
    """A padded causal LM batch with labels (padding left out of the loss)."""
    batch = make_tokenizer()(texts, padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch
