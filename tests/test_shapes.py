import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shear.errors import ShearError
from shear.models import count_parameters, layout, make_tiny_model, tensor_parallel
from shear.prune.shapes import (
    head_configs,
    nearest_valid_shapes,
    plan_shape,
    resolve_target,
    shape_parameters,
    source_shape,
    validate_shape,
)


def llama_config(layers, hidden, heads, kv, mlp, vocab, tied, head_dim=None):
    return LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=mlp, vocab_size=vocab,
                       tie_word_embeddings=tied, head_dim=head_dim or hidden // heads)


def smollm2_config():
    """SmolLM2-135M's shape (config only; nothing is downloaded or allocated)."""
    return llama_config(30, 576, 9, 3, 1536, 49152, True, head_dim=64)


def meta_count(shape, vocab, tied):
    config = llama_config(shape["num_hidden_layers"], shape["hidden_size"], shape["num_attention_heads"],
                          shape["num_key_value_heads"], shape["intermediate_size"], vocab, tied, shape["head_dim"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return count_parameters(model)


@pytest.mark.parametrize("spec", ["", "layers=2,hidden=48,heads=6,kv_heads=2,mlp=80,tied=0",
                                  "layers=3,hidden=32,heads=2,kv_heads=2,mlp=40,vocab=400,tied=1"])
def test_shape_parameters_equal_built_tiny_model(spec):
    model, _ = make_tiny_model(spec)
    tied = model.config.tie_word_embeddings
    assert shape_parameters(source_shape(model.config), model.config.vocab_size, tied) == count_parameters(model)


@pytest.mark.parametrize("layers,hidden,heads,mlp", [(24, 2048, 16, 5504), (32, 2560, 20, 6912), (32, 4096, 32, 11008)])
def test_shape_parameters_equal_sheared_llama_shapes_on_meta(layers, hidden, heads, mlp):
    # Sheared-LLaMA-1.3B and -2.7B cut from LLaMA-2-7B (head_dim 128, vocab 32000, untied)
    shape = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
             "num_key_value_heads": heads, "intermediate_size": mlp, "head_dim": 128}
    counts = shape_parameters(shape, 32000, tied=False)
    assert counts == meta_count(shape, 32000, False)
    if layers == 24:
        assert counts["total"] == 1_345_423_360  # the published Sheared-LLaMA-1.3B count


def test_explicit_target_keeps_missing_keys_and_validates():
    config = smollm2_config()
    shape = resolve_target(config, {"hidden_size": 384, "num_attention_heads": 6, "params": None}, align=64)
    assert shape == {"num_hidden_layers": 30, "hidden_size": 384, "num_attention_heads": 6,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "head_dim": 64}


@pytest.mark.parametrize("target,match", [
    ({"hidden_size": 1024}, r"prune\.target\.hidden_size=1024 exceeds the source's 576; nearest valid shapes: \("
                            r"num_hidden_layers=30, hidden_size=576, num_attention_heads=9"),
    ({"num_attention_heads": 8}, r"prune\.target\.num_attention_heads=8 is not a multiple of num_key_value_heads=3"
                                 r".*nearest valid shapes: .*num_attention_heads=9"),
    ({"num_attention_heads": 6, "num_key_value_heads": 1}, r"num_attention_heads=6 needs 6 query heads per KV group, "
                                                           r"but the source's groups have 3"),
    ({"hidden_size": 400, "num_attention_heads": 6}, r"prune\.target\.hidden_size=400 is not divisible by "
                                                     r"num_attention_heads=6; nearest valid shapes: .*hidden_size=396"),
    ({"num_key_value_heads": 2}, r"num_attention_heads=9 is not a multiple of num_key_value_heads=2"),
    ({"layers": 3}, r"prune\.target: unknown key layers"),
    ({}, r"prune\.target: give params"),
    ({"params": 10**9}, r"prune\.target\.params=1,000,000,000 exceeds the source's 106,203,456 non-embedding"),
    ({"params": 100}, r"prune\.target\.params=100 is too small for any valid shape; the smallest"),
    ({"params": 10**7, "num_attention_heads": 7}, r"prune\.target\.num_attention_heads=7 is not a valid GQA head count"
                                                   r".*valid num_attention_heads: 1, 2, 3, 4, 6, 9"),
])
def test_invalid_targets_are_refused_with_nearest_valid_shapes(target, match):
    with pytest.raises(ShearError, match=match):
        resolve_target(smollm2_config(), target, align=64)


def test_head_dim_must_stay():
    with pytest.raises(ShearError, match="head_dim=32 must stay the source's 64"):
        validate_shape(smollm2_config(), {"head_dim": 32})


def test_nearest_valid_shapes_are_valid():
    src = source_shape(smollm2_config())
    near = nearest_valid_shapes(src, {**src, "hidden_size": 500, "num_attention_heads": 8, "num_key_value_heads": 4})
    assert near
    for s in near:
        validate_shape(src, s)


def test_gqa_head_configs():
    src = source_shape(smollm2_config())  # 9 heads in 3 groups of 3
    assert head_configs(src) == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 3), (4, 2), (6, 2), (6, 3), (9, 3)]


@pytest.mark.parametrize("align", [64, 1])
def test_planner_halves_smollm2(align):
    config = smollm2_config()
    src = source_shape(config)
    budget = shape_parameters(src, config.vocab_size, True)["non_embedding"] // 2
    shape = resolve_target(config, {"params": budget}, align)
    validate_shape(config, shape)
    counts = meta_count(shape, config.vocab_size, True)
    assert counts == shape_parameters(shape, config.vocab_size, True)
    assert 0.97 * budget <= counts["non_embedding"] <= budget
    # aspect ratios kept: every dimension shrank, none by more than 2x the others
    ratios = [shape[k] / src[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "intermediate_size")]
    assert max(ratios) <= 1 and max(ratios) / min(ratios) < 2
    if align == 64:
        assert shape["hidden_size"] % 64 == 0 and shape["intermediate_size"] % 64 == 0


def test_planner_on_llama2_7b_budget_of_sheared_1_3b():
    config = llama_config(32, 4096, 32, 32, 11008, 32000, False)
    budget = shape_parameters({"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
                               "num_key_value_heads": 16, "intermediate_size": 5504, "head_dim": 128},
                              32000, False)["non_embedding"]
    shape = resolve_target(config, {"params": budget}, align=128)
    validate_shape(config, shape)
    got = shape_parameters(shape, 32000, False)["non_embedding"]
    assert 0.97 * budget <= got <= budget
    assert shape["hidden_size"] % 128 == 0 and shape["intermediate_size"] % 128 == 0


def test_planner_holds_fixed_keys_and_never_exceeds_budget():
    src = source_shape(smollm2_config())
    full = shape_parameters(src, 0, True)["non_embedding"]
    for fraction in (0.9, 0.6, 0.35, 0.1, 0.02):
        budget = int(full * fraction)
        for align in (1, 64):
            shape = plan_shape(src, budget, align)
            validate_shape(src, shape)
            assert shape_parameters(shape, 0, True)["non_embedding"] <= budget
    shape = resolve_target(smollm2_config(), {"params": full // 2, "num_hidden_layers": 30}, align=64)
    assert shape["num_hidden_layers"] == 30
    assert shape_parameters(shape, 0, True)["non_embedding"] <= full // 2


def test_planner_prefers_heads_that_split_over_8_devices():
    src = source_shape(llama_config(32, 4096, 32, 32, 11008, 32000, False))
    budget = shape_parameters(src, 0, True)["non_embedding"] // 2
    free = plan_shape(src, budget, 64, tp_divisible=1)
    assert tensor_parallel(free) == 1  # 25 heads: fits the budget, but no 2/4/8-GPU server
    shape = plan_shape(src, budget, 64, tp_divisible=8)
    assert tensor_parallel(shape) == 8 and shape["num_attention_heads"] % 8 == 0
    assert 0.97 * budget <= shape_parameters(shape, 0, True)["non_embedding"] <= budget
    # SmolLM2's 9 heads in 3 groups of 3 allow no 8-way split: the planner falls back to 4 or 2
    smol = resolve_target(smollm2_config(), {"params": 53_100_000}, align=64)
    assert tensor_parallel(smol) in (2, 4) and validate_shape(smollm2_config(), smol) is None


def test_tp_divisible_must_be_a_power_of_two_up_to_8():
    with pytest.raises(ShearError, match=r"prune\.target\.tp_divisible=3 is not valid; valid: 1, 2, 4, 8"):
        resolve_target(smollm2_config(), {"params": 10**7}, align=64, tp_divisible=3)


def test_budget_counts_biases():
    """A biased Llama's source count (the 'exceeds' check) and plan include every bias."""
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=300, attention_bias=True, mlp_bias=True)
    with torch.device("meta"):
        counted = count_parameters(LlamaForCausalLM(config))["non_embedding"]
    assert shape_parameters(source_shape(config), 0, True, layout(config))["non_embedding"] == counted
    with pytest.raises(ShearError, match=f"exceeds the source's {counted:,} non-embedding"):
        resolve_target(config, {"params": counted + 1}, align=1)
    shape = resolve_target(config, {"params": counted - 1}, align=1)
    assert shape_parameters(shape, 0, True, layout(config))["non_embedding"] <= counted - 1


LLAMA2_7B = (32, 4096, 32, 32, 11008, 32000, False)
SHEARED_LLAMA = {  # the paper's targets cut from LLaMA-2-7B: (layers, hidden, heads, MLP)
    "1.3b": (24, 2048, 16, 5504),
    "2.7b": (32, 2560, 20, 6912),
}


def sheared_llama_shape(name):
    layers, hidden, heads, mlp = SHEARED_LLAMA[name]
    return {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": heads, "intermediate_size": mlp, "head_dim": 128}


@pytest.mark.parametrize("name,tp_divisible", [("1.3b", 8), ("2.7b", 4)])
def test_budget_with_the_papers_depth_gives_sheared_llama_shapes(name, tp_divisible):
    config = llama_config(*LLAMA2_7B)
    paper = sheared_llama_shape(name)
    budget = shape_parameters(paper, 0, True)["non_embedding"]
    shape = resolve_target(config, {"params": budget, "num_hidden_layers": paper["num_hidden_layers"]},
                           align=64, tp_divisible=tp_divisible)
    assert shape == paper


def test_budget_alone_shrinks_depth_like_width_unlike_the_paper():
    # What the module docstring says: the planner keeps the source's aspect ratios, so the
    # 1.3B budget alone gives a shallower, wider model than the paper's hand-picked shape.
    config = llama_config(*LLAMA2_7B)
    paper = sheared_llama_shape("1.3b")
    shape = resolve_target(config, {"params": shape_parameters(paper, 0, True)["non_embedding"]},
                           align=64, tp_divisible=1)
    assert shape != paper
    depth = shape["num_hidden_layers"] / 32
    width = [shape[k] / s for k, s in (("hidden_size", 4096), ("num_attention_heads", 32),
                                      ("intermediate_size", 11008))]
    assert all(abs(depth - w) < 0.05 for w in width), (depth, width)
