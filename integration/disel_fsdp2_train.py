"""Trains a tiny DISeL model with FSDP2 (`fully_shard`) on 2 CPU processes (gloo); launched by test_distributed.py.

    torchrun --nproc_per_node 2 integration/disel_fsdp2_train.py --base_dir BASE --output_dir OUT

The adapters are injected first, then each decoder layer and the whole model are sharded, and the optimizer is created
on the sharded parameters. After training, the full state dict is gathered to compare the gates across ranks (each rank
writes what it found to OUT/rank<rank>.json), and rank 0 saves the adapter from it through PEFT and the outputs of the
trained model on a fixed batch (OUT/outputs.pt).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing_support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from disel_integration_utils import disel_config, gate_report, lm_batch, parse_launch_args, probe_ids
from disel_testing import GATE, TRAIN_TEXT, write_rank_result

from peft import get_peft_model
from peft.optimizers import create_disel_optimizer


def main():
    args = parse_launch_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    print(f"FSDP2 rank {rank}: world size {world}, backend {backend}", flush=True)
    assert world == 2, f"expected 2 processes, got {world}"
    mesh = init_device_mesh("cpu", (world,))

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.base_dir), disel_config())
    gates_before = {n: p.detach().clone() for n, p in model.named_parameters() if GATE in n}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    gate_params = [p for n, p in model.named_parameters() if GATE in n]
    assert gate_params and all(isinstance(p, DTensor) for p in gate_params), "the gates are not sharded"
    # created after sharding, so that it holds the sharded parameters; names are unchanged by fully_shard
    optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=args.lr, gate_lr_ratio=5.0)
    assert sorted(g["lr"] for g in optimizer.param_groups) == [args.lr, args.lr * 5.0]

    model.train()
    for step in range(args.steps):
        batch = lm_batch(TRAIN_TEXT[rank::world])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"FSDP2 rank {rank}: step {step} loss {loss.item():.4f}", flush=True)

    # the full (unsharded) state dict on every rank, to compare the gates
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    gates = {n: t for n, t in full.items() if GATE in n}
    report = gate_report(gates, gates_before, f"FSDP2 rank {rank}")
    write_rank_result(args.output_dir, rank, world_size=world, backend=backend, **report)

    # every rank runs the forward (it gathers the shards); rank 0 keeps the outputs
    model.eval()
    with torch.no_grad():
        logits = model(**probe_ids()).logits
    # with cpu_offload, only rank 0 receives the full state dict
    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(Path(args.output_dir) / "adapter", state_dict=state_dict)
        torch.save({"logits": logits, "world_size": world}, Path(args.output_dir) / "outputs.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
