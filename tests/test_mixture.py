"""Dynamic batch loading (Sheared-LLaMA): weight updates, sampling, resume, losses, references."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shear.data import load_split, rechunk
from shear.errors import ShearError
from shear.mixture import (DomainSampler, DynamicDomainSampler, build_sampler, continued_weights, domain_losses,
                           heldout_rows, initial_weights, log_mixture, plot_weights, reference_losses)

SEQ = 16


def toy_domains(rows=(40, 30, 20)) -> dict[str, np.ndarray]:
    """Domains whose tokens tell where they came from: domain i holds ids 100*i .. 100*i + 99."""
    rng = np.random.default_rng(0)
    return {name: (100 * i + rng.integers(0, 100, size=(n, SEQ))).astype(np.uint16)
            for i, (name, n) in enumerate(zip("abc", rows))}


def dynamic(**kw) -> DynamicDomainSampler:
    kw = {"reference": {"a": 2.0, "b": 2.0, "c": 2.0}, **kw}
    return DynamicDomainSampler(toy_domains(), SEQ, seed=0, **kw)


def test_excess_loss_gains_weight_and_no_excess_loses_it():
    s = dynamic()
    before = dict(s.weights)
    trajectory = [before]
    for _ in range(5):  # a stays above its reference, b sits at it, c below it
        trajectory.append(s.update({"a": 3.0, "b": 2.0, "c": 1.5}))
    for prev, new in zip(trajectory, trajectory[1:]):
        assert new["a"] > prev["a"]
        assert new["b"] < prev["b"] and new["c"] < prev["c"]
    # One step by hand: w_i ∝ w_i * exp(eta * max(loss_i - ref_i, 0)), then smoothing with c/k.
    s = dynamic(eta=0.5, smoothing=0.01)
    w = np.array([before[d] for d in "abc"]) * np.exp(0.5 * np.array([1.0, 0.0, 0.0]))
    expected = 0.99 * w / w.sum() + 0.01 / 3
    got = s.update({"a": 3.0, "b": 2.0, "c": 1.5})
    np.testing.assert_allclose([got[d] for d in "abc"], expected, rtol=1e-12)
    assert s.history == [{"weights": got, "losses": {"a": 3.0, "b": 2.0, "c": 1.5}}]


def test_no_excess_anywhere_keeps_weights_up_to_smoothing():
    s = dynamic(smoothing=0.0)
    before = dict(s.weights)
    after = s.update({"a": 1.0, "b": 2.0, "c": 0.5})
    assert after == pytest.approx(before, rel=1e-12)


def test_weights_sum_to_one_and_stay_above_floor():
    c = 1e-3
    s = dynamic(eta=50.0, smoothing=c, weights={"a": 1.0, "b": 0.0, "c": 1.0})  # a zero start is allowed
    rng = np.random.default_rng(1)
    for _ in range(50):
        w = s.update({d: 2.0 + float(rng.normal(0, 1.5)) for d in "abc"})
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
        assert min(w.values()) >= c / 3 * (1 - 1e-12)
    # A huge push drives the others to the floor, never below it.
    w = s.update({"a": 100.0, "b": 0.0, "c": 0.0})
    assert w["b"] == pytest.approx(c / 3, rel=1e-6) and w["c"] == pytest.approx(c / 3, rel=1e-6)


def test_empirical_frequencies_match_weights():
    s = dynamic(eta=1.0)
    s.update({"a": 2.0, "b": 3.5, "c": 2.5})  # move away from the size-proportional start
    counts = dict.fromkeys("abc", 0)
    for _ in range(200):
        batch, names = s.next_batch(64)
        for row, name in zip(batch, names):
            assert "abc"[int(row[0]) // 100] == name  # each row really comes from its domain
            counts[name] += 1
    n = sum(counts.values())
    for d in "abc":
        # 12800 draws: the standard error of a frequency is <= 0.0045; allow ~4 of them.
        assert abs(counts[d] / n - s.weights[d]) < 0.018, (d, counts[d] / n, s.weights[d])


def run(sampler, steps):
    """Draw batches, updating the weights every third step as a training loop would."""
    out = []
    for i in steps:
        batch, names = sampler.next_batch(8)
        out.append((batch.clone(), names))
        if i % 3 == 2 and isinstance(sampler, DynamicDomainSampler):
            sampler.update({"a": 2.5 + 0.1 * i, "b": 2.0, "c": 3.0 - 0.1 * i})
    return out


@pytest.mark.parametrize("cls", ["fixed", "dynamic"])
def test_resume_gives_the_same_batches(tmp_path, cls):
    ref = {"a": 2.0, "b": 2.0, "c": 2.0}
    make = lambda seed: build_sampler(cls, toy_domains(), SEQ, seed, None, ref, 1.0, 1e-4)  # noqa: E731
    whole = make(0)
    expected = run(whole, range(20))  # 20 steps in one go (more than an epoch of domain c)
    first = make(0)
    run(first, range(7))
    torch.save({"sampler": first.state_dict()}, tmp_path / "ckpt.pt")  # as a checkpoint stores it
    resumed = make(123)  # another seed: everything must come from the checkpoint
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt")["sampler"])
    got = run(resumed, range(7, 20))
    assert type(resumed) is (DomainSampler if cls == "fixed" else DynamicDomainSampler)
    for (b1, n1), (b2, n2) in zip(expected[7:], got):
        assert n1 == n2 and torch.equal(b1, b2)
    assert resumed.weights == whole.weights
    if cls == "dynamic":
        assert resumed.history == whole.history and len(whole.history) == 6


def test_unknown_domain_or_mixture_refused():
    with pytest.raises(ShearError, match="data.domain_weights names unknown domain 'zzz'"):
        build_sampler("dynamic", toy_domains(), SEQ, 0, {"a": 1.0, "zzz": 1.0}, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(ShearError, match="data.mixture='annealed'"):
        build_sampler("annealed", toy_domains(), SEQ, 0)
    with pytest.raises(ShearError, match="mixture.reference_loss.c"):
        build_sampler("dynamic", toy_domains(), SEQ, 0, None, {"a": 1.0, "b": 1.0})
    with pytest.raises(ShearError, match="no held-out loss for domain 'b'"):
        dynamic().update({"a": 1.0, "c": 1.0})


def test_domain_losses_equal_hand_computation(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    rows = {"x": torch.randint(0, 259, (5, 12), generator=g), "y": torch.randint(0, 259, (3, 12), generator=g)}
    for layer in model.model.layers:  # dropout in training mode: the measurement must switch it off
        layer.self_attn.attention_dropout = 0.5
    model.train()
    got = domain_losses(model, rows, batch_size=2)  # uneven batches: 2 + 2 + 1 rows
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        for d, x in rows.items():
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).mean()
            assert got[d] == pytest.approx(float(nll), rel=1e-5)
            assert got[d] == pytest.approx(float(model(input_ids=x, labels=x).loss), rel=1e-5)


def test_heldout_rows_are_first_eval_rows(shards, tiny):
    rows = heldout_rows(shards, tiny[1], n_sequences=3, seq_len=32)
    assert set(rows) == {"code", "prose"}
    for d, x in rows.items():
        assert x.dtype == torch.int64 and x.shape == (3, 32)
        np.testing.assert_array_equal(x.numpy(), rechunk(load_split(shards, d, "eval"), 32)[:3])
    with pytest.raises(ShearError, match="eval.npy: no held-out sequence"):
        heldout_rows(shards, tiny[1], n_sequences=1, seq_len=10**7)


def test_reference_losses_from_metrics_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"params": {"total": 10, "non_embedding": 5}, "ppl": {}, "ppl_protocol": {},
                                "loss": {"128": {"books": 3.1, "code": 1.2, "mean": 2.15},
                                         "1024": {"books": 2.9, "code": 1.0}}}))
    assert reference_losses(path, {}, ["books", "code"]) == {"books": 3.1, "code": 1.2}
    assert reference_losses(path, None, ["books"], seq_len=1024) == {"books": 2.9}
    assert reference_losses(path, {"code": 0.5}, ["books", "code"]) == {"books": 3.1, "code": 0.5}
    # Every domain given: the metrics file is not needed.
    assert reference_losses(tmp_path / "absent.json", {"books": 1.0}, ["books"]) == {"books": 1.0}
    with pytest.raises(ShearError, match="absent.json: not found"):
        reference_losses(tmp_path / "absent.json", {}, ["books"])
    with pytest.raises(ShearError, match="loss.128.math; give mixture.reference_loss.math"):
        reference_losses(path, {}, ["books", "math"])
    with pytest.raises(ShearError, match="mixture.reference_loss names unknown domain 'poetry'"):
        reference_losses(path, {"poetry": 1.0}, ["books"])
    path.write_text(json.dumps({"loss": {"128": {"books": 3.1}}}))  # not the evaluate stage's schema
    with pytest.raises(ShearError, match="metrics.json: no 'params'"):
        reference_losses(path, {}, ["books"])


def test_log_mixture_and_plot(tmp_path):
    from dvclive import Live

    s = dynamic()
    losses = {"a": 3.0, "b": 2.0, "c": 1.0}
    with Live(str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=None) as live:
        live.step = 3
        for step in (10, 20):
            s.update(losses)
            log_mixture(live, s, losses, step)
        assert live.step == 3  # the caller's step is left alone
    tsv = (tmp_path / "live" / "plots" / "metrics" / "mixture" / "weight" / "a.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["step", "a"]
    assert [r.split("\t")[0] for r in tsv[1:]] == ["10", "20"]
    assert float(tsv[2].split("\t")[1]) == pytest.approx(s.weights["a"])
    assert (tmp_path / "live" / "plots" / "metrics" / "mixture" / "loss" / "c.tsv").is_file()
    assert s.initial_weights != s.weights  # two updates moved the mixture away from where it started
    png = plot_weights(s, tmp_path / "weights.png", update_every=10)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def stage_dir(tmp_path, shards, monkeypatch, model, tok, name: str, record: dict) -> None:
    """A repository-like working directory: data/models/<name> and data/shards, as the stages find them."""
    from shear.models import save_model

    save_model(model, tok, tmp_path / "data" / "models" / name, record)
    (tmp_path / "data" / "shards").symlink_to(shards)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("bos", [False, True])
def test_unpruned_model_has_no_excess_loss_at_step_0(tmp_path, raw_corpus, tiny, monkeypatch, bos):
    """Δ = 0 exactly for every domain under the default protocol: the reference by the evaluate
    stage, the current loss by the dynamic mixture's rows and measurement (with and without BOS)."""
    import argparse

    from shear.config import Params
    from shear.data import build_shards, load_domains
    from shear.models import load_model
    from shear.paths import BASE_METRICS, BASE_MODEL, SHARDS
    from stages import evaluate as evaluate_stage
    from stages.retrain import heldout

    model, tok = tiny
    tok.add_bos_token = bos  # a tokenizer that adds BOS: the evaluate stage prepends it to every row
    shards = tmp_path / "shards"
    build_shards(raw_corpus, tok, shards, seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                 max_tokens_per_domain=200_000, seed=0)
    stage_dir(tmp_path, shards, monkeypatch, model, tok, "base", {"method": "tiny"})
    params = Params()  # the default protocol: 128 and 1024 tokens, 8192 tokens per domain, batch 8
    params.run.device, params.evaluate.tasks = "cpu", []
    evaluate_stage.main(params, argparse.Namespace(model="base"))
    domains = list(load_domains(SHARDS, "train"))
    reference = reference_losses(BASE_METRICS, {}, domains)

    model, tok, _ = load_model(BASE_MODEL)
    rows = heldout(params, tok, model.config, dynamic=True)
    assert {x.shape[1] for x in rows.values()} == {128 + bos}  # BOS in front: 128 scored targets per row
    assert {len(x) for x in rows.values()} == {params.evaluate.ppl_max_tokens // 128}  # 64 rows
    model.train()
    losses = domain_losses(model, rows)
    assert {d: losses[d] - reference[d] for d in domains} == dict.fromkeys(domains, 0.0)
    sampler = DynamicDomainSampler(load_domains(SHARDS, "train"), 32, 0, reference=reference, smoothing=0.0)
    assert sampler.update(losses) == pytest.approx(sampler.initial_weights, rel=1e-12)  # no push anywhere
    # The fixed mixture's logged loss is the first mixture.eval_sequences of the same rows.
    few = heldout(params, tok, model.config, dynamic=False)
    for d in domains:
        assert torch.equal(few[d], rows[d][:params.mixture.eval_sequences])


def test_measurement_runs_without_mixed_precision_autocast(tiny):
    """Under accelerate's bf16 autocast the training model's held-out loss equals the plain model's."""
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    rows = {"x": torch.randint(0, 259, (4, 32), generator=g)}
    plain = domain_losses(model, rows)
    AcceleratorState._reset_state(True)
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(copy.deepcopy(model))
        with torch.no_grad():
            autocast_loss = float(prepared(input_ids=rows["x"], labels=rows["x"]).loss)
        assert autocast_loss != pytest.approx(plain["x"], rel=1e-6)  # the wrapper does change the figure
        assert domain_losses(prepared, rows) == plain
        with torch.no_grad():
            assert float(prepared(input_ids=rows["x"], labels=rows["x"]).loss) == autocast_loss  # wrapper restored
    finally:
        AcceleratorState._reset_state(True)


def test_continued_weights_from_the_pruned_record():
    from shear.records import MixtureRecord

    final = {"code": 0.7, "prose": 0.3}
    record = {"method": "sheared", "mixture": MixtureRecord("dynamic", final, []).to_dict()}
    assert continued_weights(record, "shear.json", ["prose", "code"]) == final
    assert continued_weights({"method": "depth"}, "shear.json", ["code"]) is None
    assert continued_weights({"mixture": {"kind": "fixed", "final_weights": final}}, "shear.json", ["code"]) is None
    with pytest.raises(ShearError, match=r"shear.json: the pruning run's mixture has domains \['code', 'prose'\], "
                                         r"but the shards have \['books', 'code'\]; re-run the prune stage"):
        continued_weights(record, "shear.json", ["code", "books"])
    with pytest.raises(ShearError, match="shear.json mixture: final_weights must be finite weights >= 0"):
        continued_weights({"mixture": {"kind": "dynamic", "final_weights": {"code": -1.0}}}, "shear.json", ["code"])


def test_cpt_after_sheared_starts_from_the_recorded_final_weights(tmp_path, shards, tiny, monkeypatch):
    """The prune stage (sheared, dynamic) records its final weights; the retrain stage's dynamic
    sampler starts from them, not from the size-proportional weights."""
    import argparse

    from shear.config import parse_params
    from shear.data import load_domains
    from shear.models import load_model
    from shear.paths import PRUNED_MODEL, RETRAINED_MODEL
    from stages import prune_sheared, retrain

    model, tok = tiny
    stage_dir(tmp_path, shards, monkeypatch, model, tok, "base", {"method": "tiny"})
    params = parse_params({
        "run": {"device": "cpu"},
        # code far above its reference, prose below: the pruning run moves weight to code
        "mixture": {"reference_loss": {"code": 0.0, "prose": 9.0}, "update_every": 1},
        "prune": {"method": "sheared", "target": {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 2,
                                                  "num_key_value_heads": 1, "intermediate_size": 96},
                  "sheared": {"tokens": 2 * 4 * 32, "batch_size": 4, "seq_len": 32}},
        "retrain": {"method": "cpt", "tokens": 64, "batch_size": 2, "seq_len": 32},
    })
    assert params.mixture_kind() == "dynamic"
    prune_sheared.main(params, argparse.Namespace(params="params.yaml"))
    _, _, pruned = load_model(PRUNED_MODEL)
    final = pruned["mixture"]["final_weights"]
    proportional = initial_weights(load_domains("data/shards", "train"))
    assert final["code"] > proportional["code"] + 0.1  # the pruning run did move the mixture

    retrain.main(params, argparse.Namespace(params="params.yaml"))
    _, _, retrained = load_model(RETRAINED_MODEL)
    assert retrained["retrain"]["mixture_initial_weights"] == pytest.approx(final, rel=1e-12)
