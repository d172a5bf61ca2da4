"""DISeL on a CUDA GPU (skipped without one; `make gpu-check` runs it): the fused and the plain path agree, in float32 and
under bf16 autocast, training moves the gates, and a saved adapter reloads with the same outputs.
"""

import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "testing_support"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from disel_integration_utils import disel_config
from disel_testing import make_base_model

from peft import PeftModel, get_peft_model
from peft.optimizers import create_disel_optimizer
from peft.tuners.lora import disel


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
]
IDS = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_and_plain_paths_agree_on_cuda(autocast):
    model = get_peft_model(make_base_model(), disel_config(init_lora_weights=False)).cuda()
    ids = IDS.cuda()

    def run(fuse):
        model.zero_grad()
        with patch.object(disel, "_can_fuse", return_value=fuse), torch.autocast("cuda", enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    (fused_loss, fused_grads), (plain_loss, plain_grads) = run(True), run(False)
    tol = {"rtol": 2e-2, "atol": 1e-3} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(fused_loss, plain_loss, **tol)
    for fused, plain in zip(fused_grads, plain_grads):
        torch.testing.assert_close(fused, plain, **tol)


def test_train_save_reload_on_cuda(tmp_path):
    model = get_peft_model(make_base_model(), disel_config()).cuda()
    ids = IDS.cuda()
    optimizer = create_disel_optimizer(model, torch.optim.AdamW, lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    biases = [p for n, p in model.named_parameters() if n.endswith("lora_disel_gate.default.bias")]
    assert all(not torch.equal(b, torch.full_like(b, -3.0)) for b in biases)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_base_model().cuda(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-6)
