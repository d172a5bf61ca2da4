"""Trains a tiny DISeL model with transformers' `Trainer` and DeepSpeed ZeRO on CPU (gloo); run by test_deepspeed.py.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 integration/disel_deepspeed_train.py --stage 3 \
        --base_dir BASE --output_dir OUT
    python integration/disel_deepspeed_train.py --stage 0 --base_dir BASE --output_dir OUT   # the reference

The path users take: `TrainingArguments(deepspeed=<config dict>)` is created before the model, so that with ZeRO-3
`from_pretrained` builds the base model partitioned (under `deepspeed.zero.Init`); the adapters are injected with
`get_peft_model`, the optimizer comes from `create_disel_optimizer` in the Trainer's `create_optimizer` (under
DeepSpeed, transformers ignores `Trainer(optimizers=...)`), and `trainer.save_model()` saves the adapter (ZeRO-3
gathers the partitions first, `stage3_gather_16bit_weights_on_model_save`). `--stage 0` is the same training in one process without DeepSpeed,
with the per-device batch of all processes together: the reference for the losses.

Each process writes what it found to OUT/rank<rank>.json: its world size and backend, whether the gates moved and are
identical on every rank (gathered under ZeRO-3), whether DISeL's fused A+gate path is taken (not under ZeRO-3, whose
forward hooks gather the weights) and, under ZeRO-3, how many parameters are partitioned. Rank 0 writes
OUT/outputs.pt: the losses per step, the world size, the group learning rates, and the trained model's outputs on a
fixed batch.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing_support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from disel_integration_utils import DiselOptimizerMixin, disel_config, gate_report, lm_batch, probe_ids
from disel_testing import GATE, TRAIN_TEXT, make_tokenizer, write_rank_result


# the training texts: 3 steps x 2 processes x 2 per process (the order is kept: sequential sampling)
TEXTS = TRAIN_TEXT + [
    "what colour is the sky ? blue .",
    "where is the cat ? on the mat .",
    "how many dogs ran ? two .",
    "the small bird flew under the tree .",
    "a green fish swam in the blue sea .",
    "is the sky red ? no .",
]
GLOBAL_BATCH = 4
GATE_LR_RATIO = 5.0


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=(0, 2, 3), required=True, help="ZeRO stage; 0: no DeepSpeed")
    parser.add_argument("--base_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument(
        "--inject_under_zero_init",
        action="store_true",
        help="ZeRO-3: create the adapters inside deepspeed.zero.Init too, so that they are partitioned at creation",
    )
    return parser.parse_args()


def deepspeed_config(stage: int) -> dict:
    """A ZeRO config as transformers' docs write it: "auto" values are filled in from the TrainingArguments."""
    zero = {"stage": stage}
    if stage == 3:
        # as transformers' docs write it for saving with ZeRO-3 (for a PeftModel, trainer.save_model() gathers the
        # trainable parameters either way)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        # partition every parameter: by default ZeRO-3 keeps parameters under 1e5 elements whole on every rank (the
        # adapters of this tiny model; those of r=16 on a 4096-wide model too), which would test nothing
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }


def dataset():
    batch = lm_batch(TEXTS)  # padded to one length; padding is left out of the loss
    return [{k: v[i] for k, v in batch.items()} for i in range(len(TEXTS))]


def use_gloo_for_deepspeed_on_cpu():
    """Lets accelerate see the 2 processes of DeepSpeed on a machine without an accelerator (this test's CPU).

    accelerate picks a communication backend only for accelerators (nccl, ...) or with `cpu=True`, which turns
    DeepSpeed off; under DeepSpeed without an accelerator it finds none, and then counts 1 process on every rank (each
    rank would train on the same batches, with the DeepSpeed batch size of 1 process). Here it gets gloo, the backend
    DeepSpeed's CPU accelerator initializes; with a GPU, accelerate picks nccl itself and this is not needed.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    prepare_backend = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        found, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
        if found is None and not cpu and os.environ.get("DS_ACCELERATOR") == "cpu" and "LOCAL_RANK" in os.environ:
            return "gloo", DistributedType.MULTI_CPU
        return found, kind

    PartialState._prepare_backend = _prepare_backend


def gathered(params):
    """A context in which ZeRO-3 partitions of `params` are whole on every rank (entered by all ranks together)."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def disel_trainer_class():
    from transformers import Trainer

    class DiselTrainer(DiselOptimizerMixin, Trainer):
        gate_lr_ratio = GATE_LR_RATIO

    return DiselTrainer


def main():
    args = parse_args()
    from transformers import AutoModelForCausalLM, TrainingArguments, set_seed

    from peft import get_peft_model
    from peft.tuners.lora.disel import _can_fuse

    if args.stage:
        use_gloo_for_deepspeed_on_cpu()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.stage and world != 2:
        raise SystemExit(f"launch with 2 processes (torchrun --nproc_per_node 2), got WORLD_SIZE={world}")
    tag = f"ZeRO-{args.stage}" if args.stage else "single process"
    # created before the model: with ZeRO-3 it makes from_pretrained build the model under deepspeed.zero.Init
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=args.lr,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        deepspeed=deepspeed_config(args.stage) if args.stage else None,
        use_cpu=not args.stage,
        seed=0,
    )
    rank = training_args.process_index
    # the Trainer's own count: it sizes the DeepSpeed batch and shards the data by it
    assert training_args.world_size == world, f"the Trainer sees {training_args.world_size} process(es), not {world}"
    result = {"world_size": world}
    if args.stage:
        import torch.distributed as dist

        result.update(
            world_size=dist.get_world_size(), backend=dist.get_backend(), accelerator=os.environ.get("DS_ACCELERATOR")
        )
        print(
            f"{tag} rank {rank}: world size {result['world_size']}, backend {result['backend']}, "
            f"accelerator {result['accelerator']}",
            flush=True,
        )

    base = AutoModelForCausalLM.from_pretrained(args.base_dir)
    partitioned = [p for p in base.parameters() if hasattr(p, "ds_id")]
    if args.stage == 3:
        # zero3_init: every base weight is a partition (an empty tensor, its full shape in ds_shape)
        assert partitioned and len(partitioned) == len(list(base.parameters())), "the base model is not partitioned"
        assert all(p.numel() == 0 for p in partitioned), "ZeRO-3 partitions are expected to be empty outside forward"
        print(f"{tag} rank {rank}: base model built under zero3_init, {len(partitioned)} partitioned parameters")
        result["base_partitioned"] = len(partitioned) == len(list(base.parameters()))
    else:
        assert not partitioned

    set_seed(0)  # the same adapter init on every rank and in the reference run
    if args.inject_under_zero_init:
        import deepspeed

        # the adapter weights are partitioned as they are created: their .shape is empty, the full one in ds_shape
        with deepspeed.zero.Init(config_dict_or_path=training_args.hf_deepspeed_config.config):
            model = get_peft_model(base, disel_config())
        # what creation on partitions gives: the gates of DISeL, and lora_B, which LoRA's init sets to zero
        named = dict(model.named_parameters())
        with gathered(list(named.values())):
            gates = {n: p.detach().clone() for n, p in named.items() if GATE in n}
            lora_b = [p.detach().abs().sum().item() for n, p in named.items() if "lora_B" in n]
        full = all(p.shape == named[n].ds_shape for n, p in gates.items())
        biases = all(torch.all(p == -3.0).item() for n, p in gates.items() if n.endswith(".bias"))
        weights = all(p.std().item() > 0 for n, p in gates.items() if n.endswith(".weight"))
        print(
            f"{tag} rank {rank}: under zero.Init {len(gates)} gate tensors, full shape {full}, biases -3 {biases}, "
            f"weights initialized {weights}; lora_B all zero {max(lora_b) == 0}",
            flush=True,
        )
        zero_init = {
            "gate_tensors": len(gates),
            "full_shape": full,
            "biases_minus_3": biases,
            "weights_initialized": weights,
            "lora_b_zero": max(lora_b) == 0,
        }
        write_rank_result(args.output_dir, rank, **result, zero_init=zero_init)
        return
    else:
        model = get_peft_model(base, disel_config())
    gate_params = {n: p for n, p in model.named_parameters() if GATE in n}
    with gathered(list(gate_params.values())):
        gates_before = {n: p.detach().clone() for n, p in gate_params.items()}
    trainer = disel_trainer_class()(
        model=model, args=training_args, train_dataset=dataset(), processing_class=make_tokenizer()
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == args.steps, trainer.state.log_history
    print(f"{tag} rank {rank}: losses {' '.join(f'{x:.6f}' for x in losses)}", flush=True)

    # the gate group keeps gate_lr_ratio x the LoRA lr through DeepSpeed's optimizer wrapper (the scheduler scales
    # both groups alike from their initial lr)
    lrs = sorted(g.get("initial_lr", g["lr"]) for g in trainer.optimizer.param_groups)
    assert len(lrs) == 2 and abs(lrs[1] / lrs[0] - GATE_LR_RATIO) < 1e-9, lrs

    # which DISeL path the adapted layers take after DeepSpeed wrapped the model
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    fused = _can_fuse(layer.lora_A["default"], layer.lora_disel_gate["default"], layer.lora_dropout["default"])
    print(f"{tag} rank {rank}: DISeL fused A+gate path {'on' if fused else 'off (module calls)'}", flush=True)
    result["fused"] = fused

    gate_params = {n: p for n, p in model.named_parameters() if GATE in n}
    assert gate_params.keys() == gates_before.keys()
    if args.stage == 3:
        trainable = [p for p in model.parameters() if p.requires_grad]
        partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in trainable)
        print(f"{tag} rank {rank}: {len(trainable)} adapter parameters, all partitioned {partitioned}")
        result.update(adapter_tensors=len(trainable), adapters_partitioned=partitioned)
    if args.stage:
        with gathered(list(gate_params.values())):
            gates = {n: p.detach().clone() for n, p in gate_params.items()}
        assert all(gates[n].shape == gates_before[n].shape for n in gates), "a gathered gate has the wrong shape"
        result.update(gate_report(gates, gates_before, f"{tag} rank {rank}"))
    write_rank_result(args.output_dir, rank, **result)

    # every rank runs the forward (ZeRO-3 gathers the partitions in it); rank 0 keeps the outputs
    model.eval()
    with torch.no_grad():
        logits = model(**probe_ids()).logits
    out = Path(args.output_dir)
    trainer.save_model(str(out / "adapter"))  # saves on rank 0; under ZeRO-3 from the gathered state dict
    if args.stage == 3:
        # saving yourself: save_pretrained sees the empty partitions unless every rank gathers them first
        if rank == 0:
            model.save_pretrained(out / "adapter-not-gathered")
        with gathered([p for p in model.parameters() if p.requires_grad]):
            if rank == 0:
                model.save_pretrained(out / "adapter-gathered")
    if rank == 0:
        torch.save(
            {"logits": logits, "world_size": world, "losses": losses, "lrs": lrs, "fused": fused},
            out / "outputs.pt",
        )
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
