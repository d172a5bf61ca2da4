"""Shared fixtures of the Axolotl tests: they run in the Axolotl venv (`make test-axolotl`), which has Axolotl 0.21.0,
the DISeL-enabled peft (installed over Axolotl's with --no-deps) and this plugin. Axolotl runs as users run it, through
its `axolotl` command, offline, on the CPU."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_fixtures import write_base, write_dataset  # noqa: E402


AXOLOTL = Path(sys.executable).parent / "axolotl"
STEPS = 6
LR = 2e-3
GATE_LR_RATIO = 5
WEIGHT_DECAY = 0.01

# what a user writes for a DISeL run; the probe plugin (disel_probe.py, test only) records what the trainer used
TRAIN_CONFIG = {
    "plugins": ["axolotl_disel.DiselPlugin", "disel_probe.ProbePlugin"],
    "adapter": "lora",
    "disel": True,
    "disel_gate_lr_ratio": GATE_LR_RATIO,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "sequence_len": 64,
    "sample_packing": True,
    "attn_implementation": "sdpa",
    "gradient_checkpointing": True,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": STEPS,
    "learning_rate": LR,
    "weight_decay": WEIGHT_DECAY,
    "optimizer": "adamw_torch",
    "lr_scheduler": "constant",
    "warmup_steps": 0,
    "logging_steps": 1,
    "save_strategy": "no",
    "val_set_size": 0,
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "seed": 0,
    "dataloader_num_workers": 0,
}


def axolotl_env() -> dict:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
        # `axolotl train` starts `accelerate launch` from PATH, as in an activated venv
        "PATH": os.pathsep.join([str(AXOLOTL.parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    return env


def run_axolotl(
    command: str, config: dict, folder: Path, *args: str, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Writes `config` to `folder/cfg.yml` and runs `axolotl <command> cfg.yml [args]`; stdout and stderr together."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [str(AXOLOTL), command, str(path), *args],
        env=axolotl_env(),
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> Path:
    """The tiny Llama (`base/`) and the dataset (`data.jsonl`)."""
    folder = tmp_path_factory.mktemp("axolotl-fixtures")
    write_base(folder / "base")
    write_dataset(folder / "data.jsonl")
    return folder


def make_config(fixtures: Path, output_dir: Path, **changes) -> dict:
    """TRAIN_CONFIG for the fixtures, writing to `output_dir`; a change to None removes the key."""
    config = copy.deepcopy(TRAIN_CONFIG)
    config.update(
        base_model=str(fixtures / "base"),
        datasets=[{"path": str(fixtures / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        dataset_prepared_path=str(output_dir / "prepared"),
        output_dir=str(output_dir),
    )
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


@pytest.fixture(scope="session")
def trained(fixtures, tmp_path_factory) -> tuple[Path, str]:
    """One `axolotl train` run of TRAIN_CONFIG: its output folder and its log."""
    out = tmp_path_factory.mktemp("axolotl-train") / "out"
    proc = run_axolotl("train", make_config(fixtures, out), out.parent)
    (out.parent / "train.log").write_text(proc.stdout)
    if proc.returncode != 0:
        pytest.fail(f"axolotl train failed (exit {proc.returncode}):\n{proc.stdout[-8000:]}")
    return out, proc.stdout
