"""Hard-concrete masks: sampling range, initial state, targets, exact selection, sizes."""
import pytest
import torch

from shear.errors import ShearError
from shear.models import architecture, make_tiny_model
from shear.prune.l0 import L0Masks, top_k_mask
from shear.prune.shapes import shape_parameters

SPEC = "layers=4,hidden=64,heads=4,kv_heads=2,mlp=128"


def source_and_target(**changes):
    model, _ = make_tiny_model(SPEC, seed=0)
    source = architecture(model.config)
    return source, {**source, **changes}


def randomise(masks, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in masks.masks.values():
            m.log_alpha.copy_(torch.randn(m.log_alpha.shape, generator=g) * 3)
    masks.constrain()


def test_samples_stay_in_unit_interval_and_hit_both_ends():
    masks = L0Masks(*source_and_target(hidden_size=32))
    randomise(masks)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for z in masks.sample(g).values():
            assert z.min() >= 0 and z.max() <= 1
    z = torch.cat([v.flatten() for v in masks.sample(g).values()])
    assert (z == 0).any() and (z == 1).any()  # hard: exact zeros and ones with positive probability


def test_initial_masks_keep_every_unit():
    source, target = source_and_target()
    masks = L0Masks(source, target)
    masks.constrain()
    for name, score in masks.expected_scores().items():
        assert score.min() > 0.99, name
    for name, z in masks.deterministic(exact=False).items():
        assert (z > 0.99).all(), name
    draws = torch.cat([z.flatten() for z in masks.sample(torch.Generator().manual_seed(0)).values()])
    assert (draws > 0).float().mean() > 0.99
    assert masks.parameters_kept(masks.expected_scores()) > 0.99 * shape_parameters(source, 0, True)["non_embedding"]


def test_target_sparsity_per_mask_type():
    # 4 heads over 2 KV groups -> 1 group of 2 heads: the kv mask prunes half the groups,
    # the head mask nothing inside a kept group.
    masks = L0Masks(*source_and_target(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=32, hidden_size=48))
    assert masks.target_sparsity() == pytest.approx(
        {"layer": 0.25, "head": 0.0, "kv_head": 0.5, "mlp": 0.75, "hidden": 0.25})
    # Same KV heads, half the query heads in each group: no kv mask.
    masks = L0Masks(*source_and_target(num_attention_heads=2, hidden_size=64))
    assert "kv_head" not in masks.masks
    assert masks.target_sparsity()["head"] == pytest.approx(0.5)


@pytest.mark.parametrize("heads,kv", [(2, 1), (2, 2), (4, 2)])
def test_exact_masks_keep_target_counts_and_whole_groups(heads, kv):
    masks = L0Masks(*source_and_target(num_hidden_layers=3, num_attention_heads=heads, num_key_value_heads=kv,
                                       intermediate_size=96, hidden_size=48))
    randomise(masks)
    z = masks.deterministic(exact=True)
    keep = masks.kept_units(z)
    assert len(keep["layers"]) == 3 and len(keep["hidden"]) == 48
    for qh, kvh, mlp in zip(keep["heads"], keep["kv_heads"], keep["mlp"]):
        assert len(qh) == heads and len(kvh) == kv and len(mlp) == 96
        assert {h // 2 for h in qh} == set(kvh)                         # heads only from kept groups
        assert all(sum(h // 2 == g for h in qh) == heads // kv for g in kvh)  # same count per group
    # Kept units carry their deterministic score, pruned ones exactly 0.
    assert (z["mlp"] > 0).sum(-1).tolist() == [96] * 4


def test_exact_selection_prefers_highest_scores():
    masks = L0Masks(*source_and_target(intermediate_size=2))
    with torch.no_grad():
        masks.masks["mlp"].log_alpha.fill_(-4.0)
        masks.masks["mlp"].log_alpha[:, [5, 7]] = 4.0
    z = masks.deterministic(exact=True)
    assert masks.kept_units(z)["mlp"] == [[5, 7]] * 4


def test_parameters_kept_equals_shape_count():
    source, target = source_and_target(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                       intermediate_size=96, hidden_size=48)
    masks = L0Masks(source, target)
    randomise(masks)
    binary = {k: (v != 0).float() for k, v in masks.deterministic(exact=True).items()}
    assert masks.parameters_kept(binary).item() == shape_parameters(target, 0, True)["non_embedding"]
    ones = {k: torch.ones_like(v) for k, v in binary.items()}
    assert masks.parameters_kept(ones).item() == shape_parameters(source, 0, True)["non_embedding"]


def test_lagrangian_is_zero_at_start_and_grows_with_the_gap():
    masks = L0Masks(*source_and_target(hidden_size=32))
    masks.constrain()
    assert masks.lagrangian(progress=0.0).item() == 0.0
    assert masks.target_sparsity(progress=0.0)["hidden"] == 0.0
    with torch.no_grad():  # the quadratic term alone: a penalty that grows with |s - t|
        for name, lam in masks.lambdas.items():
            lam.fill_(1.0 if name.endswith("_2") else 0.0)
    assert masks.target_sparsity(progress=0.5)["hidden"] == pytest.approx(0.25)
    assert masks.lagrangian(progress=1.0).item() > masks.lagrangian(progress=0.2).item()


def test_unreachable_target_is_refused():
    with pytest.raises(ShearError, match="head_dim"):
        L0Masks(*source_and_target(head_dim=8))
    with pytest.raises(ShearError, match="intermediate_size"):
        L0Masks(*source_and_target(intermediate_size=256))
    with pytest.raises(ShearError, match="multiple"):
        L0Masks(*source_and_target(num_attention_heads=3, num_key_value_heads=2, hidden_size=48))


def test_top_k_mask_per_row():
    s = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    assert top_k_mask(s, 1).tolist() == [[True, False, False], [False, True, False]]
    assert top_k_mask(s, torch.tensor([2, 0])).tolist() == [[True, False, True], [False, False, False]]


# ----------------------------------------------------------------------------- GQA: per-group constraint and cut

GQA_SPEC = "layers=2,hidden=64,heads=8,kv_heads=2,mlp=32"  # 2 KV groups of 4 query heads


def gqa_masks(heads, kv, spec=GQA_SPEC):
    model, _ = make_tiny_model(spec, seed=0)
    source = architecture(model.config)
    return L0Masks(source, {**source, "num_attention_heads": heads, "num_key_value_heads": kv})


def train_on_toy_objective(masks, steps=300, lr=1.0):
    """Learn the masks against a reward that prefers group 0's heads, under the Lagrangian.

    With a per-layer constraint the cheapest way to its target is to keep group 0 and drop
    group 1, a shape the per-group cut cannot produce; the per-group constraint must balance
    them. lr 1.0 for masks and multipliers, as the paper's run.
    """
    L, H = masks.masks["head"].log_alpha.shape
    reward = torch.tensor([4.0, 3, 2, 1, 0.4, 0.3, 0.2, 0.1]).expand(L, H) * 0.1
    optimizer = torch.optim.Adam([{"params": list(masks.masks.parameters()), "lr": lr},
                                  {"params": list(masks.lambdas.parameters()), "lr": lr, "maximize": True}])
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        masks.constrain()
        z = masks.sample(g)
        loss = -(reward * masks.effective_heads(z)).sum() + masks.lagrangian(progress=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    masks.constrain()


@pytest.mark.parametrize("heads,kv", [(4, 2), (2, 1)])
def test_gqa_training_reaches_per_group_target_and_cut_keeps_what_training_kept(heads, kv):
    masks = gqa_masks(heads, kv)
    per_group = heads // kv
    train_on_toy_objective(masks)
    with torch.no_grad():
        expected = masks.expected_scores()
        kept_per_group = expected["head"].view(2, 2, 4).sum(-1)           # [layers, KV groups]
    assert (kept_per_group - per_group).abs().max() < 0.25, kept_per_group
    if kv < 2:
        assert (expected["kv_head"].sum(-1) - kv).abs().max() < 0.25
    # The cut keeps exactly the heads that training kept (P(z > 0) > 0.5 after the group mask).
    z = masks.deterministic(exact=True)
    trained = masks.effective_heads(expected) > 0.5
    assert (masks.effective_heads(z) != 0).tolist() == trained.tolist()
    # The model evaluated during training (rounded expected sizes) is the model the cut makes.
    assert ((masks.deterministic(exact=False)["head"] != 0) == (z["head"] != 0)).all()


def test_gqa_cut_keeps_highest_scoring_heads_of_each_kept_group():
    masks = gqa_masks(2, 1)   # 1 of 2 KV groups kept, 2 of its 4 query heads
    randomise(masks, seed=3)
    scores = masks.masks["head"].score()
    kv_scores = masks.masks["kv_head"].score()
    keep = masks.kept_units(masks.deterministic(exact=True))
    for layer in range(2):  # a plain loop: best groups, then the best heads inside each
        groups = sorted(range(2), key=lambda k: -kv_scores[layer, k].item())[:1]
        heads = sorted(h for k in groups
                       for h in sorted(range(4 * k, 4 * k + 4), key=lambda h: -scores[layer, h].item())[:2])
        assert keep["kv_heads"][layer] == sorted(groups)
        assert keep["heads"][layer] == heads


@pytest.mark.parametrize("spec,heads,kv,groups", [
    (GQA_SPEC, 4, 2, 2),                                       # GQA: a constraint per KV group
    ("layers=2,hidden=64,heads=4,kv_heads=4,mlp=32", 2, 2, 1),  # MHA: the paper's per-layer constraint
])
def test_head_lagrangian_is_per_selection_group(spec, heads, kv, groups):
    masks = gqa_masks(heads, kv, spec)
    randomise(masks, seed=1)
    with torch.no_grad():
        for name, lam in masks.lambdas.items():
            lam.fill_({"head_1": 0.7, "head_2": 1.3}.get(name, 0.0))
    p = masks.masks["head"].expected_score()
    n = p.shape[-1] // groups
    target = 1 - (heads // kv if groups > 1 else heads) / n
    terms = []
    for layer in range(p.shape[0]):  # loop reference: one (gap, penalty) per layer and selection group
        for k in range(groups):
            gap = 1 - p[layer, k * n:(k + 1) * n].mean() - target
            terms.append(0.7 * gap + 1.3 * gap ** 2)
    assert masks.lagrangian(progress=1.0).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
