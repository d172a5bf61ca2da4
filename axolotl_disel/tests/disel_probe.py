"""A test-only Axolotl plugin (`plugins: [..., disel_probe.ProbePlugin]`) that records what Axolotl's trainer really
used, from inside the `axolotl train` process, into `<output_dir>/probe/`:

- `optimizer.json`: the optimizer's class and parameter groups (lr, initial_lr, weight_decay, parameter names) at the
  start of training, read from the optimizer object the trainer steps;
- `gates_before.pt` / `gates_after.pt`: every DISeL gate parameter before the first step and after the last;
- `lora_before.pt` / `lora_after.pt`: the same for the LoRA A and B weights;
- `logits.pt`: the trained model's logits on PROBE_TEXT (what the saved adapter must reproduce);
- `modules.json`: how many modules of each class the trained model has (bitsandbytes' `Linear4bit` under QLoRA);
- `kernels.json`: the validated config's `lora_*_kernel` flags, and whether any attention or MLP module was patched
  by Axolotl's fused LoRA kernels.
"""

import json
from pathlib import Path

import torch
from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


GATE = "lora_disel_gate"
PROBE_TEXT = "the cat sat on the mat . where is the fish ? in the sea ."
KERNEL_FLAGS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


def _snapshot(model, key):
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if key in n}


class _Recorder(TrainerCallback):
    def __init__(self, folder: Path, trainer):
        self.folder = folder
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        names = {id(p): n for n, p in self.trainer.model.named_parameters()}
        groups = [
            {
                "lr": group["lr"],
                "initial_lr": group.get("initial_lr"),
                "weight_decay": group["weight_decay"],
                "names": [names.get(id(p), "?") for p in group["params"]],
                "numel": sum(p.numel() for p in group["params"]),
            }
            for group in optimizer.param_groups
        ]
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        record = {"class": type(inner).__name__, "groups": groups, "learning_rate": args.learning_rate}
        (self.folder / "optimizer.json").write_text(json.dumps(record, indent=1))
        torch.save(_snapshot(self.trainer.model, GATE), self.folder / "gates_before.pt")
        torch.save(_snapshot(self.trainer.model, "lora_A"), self.folder / "lora_before.pt")

    def on_train_end(self, args, state, control, **kwargs):
        torch.save(_snapshot(self.trainer.model, GATE), self.folder / "gates_after.pt")
        torch.save(_snapshot(self.trainer.model, "lora_A"), self.folder / "lora_after.pt")


class ProbePlugin(BasePlugin):
    def post_trainer_create(self, cfg, trainer):
        folder = Path(cfg.output_dir) / "probe"
        folder.mkdir(parents=True, exist_ok=True)
        trainer.add_callback(_Recorder(folder, trainer))

    def post_train(self, cfg, model):
        folder = Path(cfg.output_dir) / "probe"
        patched = []
        for name, module in model.named_modules():
            if "forward" in vars(module) or "apply_qkv" in vars(module) or "apply_o" in vars(module):
                patched.append(name)
        for name, module in model.named_modules():
            cls_forward = getattr(type(module), "forward", None)
            if (
                cls_forward is not None
                and "axolotl" in getattr(cls_forward, "__module__", "")
                and "Attention" in (type(module).__name__)
            ):
                patched.append(f"{name} ({type(module).__name__}.forward)")
        flags = {flag: cfg.get(flag) for flag in KERNEL_FLAGS}
        (folder / "kernels.json").write_text(json.dumps({"flags": flags, "patched_modules": patched}, indent=1))
        # the layer classes under the adapter (bitsandbytes' Linear4bit for QLoRA)
        classes = {}
        for module in model.modules():
            name = f"{type(module).__module__}.{type(module).__name__}"
            classes[name] = classes.get(name, 0) + 1
        (folder / "modules.json").write_text(json.dumps(classes, indent=1))

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
        batch = tokenizer([PROBE_TEXT], return_tensors="pt")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device)).logits.float().cpu()
        model.train(was_training)
        torch.save(logits, folder / "logits.pt")
