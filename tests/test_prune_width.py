import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from shear.importance.width import magnitude_scores
from shear.models import count_parameters, make_tiny_model, save_model
from shear.prune.shapes import shape_parameters, source_shape
from shear.prune.width import choose_units, slice_model, width_prune

SPEC = "layers=3,hidden=96,heads=6,kv_heads=2,mlp=64"  # head_dim 16, KV groups of 3 query heads


def make_model(spec=SPEC, seed=0):
    """A tiny LLaMA with larger weights than the default init, so removed units matter."""
    model, tok = make_tiny_model(spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))  # non-trivial RMSNorm weights
            else:
                p.mul_(4.0)
    return model, tok


def zeroed(model, keep):
    """A copy of the unsliced model with every unit not in `keep` zeroed (see shear/prune/width.py)."""
    m = copy.deepcopy(model)
    c = m.config
    hd, group = c.head_dim, c.num_attention_heads // c.num_key_value_heads
    layers = keep.get("layers") or list(range(c.num_hidden_layers))
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            o, down = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
            if i not in layers:  # a block whose outputs are zero is the identity
                o.zero_()
                down.zero_()
                continue
            j = layers.index(i)
            heads = set(range(c.num_attention_heads))
            if keep.get("heads") is not None:
                heads &= set(keep["heads"][j])
            if keep.get("kv_heads") is not None:
                heads &= {h for h in range(c.num_attention_heads) if h // group in keep["kv_heads"][j]}
            for h in set(range(c.num_attention_heads)) - heads:
                o[:, h * hd:(h + 1) * hd] = 0
            if keep.get("mlp") is not None:
                drop = sorted(set(range(c.intermediate_size)) - set(keep["mlp"][j]))
                down[:, drop] = 0
        if keep.get("hidden") is not None:
            drop = sorted(set(range(c.hidden_size)) - set(keep["hidden"]))
            m.get_input_embeddings().weight[:, drop] = 0
            for layer in m.model.layers:
                layer.self_attn.o_proj.weight[drop] = 0
                layer.mlp.down_proj.weight[drop] = 0
    return m


def assert_slice_equals_zeroed(model, keep, ids):
    reference = zeroed(model, keep)(ids).logits
    full = model(ids).logits
    assert (reference - full).abs().max() > 1e-3  # the removed units did matter
    sliced = slice_model(copy.deepcopy(model), keep)
    diff = (sliced(ids).logits - reference).abs().max().item()
    assert diff < 1e-5, diff
    return sliced


IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(1))

KEEPS = {
    "heads": {"heads": [[0, 2, 3, 5], [1, 2, 4, 5], [0, 1, 3, 4]]},
    "kv_groups": {"kv_heads": [[1], [0], [1]]},
    "mlp": {"mlp": [list(range(0, 64, 2)), list(range(32)), list(range(32, 64))]},
    "hidden": {"hidden": [i for i in range(96) if i % 4 != 1]},
    "layers": {"layers": [0, 2]},
    "all": {"layers": [0, 2], "kv_heads": [[0, 1], [1, 0]], "heads": [[1, 2, 3, 5], [0, 2, 3, 4]],
            "mlp": [list(range(40)), list(range(24, 64))], "hidden": list(range(0, 96, 2))},
}


@pytest.mark.parametrize("name", list(KEEPS))
@pytest.mark.parametrize("tied", [1, 0])
def test_sliced_equals_zeroed(name, tied):
    model, _ = make_model(SPEC + f",tied={tied}")
    sliced = assert_slice_equals_zeroed(model, KEEPS[name], IDS)
    shape = source_shape(sliced.config)
    assert shape_parameters(shape, sliced.config.vocab_size, bool(tied)) == count_parameters(sliced)
    if tied:
        assert sliced.lm_head.weight is sliced.model.embed_tokens.weight


def test_all_together_shape_and_layer_idx():
    model, _ = make_model()
    sliced = slice_model(model, KEEPS["all"])
    assert source_shape(sliced.config) == {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 4,
                                           "num_key_value_heads": 2, "intermediate_size": 40, "head_dim": 16}
    assert [layer.self_attn.layer_idx for layer in sliced.model.layers] == [0, 1]
    assert sliced.model.layers[0].self_attn.num_key_value_groups == 2


def test_uneven_heads_per_group_are_refused():
    model, _ = make_model()
    with pytest.raises(ValueError, match="same number of heads in each kept KV group"):
        slice_model(model, {"heads": [[0, 1, 3], [0, 1, 3], [0, 1, 3]]})
    with pytest.raises(ValueError, match="different counts per layer"):
        slice_model(model, {"mlp": [list(range(10)), list(range(12)), list(range(10))]})


def test_saved_sliced_model_reloads_and_generates_with_cache(tmp_path):
    model, tok = make_model(SPEC + ",tied=1")
    sliced = slice_model(model, KEEPS["all"])
    save_model(sliced, tok, tmp_path / "m", {"method": "width"})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["head_dim"] == 16 and config["hidden_size"] == 48 and config["tie_word_embeddings"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded(IDS).logits, sliced(IDS).logits, atol=1e-5, rtol=0)
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(loaded.generate(prompt, use_cache=True, **kw), loaded.generate(prompt, use_cache=False, **kw))


def test_width_prune_keeps_top_units_and_hits_target():
    model, _ = make_model()
    scores = magnitude_scores(model)
    # make the choice predictable: layer 1 unimportant, KV group 1 best, head 4 worst within it
    scores["layers"][1] = 0
    scores["kv_heads"][:, 1] += 100
    scores["heads"][:, 4] = 0
    target = {"num_hidden_layers": 2, "hidden_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 32, "head_dim": 16}
    keep = choose_units(scores, source_shape(model.config), target)
    assert keep["layers"] == [0, 2] and keep["kv_heads"] == [[1], [1]] and keep["heads"] == [[3, 5], [3, 5]]
    assert keep["hidden"] == sorted(torch.topk(scores["hidden"], 48).indices.tolist())
    pruned, record = width_prune(model, target, scores)
    assert source_shape(pruned.config) == target
    assert count_parameters(pruned) == shape_parameters(target, pruned.config.vocab_size, True)
    assert record["removed_layers"] == [1] and record["kept"] == keep and record["method"] == "width"
    json.dumps(record)  # goes into shear.json


def test_prune_width_stage(tmp_path, monkeypatch):
    from shear.config import parse_params
    from shear.importance.width import write_width_scores
    from shear.models import load_model
    from stages import prune

    model, tok = make_model()
    monkeypatch.chdir(tmp_path)
    save_model(model, tok, "data/models/base", {"method": "base", "source": "tiny:"})
    write_width_scores(model, IDS, "magnitude", tmp_path / "reports" / "scores", batch_size=2)
    budget = shape_parameters(source_shape(model.config), 0, True)["non_embedding"] // 2
    params = parse_params({"prune": {"method": "width", "width": {"criterion": "magnitude"},
                                     "target": {"params": budget, "align": 8}}})
    prune.main(params, None)  # the stage: dispatches to stages/prune_width.py
    pruned, _, record = load_model("data/models/pruned")
    assert record["method"] == "width" and record["criterion"] == "magnitude"
    assert source_shape(pruned.config) == record["target_shape"]
    assert record["parameters"]["non_embedding"] <= budget
    assert (tmp_path / "data/checkpoints/prune").is_dir() and (tmp_path / "reports/train/prune").is_dir()
