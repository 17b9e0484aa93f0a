"""shear.nll: the one next-token NLL equals the plain log-softmax computation, through wrappers and dtypes."""
import pytest
import torch

import shear.nll as nll
from shear.models import make_tiny_model
from shear.nll import logits_nll, sequence_nll


def _plain(model, ids):
    """Summed NLL the plain way: full logits in float32, log-softmax, gather."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    return -torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).sum().item()


@pytest.fixture
def model_and_ids():
    model, _ = make_tiny_model("layers=2,hidden=64,heads=4,kv_heads=2,mlp=128", seed=0)
    ids = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(0))
    return model.eval(), ids


def test_sequence_nll_equals_plain_computation(model_and_ids, monkeypatch):
    model, ids = model_and_ids
    monkeypatch.setattr(nll, "LOGITS_CHUNK", 5)  # several head chunks
    total, tokens = sequence_nll(model, ids)
    assert tokens == 3 * 11
    assert total == pytest.approx(_plain(model, ids), rel=1e-6)
    with torch.no_grad():
        assert total == pytest.approx(logits_nll(model(input_ids=ids).logits, ids).item(), rel=1e-6)


def test_sequence_nll_through_peft_and_in_bf16(model_and_ids):
    from peft import LoraConfig, get_peft_model

    model, ids = model_and_ids
    plain = _plain(model, ids)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))  # LoRA B = 0: same function
    assert sequence_nll(wrapped, ids)[0] == pytest.approx(plain, rel=1e-6)
    # bf16 weights: the head and the log-softmax still run in float32 (only the decoder rounds)
    bf16 = model.to(torch.bfloat16)
    assert sequence_nll(bf16, ids)[0] == pytest.approx(plain, rel=2e-2)
