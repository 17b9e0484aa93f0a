import math

import pytest
import torch

from shear.errors import ShearError
from shear.importance.blocks import (angular_scores, bi_scores, block_states, magnitude_scores, plot_block_scores,
                                     ppl_scores, ppl_scores_loop, random_scores, removed_by, score_blocks, sleb_scores,
                                     taylor_scores, unpruned_ppl)
from shear.models import make_tiny_model
from shear.nll import logits_nll
from shear.prune.depth import blocks_removed, remove_blocks
from tests.conftest import stdlib_texts



def text_rows(tokenizer, n_rows: int, seq_len: int) -> torch.Tensor:
    """Rows of real text (Python stdlib) tokenized with the tiny byte tokenizer (one byte per token)."""
    text = "\n".join(stdlib_texts(2))[: 2 * n_rows * seq_len]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)


@pytest.fixture(scope="module")
def trained():
    """A 6-block tiny LLaMA fitted to some text, so that every block matters; and its data."""
    torch.manual_seed(0)
    model, tok = make_tiny_model("layers=6,hidden=64,heads=4,kv_heads=2,mlp=128", seed=0)
    rows = text_rows(tok, 24, 48)
    train, calib = rows[:16], rows[16:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(60):
        batch = train[(step * 4) % 16:(step * 4) % 16 + 4]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), calib


def identity_at(model, block: int):
    """Zero the output projections of one block: its output equals its input."""
    with torch.no_grad():
        layer = model.model.layers[block]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    return model


def tiny_arch(kind: str, layers: int = 5):
    """A tiny random LLaMA, Qwen2 (q/k/v biases) or Mistral (sliding window) model."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    extra = {"sliding_window": 16} if kind == "mistral" else {}
    config = cls[0](vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **extra)
    torch.manual_seed(1)
    return cls[1](config).eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_fast_ppl_equals_the_straightforward_loop(kind):
    model = tiny_arch(kind)
    with torch.no_grad():  # make the blocks matter more than at init so the ranking is clear
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4)
    calib = torch.randint(0, 300, (5, 40), generator=torch.Generator().manual_seed(0))
    fast = ppl_scores(model, calib, batch_size=2, progress=False)
    loop = ppl_scores_loop(model, calib, batch_size=2, progress=False)
    assert len(fast) == 5
    for f, s in zip(fast, loop):
        assert abs(f - s) / s < 1e-4
    assert sorted(range(5), key=fast.__getitem__) == sorted(range(5), key=loop.__getitem__)
    # the model is left as it was
    assert model.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(5))


def test_fast_ppl_equals_deleting_the_block_for_real(trained):
    model, calib = trained
    fast = ppl_scores(model, calib, batch_size=3, progress=False)
    import copy

    pruned = remove_blocks(copy.deepcopy(model), [2])
    assert math.isclose(fast[2], unpruned_ppl(pruned, calib, batch_size=8), rel_tol=1e-4)


def test_block_states_are_each_blocks_input(trained):
    model, calib = trained
    states = block_states(model, calib[:2])
    assert len(states) == 7
    with torch.no_grad():
        final = model.model(input_ids=calib[:2]).last_hidden_state
    torch.testing.assert_close(model.model.norm(states[-1]), final)


@pytest.mark.parametrize("criterion", ["ppl", "bi", "taylor"])
def test_identity_block_ranks_least_important(trained, criterion):
    import copy

    model = identity_at(copy.deepcopy(trained[0]), 3)
    calib = trained[1]
    scores = score_blocks(model, calib, criterion, n=1, batch_size=4)["scores"]
    assert min(range(6), key=scores.__getitem__) == 3
    if criterion != "ppl":
        assert scores[3] == pytest.approx(0, abs=1e-6)


def test_angular_picks_the_span_of_identity_blocks(trained):
    import copy

    model = identity_at(identity_at(copy.deepcopy(trained[0]), 2), 3)
    scores, span = angular_scores(model, trained[1], batch_size=4, n=2)
    assert span == [2, 3]
    assert sorted(range(6), key=lambda i: (scores[i], i))[:2] == [2, 3]
    assert scores[2] == pytest.approx(0, abs=1e-3)


def test_sleb_with_one_step_equals_ppl(trained):
    model, calib = trained
    scores, order = sleb_scores(model, calib, batch_size=4, n=1)
    ppl = ppl_scores(model, calib, batch_size=4, progress=False)
    assert scores == ppl
    assert order == [min(range(6), key=ppl.__getitem__)]


def test_sleb_second_step_scores_the_pruned_model(trained):
    model, calib = trained
    scores, order = sleb_scores(model, calib, batch_size=4, n=2)
    with blocks_removed(model, order):
        assert math.isclose(scores[order[1]], unpruned_ppl(model, calib, 8), rel_tol=1e-4)
    assert scores[order[1]] <= min(s for i, s in enumerate(scores) if i not in order)


def test_magnitude_is_the_sum_of_absolute_weights(tiny):
    model, _ = tiny
    by_hand = sum(p.abs().sum().item() for p in model.model.layers[1].parameters())
    assert magnitude_scores(model)[1] == pytest.approx(by_hand, rel=1e-6)


def test_taylor_is_elementwise_first_order_terms(trained):
    model, calib = trained
    scores = taylor_scores(model, calib, batch_size=8)
    model.zero_grad()
    model(input_ids=calib, labels=calib).loss.backward()
    by_hand = sum((p * p.grad).abs().sum().item() for p in model.model.layers[4].parameters())
    model.zero_grad(set_to_none=True)
    assert scores[4] == pytest.approx(by_hand, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_bi_is_one_minus_cosine(trained):
    model, calib = trained
    states = block_states(model, calib)
    cos = torch.nn.functional.cosine_similarity(states[1], states[2], dim=-1).mean().item()
    assert bi_scores(model, calib, batch_size=3)[1] == pytest.approx(1 - cos, abs=1e-5)


def test_random_is_seeded():
    assert random_scores(10, 0) == random_scores(10, 0)
    assert random_scores(10, 0) != random_scores(10, 1)


def test_plus_criteria_protect_and_reuse_scores(trained, tmp_path):
    model, calib = trained
    memo = {}
    plain = score_blocks(model, calib, "ppl", n=2, batch_size=4, memo=memo)
    plus = score_blocks(model, calib, "ppl+", n=2, batch_size=4, keep_first=2, keep_last=1, memo=memo)
    assert plus["scores"] == plain["scores"] and plus["protected"] == [0, 1, 5]
    assert set(removed_by(plus)).isdisjoint({0, 1, 5}) and len(removed_by(plus)) == 2
    assert plus["calibration"] == {"sequences": 8, "seq_len": 48}
    sleb = score_blocks(model, calib, "sleb", n=2, batch_size=4, memo=memo)  # its first step from the memo
    assert (sleb["scores"], sleb["removal_order"]) == sleb_scores(model, calib, batch_size=4, n=2)
    plot_block_scores(plus, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_unknown_criterion_is_refused(tiny):
    with pytest.raises(ShearError, match="unknown block criterion 'ppl2'"):
        score_blocks(tiny[0], torch.zeros(1, 8, dtype=torch.long), "ppl2", n=1, batch_size=1)


def test_criteria_share_one_forward_pass_and_give_the_same_scores(trained):
    model, calib = trained
    alone = {c: score_blocks(model, calib, c, n=2, batch_size=4) for c in ("ppl", "bi", "angular")}
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        memo = {}
        shared = {c: score_blocks(model, calib, c, n=2, batch_size=4, memo=memo) for c in ("ppl", "bi", "angular")}
    finally:
        hook.remove()
    assert len(calls) == 2  # block 0 ran once per calibration batch (8 rows, batches of 4), no more
    assert shared == alone
    # the unpruned perplexity from the cached states equals the model's own forward
    by_forward = sum(logits_nll(model(input_ids=calib[i:i + 4]).logits, calib[i:i + 4]).item() for i in (0, 4))
    assert shared["ppl"]["unpruned_ppl"] == pytest.approx(math.exp(by_forward / (8 * 47)), rel=1e-6)


def test_block_taylor_keeps_the_width_taylor_scores_of_its_backward_pass(trained):
    from shear.importance.width import width_taylor_scores

    model, calib = trained
    memo = {}
    record = score_blocks(model, calib, "taylor", n=2, batch_size=4, memo=memo)
    alone = width_taylor_scores(model, calib, batch_size=4)  # what the width criterion computed by itself
    assert set(memo["width_taylor"]) == set(alone)
    for key, value in alone.items():
        torch.testing.assert_close(memo["width_taylor"][key], value, rtol=1e-5, atol=0)
    assert record["scores"] == pytest.approx(alone["layers"].tolist(), rel=1e-6)
