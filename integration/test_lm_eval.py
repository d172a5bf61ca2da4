"""Evaluating a DISeL adapter with lm-evaluation-harness (`--model hf --model_args pretrained=...,peft=...`), offline.

Opt-in (lm-eval is a large install): runs only with DISEL_LM_EVAL=1, which `make test-lm-eval` sets after installing
the pinned lm-eval. The base model is a tiny Llama with a word-level tokenizer saved to a local folder, the adapter is
trained a few steps with `create_disel_optimizer`, and the task is a multiple-choice (loglikelihood) task defined by a
YAML file over a local jsonl file. The harness's accuracy and per-choice log-likelihoods must equal the ones computed
here directly with the same model and adapter.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "testing_support"))
sys.path.insert(0, str(HERE))

from disel_integration_utils import disel_config, lm_batch  # noqa: E402
from disel_testing import launch_env, make_tokenizer, save_base_model  # noqa: E402

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.optimizers import create_disel_optimizer  # noqa: E402


pytestmark = [
    pytest.mark.skipif(
        os.environ.get("DISEL_LM_EVAL") != "1", reason="opt-in: set DISEL_LM_EVAL=1 (make test-lm-eval)"
    ),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

TASK = "disel_tiny_qa"
PLACES = ["on the mat", "under the tree", "in the sky", "in the sea"]
ANIMALS = ["cat", "dog", "bird", "fish"]
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} answer :"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _items():
    """Where is the <adjective> <animal>? Each animal has its place, which the adapter learns."""
    items = []
    for j, animal in enumerate(ANIMALS):
        for adjective in ["big", "small", "red", "blue"]:
            items.append({"question": f"where is the {adjective} {animal} ?", "choices": PLACES, "label": j})
    return items


def _train_adapter(base_dir, adapter_dir):
    """A few steps on the gold answers, so that the adapter (B != 0, gates moved) changes the scores."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), disel_config(r=8))
    optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2, gate_lr_ratio=5.0)
    texts = [f"{d['question']} answer : {PLACES[d['label']]}" for d in _items()]
    for _ in range(60):
        model(**lm_batch(texts)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter_dir)


def _direct_scores(model, tokenizer, items):
    """Per-choice sums of log-probabilities of ' <choice>' after '<question> answer :', as the harness scores them."""
    scores = []
    for doc in items:
        context = f"{doc['question']} answer :"
        ctx = tokenizer(context, add_special_tokens=False).input_ids
        row = []
        for choice in doc["choices"]:
            whole = tokenizer(f"{context} {choice}", add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            row.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        scores.append(row)
    acc = sum(max(range(len(row)), key=row.__getitem__) == d["label"] for row, d in zip(scores, items)) / len(items)
    return scores, acc


def test_lm_eval_harness_scores_disel_adapter_like_direct_computation(tmp_path):
    from transformers import AutoModelForCausalLM

    assert importlib.util.find_spec("lm_eval"), "DISEL_LM_EVAL=1 but lm_eval is not installed (make test-lm-eval)"

    base_dir = save_base_model(tmp_path / "base")
    adapter_dir = tmp_path / "adapter"
    _train_adapter(base_dir, adapter_dir)
    items = _items()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))

    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={base_dir},peft={adapter_dir},dtype=float32",
        "--tasks",
        TASK,
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "1",
        "--output_path",
        str(tmp_path / "results"),
        "--log_samples",
    ]
    env = launch_env(
        hide_gpus=False,
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    harness_acc = results["results"][TASK]["acc,none"]
    samples = [json.loads(line) for line in next((tmp_path / "results").rglob(f"samples_{TASK}_*.jsonl")).open()]
    samples.sort(key=lambda s: s["doc_id"])
    harness_scores = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]  # (loglikelihood, is_greedy)

    tokenizer = make_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base_scores, base_acc = _direct_scores(base, tokenizer, items)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    direct_scores, direct_acc = _direct_scores(model, tokenizer, items)

    print(
        f"lm-eval acc {harness_acc:.4f}, direct acc {direct_acc:.4f} (base model without the adapter: {base_acc:.4f})"
    )
    assert harness_acc == direct_acc
    torch.testing.assert_close(torch.tensor(harness_scores), torch.tensor(direct_scores), rtol=1e-4, atol=1e-4)
    # the harness did apply the adapter: its scores are not the base model's
    assert not torch.allclose(torch.tensor(harness_scores), torch.tensor(base_scores), atol=1e-3)
