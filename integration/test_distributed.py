"""DISeL training on 2 CPU processes (gloo): DDP through `accelerate launch`, FSDP2 (`fully_shard`) through torchrun.

Each launched script (disel_ddp_train.py, disel_fsdp2_train.py) trains a tiny DISeL model a few steps with
`create_disel_optimizer`, checks that the gates moved and are identical on both ranks, and on rank 0 saves the adapter
and the trained model's outputs on a fixed batch. This process then reloads the adapter onto the same base model and
compares the outputs.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from disel_integration_utils import GATE, gate_state, probe_ids, save_base_model  # noqa: E402

from peft import PeftModel  # noqa: E402


pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TIMEOUT = 240


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base_model(tmp_path_factory.mktemp("base"))


def _launch(cmd):
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    proc = subprocess.run(
        cmd, cwd=HERE, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False, stdin=subprocess.DEVNULL
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{output[-6000:]}"
    for line in output.splitlines():
        if "world size" in line or "identical" in line:
            print(line)
    return output


def _check(output, tag, base_dir, output_dir):
    # two processes, each saying so (`accelerate launch --cpu --num_processes 2` would start only one)
    sizes = re.findall(rf"{tag} rank (\d): world size (\d+), backend gloo", output)
    assert sorted(sizes) == [("0", "2"), ("1", "2")], output[-3000:]
    assert len(re.findall(rf"{tag} rank \d: \d+ {GATE} tensors identical on both ranks", output)) == 2

    from transformers import AutoModelForCausalLM

    saved = torch.load(output_dir / "outputs.pt")
    assert saved["world_size"] == 2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), output_dir / "adapter").eval()
    assert len(gate_state(model)) == 28  # weight and bias of the gate on 7 linear layers x 2 decoder layers
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
        str(_free_port()),
        HERE / "disel_ddp_train.py",
        "--base_dir",
        base_dir,
        "--output_dir",
        tmp_path,
    ]
    _check(_launch(cmd), "DDP", base_dir, tmp_path)


def test_fsdp2_fully_shard_torchrun_two_cpu_processes(base_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        HERE / "disel_fsdp2_train.py",
        "--base_dir",
        base_dir,
        "--output_dir",
        tmp_path,
    ]
    _check(_launch(cmd), "FSDP2", base_dir, tmp_path)
