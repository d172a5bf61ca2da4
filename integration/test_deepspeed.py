"""DISeL training with DeepSpeed ZeRO-2 and ZeRO-3 through transformers' `Trainer`, on 2 CPU processes (gloo).

disel_deepspeed_train.py runs under torchrun with `DS_ACCELERATOR=cpu`: the model is created after
`TrainingArguments(deepspeed=...)` (under ZeRO-3, `from_pretrained` then builds it partitioned, as it does for users),
the gates get their learning rate from `create_disel_optimizer`, and `trainer.save_model()` saves the adapter. This
process checks, from the per-rank results (rank<rank>.json) and outputs.pt the script writes, that:

- both processes ran, with world size 2;
- the losses of the 3 steps equal those of the same training in one process without DeepSpeed;
- the saved adapter holds every tensor at the shape a single-process model saves, every DISeL gate included (ZeRO-3
  partitions are empty tensors, so a save without gathering would write empty gates);
- the adapter reloads onto the base model with the trained model's outputs;
- DISeL's fused A+gate path (which reads the weights directly) is used under ZeRO-2 and left for module calls under
  ZeRO-3, whose forward hooks gather the partitioned weights.
"""

import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "integration"
sys.path.insert(0, str(ROOT / "testing_support"))
sys.path.insert(0, str(HERE))

from disel_integration_utils import check_rank_results, disel_config, probe_ids  # noqa: E402
from disel_testing import (  # noqa: E402
    GATE,
    adapter_tensors,
    free_port,
    gate_tensors,
    launch_env,
    make_base_model,
    read_rank_results,
    run_launched,
    save_base_model,
)

from peft import PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402


pytest.importorskip("deepspeed", reason="deepspeed is pinned in tooling/requirements.txt (make install)")

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# the first run on a machine compiles DeepSpeed's shared-memory CPU collectives (about 40 s, cached in
# ~/.cache/torch_extensions)
TIMEOUT = 400
SCRIPT = HERE / "disel_deepspeed_train.py"


def _run(cmd):
    # without ACCELERATE_USE_CPU, which would turn DeepSpeed off
    env = launch_env(drop=("ACCELERATE_USE_CPU",), DS_ACCELERATOR="cpu")
    return run_launched(cmd, cwd=HERE, env=env, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def reference(base_dir, tmp_path_factory):
    """The same training in one process without DeepSpeed (the per-device batch of both processes together)."""
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, SCRIPT, "--stage", "0", "--base_dir", base_dir, "--output_dir", out])
    return torch.load(out / "outputs.pt")


def _expected_shapes():
    """Every tensor a single-process DISeL model saves, and its shape."""
    model = get_peft_model(make_base_model(), disel_config())
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trainer_two_cpu_processes(stage, base_dir, reference, tmp_path):
    _train_and_check(stage, base_dir, reference, tmp_path)


def test_deepspeed_zero3_gates_created_under_zero_init(base_dir, tmp_path):
    # on partitioned lora_A weights: the gate's full shape comes from ds_shape, and its values are initialized before
    # zero.Init partitions them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    _run([*cmd, SCRIPT, "--stage", "3", "--base_dir", base_dir, "--output_dir", tmp_path, "--inject_under_zero_init"])
    found = [result["zero_init"] for result in read_rank_results(tmp_path, world_size=2)]
    expected = {
        "gate_tensors": gate_tensors(),
        "full_shape": True,
        "biases_minus_3": True,
        "weights_initialized": True,
    }
    assert all({k: f[k] for k in expected} == expected for f in found), found
    print(
        f"ZeRO-3 under zero.Init: {gate_tensors()} gates at full shape, biases -3, weights initialized; "
        f"lora_B all zero: {found[0]['lora_b_zero']}"
    )


def _train_and_check(stage, base_dir, reference, tmp_path, *extra):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tag = f"ZeRO-{stage}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    _run([*cmd, SCRIPT, "--stage", str(stage), "--base_dir", base_dir, "--output_dir", tmp_path, *extra])

    # both ranks in a world of 2 on gloo, DeepSpeed's CPU accelerator; the gates moved and agree
    check_rank_results(tmp_path, accelerator="cpu")
    if stage == 3:
        # the base model built under zero3_init; A, B and the gate's weight and bias of every adapted layer partitioned
        expected = {"base_partitioned": True, "adapter_tensors": adapter_tensors(), "adapters_partitioned": True}
        check_rank_results(tmp_path, **expected)
    saved = torch.load(tmp_path / "outputs.pt")
    assert saved["world_size"] == 2
    print(f"{tag}: world size {saved['world_size']} (both ranks report it), backend gloo")

    # the same losses as one process; the gates trained at 5x the LoRA lr (the DISeL optimizer survived DeepSpeed)
    losses, ref = torch.tensor(saved["losses"]), torch.tensor(reference["losses"])
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)
    assert saved["lrs"] == reference["lrs"] and saved["lrs"][1] == 5 * saved["lrs"][0], saved["lrs"]
    print(
        f"{tag}: losses {' '.join(f'{x:.6f}' for x in saved['losses'])} vs single process "
        f"{' '.join(f'{x:.6f}' for x in reference['losses'])} (max diff {(losses - ref).abs().max():.1e}); "
        f"group lrs {saved['lrs']}"
    )
    # ZeRO-3's forward hooks gather the weights: DISeL must then call the modules instead of reading their weights
    assert saved["fused"] is (stage == 2), saved["fused"]
    print(f"{tag}: DISeL fused A+gate path {'on' if saved['fused'] else 'off (module calls under ZeRO-3 hooks)'}")

    # the saved files: every tensor at its full shape, the gates included
    expected = _expected_shapes()
    saves = {"trainer.save_model()": "adapter"}
    if stage == 3:
        saves["save_pretrained under GatheredParameters"] = "adapter-gathered"
        # the trap the README warns of: without gathering, ZeRO-3's empty partitions are saved
        state = load_file(tmp_path / "adapter-not-gathered" / "adapter_model.safetensors")
        empty = [k for k, v in state.items() if v.numel() == 0]
        assert state.keys() == expected.keys() and len(empty) == len(expected), empty
        print(f"{tag}: save_pretrained without gathering wrote {len(empty)} of {len(state)} tensors empty")
    for how, folder in saves.items():
        state = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert {k: tuple(v.shape) for k, v in state.items()} == expected
        gates = {k: tuple(v.shape) for k, v in state.items() if GATE in k}
        assert len(gates) == gate_tensors() and all(v.numel() > 0 and v.dtype == torch.float32 for v in state.values())
        shapes = ", ".join(sorted({f"{shape}" for shape in gates.values()}))
        print(f"{tag}: {how}: {len(gates)} {GATE} tensors at full shape {shapes}")

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / folder).eval()
        with torch.no_grad():
            logits = model(**probe_ids()).logits
        torch.testing.assert_close(logits, saved["logits"])
        diff = (logits - saved["logits"]).abs().max()
        print(f"{tag}: {how}: reloaded adapter reproduces rank 0's outputs (max diff {diff:.2e})")
