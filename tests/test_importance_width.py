import copy
import json

import pytest
import safetensors.torch
import torch

from shear.errors import ShearError
from shear.importance.width import (activation_scores, read_width_scores, width_magnitude_scores, width_scores,
                                    width_taylor_scores, write_width_scores)
from shear.models import make_tiny_model
from shear.records import WidthScoreSummary

SPEC = "layers=2,hidden=48,heads=6,kv_heads=2,mlp=40,tied=0"  # head_dim 8, KV groups of 3
CALIB = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(SPEC, seed=0)[0]


@pytest.mark.parametrize("criterion", ["activation", "taylor", "magnitude"])
def test_shapes_and_kv_groups(model, criterion):
    s = width_scores(model, CALIB, criterion, batch_size=3)
    assert s["heads"].shape == (2, 6) and s["kv_heads"].shape == (2, 2) and s["mlp"].shape == (2, 40)
    assert s["hidden"].shape == (48,) and s["hidden_layers"].shape == (2, 48) and s["layers"].shape == (2,)
    assert (s["heads"] > 0).all() and (s["mlp"] > 0).all() and (s["hidden"] > 0).all()
    if criterion == "activation":  # a KV group scores the sum of its query heads
        torch.testing.assert_close(s["kv_heads"], s["heads"].view(2, 2, 3).sum(-1))
    elif criterion == "taylor":  # ... plus its own k/v weights
        assert (s["kv_heads"] > s["heads"].view(2, 2, 3).sum(-1)).all()
    else:  # the norm of its heads' weights and its own k/v weights together
        assert (s["kv_heads"] ** 2 > (s["heads"] ** 2).view(2, 2, 3).sum(-1)).all()


def test_activation_sees_dead_units(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.model.layers[1].self_attn.v_proj.weight[8:16] = 0  # KV group 1: heads 3, 4, 5 output zero
        m.model.layers[0].mlp.up_proj.weight[7] = 0  # neuron 7 of layer 0 outputs zero
        m.get_input_embeddings().weight[:, 5] = 0  # hidden channel 5 stays zero everywhere
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight[5] = 0
            layer.mlp.down_proj.weight[5] = 0
    s = activation_scores(m, CALIB, batch_size=4)
    assert s["heads"][1, 3:].abs().max() == 0 and (s["heads"][1, :3] > 0).all() and s["kv_heads"][1, 1] == 0
    assert s["mlp"][0, 7] == 0 and (s["mlp"][0, :7] > 0).all()
    assert s["hidden"][5] == 0 and (s["hidden"][:5] > 0).all()


def test_activation_head_score_is_mean_l2_norm_of_head_output(model):
    captured = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(CALIB)
    hook.remove()
    x = captured[0].view(4, 16, 6, 8)
    expected = x.norm(dim=-1).mean((0, 1)).double()
    torch.testing.assert_close(activation_scores(model, CALIB, batch_size=3)["heads"][0], expected)


def test_activation_layer_score_is_block_influence(model):
    m = copy.deepcopy(model)
    with torch.no_grad():  # block 0 becomes the identity: 1 - cos(in, out) = 0
        m.model.layers[0].self_attn.o_proj.weight.zero_()
        m.model.layers[0].mlp.down_proj.weight.zero_()
    s = activation_scores(m, CALIB, batch_size=4)
    assert abs(s["layers"][0]) < 1e-12 and s["layers"][1] > 1e-3
    x = m.model.embed_tokens(CALIB)  # block 0 is the identity, so this is block 1's input
    out = m.model.layers[1](x, position_embeddings=m.model.rotary_emb(x, torch.arange(16)[None]))
    out = out[0] if isinstance(out, tuple) else out
    cos = torch.nn.functional.cosine_similarity(x.double(), out.double(), dim=-1)
    torch.testing.assert_close(s["layers"][1], 1 - cos.mean())


def test_taylor_sums_weight_times_gradient_over_each_unit(model):
    m = copy.deepcopy(model)
    m.zero_grad()
    m(input_ids=CALIB, labels=CALIB).loss.backward()
    wg = {n: (p.detach() * p.grad).abs().double() for n, p in m.named_parameters()}
    s = width_taylor_scores(model, CALIB, batch_size=2)
    pre = "model.layers.1."
    head2 = wg[pre + "self_attn.q_proj.weight"][16:24].sum() + wg[pre + "self_attn.o_proj.weight"][:, 16:24].sum()
    neuron9 = sum(wg[pre + f"mlp.{n}_proj.weight"][9].sum() for n in ("gate", "up")) + \
        wg[pre + "mlp.down_proj.weight"][:, 9].sum()
    kv0 = s["heads"][1, :3].sum() + sum(wg[pre + f"self_attn.{n}_proj.weight"][0:8].sum() for n in ("k", "v"))
    reads = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")  # columns
    writes = ("o_proj", "down_proj", "norm")  # rows (and norm weights)
    channel = sum(w[:, 3].sum() for n, w in wg.items() if any(r in n for r in reads)) + \
        sum(w[3].sum() for n, w in wg.items() if any(r in n for r in writes))
    torch.testing.assert_close(s["heads"][1, 2], head2)
    torch.testing.assert_close(s["mlp"][1, 9], neuron9)
    torch.testing.assert_close(s["kv_heads"][1, 0], kv0)
    torch.testing.assert_close(s["hidden"][3], channel)
    torch.testing.assert_close(s["layers"][1], sum(w.sum() for n, w in wg.items() if n.startswith(pre)))
    assert all(p.grad is None for p in model.parameters())  # the model is left clean


def test_magnitude_is_weight_norm_of_each_unit(model):
    s = width_magnitude_scores(model)
    a = model.model.layers[0].self_attn
    expected = torch.cat([a.q_proj.weight[8:16].flatten(), a.o_proj.weight[:, 8:16].flatten()]).double().norm()
    torch.testing.assert_close(s["heads"][0, 1], expected.detach())


def test_write_and_read_roundtrip(model, tmp_path):
    path = write_width_scores(model, CALIB, "activation", tmp_path / "summary", tmp_path / "tensors", batch_size=4)
    assert path == tmp_path / "tensors/width_activation.safetensors"
    assert (tmp_path / "summary/width_activation.png").stat().st_size > 1000
    summary = WidthScoreSummary.from_dict(json.loads((tmp_path / "summary/width_activation.json").read_text()), "s")
    assert summary.file == path.name and summary.calibration == {"sequences": len(CALIB), "seq_len": CALIB.shape[1]}
    back = read_width_scores(path)
    fresh = activation_scores(model, CALIB, batch_size=4)
    for k, v in fresh.items():
        assert summary.tensors[k] == list(v.shape)
        torch.testing.assert_close(back[k], v, rtol=1e-5, atol=0)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ShearError, match="not a readable safetensors file"):
        read_width_scores(tmp_path / "garbage.safetensors")
    safetensors.torch.save_file({"criterion": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(ShearError, match="not a width scores file"):
        read_width_scores(tmp_path / "bad.safetensors")
    with pytest.raises(ShearError, match="unknown criterion 'l1'"):
        width_scores(model, CALIB, "l1", 4)
