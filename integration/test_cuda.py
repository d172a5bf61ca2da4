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


# Under bf16 autocast the two paths round differently, so their gradients are compared as a whole (all gate gradients
# together, all LoRA gradients together) by relative error. Measured with this comparison on the CPU under bf16
# autocast (5 batches): the paths differ by at most 1.1e-2 (gates) and 7.3e-3 (LoRA); every gate of the fused path
# scaled by 0.9 gives at least 1.04e-1, every gate removed from it 1.0 (gates) and 5.3 (LoRA). Float32 agrees to 1e-6.
AUTOCAST_GRAD_RTOL = 4e-2


def fused_and_plain(device, autocast):
    """The loss and the gradients of one step of the tiny DISeL model through the fused path (A and the gate as one
    GEMM) and through the module calls, on `device`, in float32 or under bf16 autocast.

    Args:
        device: "cuda" here; "cpu" runs the same comparison without a GPU.
        autocast: run under `torch.autocast(device, dtype=torch.bfloat16)`.
    """
    model = get_peft_model(make_base_model(), disel_config(init_lora_weights=False)).to(device)
    ids = IDS.to(device)

    def run(fuse):
        model.zero_grad()
        autocast_bf16 = torch.autocast(device, dtype=torch.bfloat16, enabled=autocast)
        with patch.object(disel, "_can_fuse", return_value=fuse), autocast_bf16:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        return loss.detach(), {n: g.clone() for n, g in grads.items()}

    return run(True), run(False)


def check_paths_agree(fused, plain, autocast):
    """Asserts that the (loss, gradients) of the two paths agree: to float32 precision, or under bf16 autocast to
    `AUTOCAST_GRAD_RTOL` for the gate and the LoRA gradients (and 2e-3 for the loss)."""
    (fused_loss, fused_grads), (plain_loss, plain_grads) = fused, plain
    assert fused_grads.keys() == plain_grads.keys()
    if not autocast:
        torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-4, atol=1e-5)
        for name in plain_grads:
            torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-5)
        return
    torch.testing.assert_close(fused_loss, plain_loss, rtol=2e-3, atol=0)
    for kind in ("gate", "LoRA"):
        names = [n for n in plain_grads if ("lora_disel_gate" in n) == (kind == "gate")]
        fused_all = torch.cat([fused_grads[n].float().flatten() for n in names])
        plain_all = torch.cat([plain_grads[n].float().flatten() for n in names])
        error = (torch.linalg.vector_norm(fused_all - plain_all) / torch.linalg.vector_norm(plain_all)).item()
        assert error < AUTOCAST_GRAD_RTOL, f"{kind} gradients of the fused and the plain path differ by {error:.2e}"


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_and_plain_paths_agree_on_cuda(autocast):
    check_paths_agree(*fused_and_plain("cuda", autocast), autocast)


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
