"""DISeL fine-tuning with TRL's SFTTrainer and the gate learning rate of `create_disel_optimizer`, offline.

Two ways that keep the gate parameter group (gates at lr * gate_lr_ratio, no weight decay):
- build the PeftModel first, create the optimizer, and pass `optimizers=(optimizer, None)` (no `peft_config`);
- pass `peft_config` and let TRL build the PeftModel, with a subclass whose `create_optimizer` calls
  `create_disel_optimizer` (the optimizer has to be created after TRL has injected the adapters).
"""

import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing_support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from disel_integration_utils import DiselOptimizerMixin, disel_config, gate_state, probe_ids
from disel_testing import GATE, TRAIN_TEXT, make_base_model, make_tokenizer


trl = pytest.importorskip("trl")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.optimizers import create_disel_optimizer  # noqa: E402


# PeftModel.__init__ and TrainingArguments use transformers' deprecated gradient checkpointing names (upstream issues)
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

LR, RATIO = 1e-2, 5.0


class DiselSFTTrainer(DiselOptimizerMixin, trl.SFTTrainer):
    """SFTTrainer whose optimizer puts the DISeL gates in their own group (for the `peft_config` flow)."""

    def __init__(self, *args, gate_lr_ratio=5.0, **kwargs):
        self.gate_lr_ratio = gate_lr_ratio
        super().__init__(*args, **kwargs)


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"text": TRAIN_TEXT[:4] * 4})


def _sft_config(output_dir):
    return trl.SFTConfig(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=LR,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        max_length=32,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=0,
    )


def _check_trained_and_reload(trainer, gates_before, output_dir):
    optimizer = trainer.optimizer
    gate_ids = {id(p) for n, p in trainer.model.named_parameters() if GATE in n}
    gate_groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & gate_ids]
    assert len(gate_groups) == 1 and {id(p) for p in gate_groups[0]["params"]} == gate_ids
    assert gate_groups[0]["lr"] == pytest.approx(LR * RATIO)
    assert gate_groups[0]["weight_decay"] == 0.0
    assert all(g["lr"] == pytest.approx(LR) for g in optimizer.param_groups if g is not gate_groups[0])
    assert trainer.state.global_step == 4

    gates_after = gate_state(trainer.model)
    assert gates_after.keys() == gates_before.keys() and gates_after
    assert all(not torch.equal(gates_before[n], gates_after[n]) for n in gates_after), "a gate did not move"

    model = trainer.model.eval()
    model.save_pretrained(output_dir / "adapter")
    batch = probe_ids()
    with torch.no_grad():
        expected = model(**batch).logits
        reloaded = PeftModel.from_pretrained(make_base_model(), output_dir / "adapter").eval()
        assert gate_state(reloaded).keys() == gates_after.keys()
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected)
    print(f"TRL {trl.__version__}: {len(gates_after)} gates moved, gate lr {gate_groups[0]['lr']:g}, reload equal")


def test_sft_trainer_with_peft_model_and_disel_optimizer(tmp_path):
    """The smallest way: get_peft_model, create_disel_optimizer, SFTTrainer(..., optimizers=(optimizer, None))."""
    model = get_peft_model(make_base_model(), disel_config())
    gates_before = gate_state(model)
    optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=LR, gate_lr_ratio=RATIO, weight_decay=0.01)
    trainer = trl.SFTTrainer(
        model=model,
        args=_sft_config(tmp_path),
        train_dataset=_dataset(),
        processing_class=make_tokenizer(),
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate wraps it
    _check_trained_and_reload(trainer, gates_before, tmp_path)


def test_sft_trainer_with_peft_config_and_create_optimizer_override(tmp_path):
    """With `peft_config`, TRL builds the PeftModel itself; overriding `create_optimizer` keeps the gate group."""
    trainer = DiselSFTTrainer(
        model=make_base_model(),
        args=_sft_config(tmp_path),
        train_dataset=_dataset(),
        processing_class=make_tokenizer(),
        peft_config=disel_config(),
        gate_lr_ratio=RATIO,
    )
    assert isinstance(trainer.model, PeftModel)
    gates_before = gate_state(trainer.model)
    trainer.train()
    _check_trained_and_reload(trainer, gates_before, tmp_path)
