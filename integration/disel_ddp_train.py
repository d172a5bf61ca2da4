"""Trains a tiny DISeL model with DDP through accelerate on 2 CPU processes (gloo); launched by test_distributed.py.

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        integration/disel_ddp_train.py --base_dir BASE --output_dir OUT

(`accelerate launch --cpu --num_processes 2` starts a single process, hence the world size check.) Each rank trains on
its own examples, so only DDP's gradient all-reduce keeps the replicas equal; the gates are compared across ranks, and
each rank writes what it found to OUT/rank<rank>.json. Rank 0 saves the adapter and the outputs of the trained model on
a fixed batch (OUT/outputs.pt).
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing_support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from disel_integration_utils import (
    disel_config,
    gate_report,
    gate_state,
    lm_batch,
    parse_launch_args,
    probe_ids,
)
from disel_testing import TRAIN_TEXT, write_rank_result

from peft import get_peft_model
from peft.optimizers import create_disel_optimizer


def main():
    args = parse_launch_args()

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    backend = torch.distributed.get_backend()
    print(f"DDP rank {rank}: world size {world}, backend {backend}", flush=True)
    assert world == 2, f"expected 2 processes, got {world}"

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.base_dir), disel_config())
    gates_before = gate_state(model)
    optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=args.lr, gate_lr_ratio=5.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, DistributedDataParallel), type(model)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [args.lr, args.lr * 5.0]

    model.train()
    for step in range(args.steps):
        batch = lm_batch(TRAIN_TEXT[rank::world])
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        print(f"DDP rank {rank}: step {step} loss {loss.item():.4f}", flush=True)

    peft_model = accelerator.unwrap_model(model)
    gates = gate_state(peft_model)
    report = gate_report(gates, gates_before, f"DDP rank {rank}")
    write_rank_result(args.output_dir, rank, world_size=world, backend=backend, **report)

    if accelerator.is_main_process:
        peft_model.eval()
        peft_model.save_pretrained(Path(args.output_dir) / "adapter")
        with torch.no_grad():
            logits = peft_model(**probe_ids()).logits
        torch.save({"logits": logits, "world_size": world}, Path(args.output_dir) / "outputs.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
