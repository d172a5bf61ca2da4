"""DISeL training on 2 CPU processes (gloo): DDP through `accelerate launch`, FSDP2 (`fully_shard`) through torchrun.

Each launched script (disel_ddp_train.py, disel_fsdp2_train.py) trains a tiny DISeL model a few steps with
`create_disel_optimizer`, writes per rank (rank<rank>.json) its world size and backend, whether the gates moved and
whether they are identical on both ranks, and on rank 0 saves the adapter and the trained model's outputs on a fixed
batch. This process checks the per-rank results, then reloads the adapter onto the same base model and compares the
outputs.
"""

import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "integration"
sys.path.insert(0, str(ROOT / "testing_support"))
sys.path.insert(0, str(HERE))

from disel_integration_utils import check_rank_results, gate_state, probe_ids  # noqa: E402
from disel_testing import free_port, gate_tensors, launch_env, run_launched, save_base_model  # noqa: E402

from peft import PeftModel  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TIMEOUT = 240


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base_model(tmp_path_factory.mktemp("base"))


def _launch(cmd):
    output = run_launched(cmd, cwd=HERE, env=launch_env(ACCELERATE_USE_CPU="true"), timeout=TIMEOUT)
    for line in output.splitlines():
        if "world size" in line or "identical" in line:
            print(line)


def _check(tag, base_dir, output_dir):
    # two processes, each reporting a world of 2 (`accelerate launch --cpu --num_processes 2` would start only one),
    # every gate moved and the same on both
    check_rank_results(output_dir)

    from transformers import AutoModelForCausalLM

    saved = torch.load(output_dir / "outputs.pt")
    assert saved["world_size"] == 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), output_dir / "adapter").eval()
    assert len(gate_state(model)) == gate_tensors()
    with torch.no_grad():
        logits = model(**probe_ids()).logits
    torch.testing.assert_close(logits, saved["logits"])
    print(
        f"{tag}: reloaded adapter reproduces rank 0's outputs (max diff {(logits - saved['logits']).abs().max():.2e})"
    )


def test_ddp_accelerate_launch_two_cpu_processes(base_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        HERE / "disel_ddp_train.py",
        "--base_dir",
        base_dir,
        "--output_dir",
        tmp_path,
    ]
    _launch(cmd)
    _check("DDP", base_dir, tmp_path)


def test_fsdp2_fully_shard_torchrun_two_cpu_processes(base_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        HERE / "disel_fsdp2_train.py",
        "--base_dir",
        base_dir,
        "--output_dir",
        tmp_path,
    ]
    _launch(cmd)
    _check("FSDP2", base_dir, tmp_path)
