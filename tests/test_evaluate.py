"""Perplexity against a hand computation, the evaluate stage's metrics schema, retention."""
import argparse
import copy
import importlib
import json
import math
import sys
import types

import pytest
import torch

import shear.evaluate as evaluate
from shear.config import EvaluateParams, Params, SpeedParams
from shear.data import build_shards
from shear.evaluate import non_numeric_keys, perplexity, retention, tokenizer_adds_bos
from shear.models import count_parameters, save_model
from shear.prune.depth import remove_blocks


def hand_nll(model, rows):
    """Mean next-token NLL the plain way: full logits, log-softmax, gather."""
    with torch.no_grad():
        logits = model(rows).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(2, rows[:, 1:, None]).squeeze(2)
    return -logp.mean().item(), logp.numel()


def test_perplexity_equals_hand_computation(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(evaluate, "LOGITS_CHUNK", 7)  # several lm_head chunks per batch
    rows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, rows, batch_size=2)  # batches of 2, 2, 1
    loss, tokens = hand_nll(model, rows)
    assert result["tokens"] == tokens == 5 * 11
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)

    with_bos = perplexity(model, rows, batch_size=5, bos_token_id=tok.bos_token_id)
    bos_rows = torch.cat([torch.full((5, 1), tok.bos_token_id), rows], dim=1)
    loss, tokens = hand_nll(model, bos_rows)
    assert with_bos["tokens"] == tokens == 5 * 12  # the first token is scored after BOS
    assert with_bos["loss"] == pytest.approx(loss, rel=1e-5)
    assert model.training is False


def test_byte_tokenizer_adds_no_bos(tiny):
    assert tokenizer_adds_bos(tiny[1]) is False


def test_retention_ratios():
    base = {"ppl": {"128": {"mean": 10.0}}, "tasks": {"a": {"acc": 0.5}, "b": {"acc": 0.25}}}
    pruned = {"ppl": {"128": {"mean": 20.0}}, "tasks": {"a": {"acc": 0.25}, "b": {"acc": 0.25}, "c": {"acc": 1.0}}}
    assert retention(pruned, base) == {"ppl_128": 0.5, "tasks": {"a": 0.5, "b": 1.0}, "acc_mean": 0.5 / 0.75}


def test_non_numeric_keys():
    metrics = {"a": {"b": 1, "c": "x", "d": float("nan"), "l": [1]}, "e": True, "n": None,
               "info": {"s": "ok"}, "speed": {"path": "eager", "x": None}}
    assert non_numeric_keys(metrics) == ["a.c", "a.d", "a.l", "e", "n", "speed.x"]


@pytest.fixture
def stage(monkeypatch):
    """stages.evaluate imported with a stand-in shear.speed (the real one benchmarks for seconds)."""
    fake = types.ModuleType("shear.speed")
    fake.measured = []  # parameter count of every model measured, in order

    def measure_speed(model, device, batch_sizes, prompt_len, new_tokens, repeats, paths=None):
        fake.measured.append(count_parameters(model)["total"])
        return {"decode": {f"batch_{b}": {"tokens_per_s": 100.0 * b} for b in batch_sizes}}

    fake.measure_speed = measure_speed
    fake.speedup = lambda speed, base: {"decode_batch_1": speed["decode"]["batch_1"]["tokens_per_s"]
                                        / base["decode"]["batch_1"]["tokens_per_s"]}
    monkeypatch.setitem(sys.modules, "shear.speed", fake)
    monkeypatch.setitem(sys.modules, "stages.evaluate", None)  # restored (or removed) after the test
    del sys.modules["stages.evaluate"]
    return importlib.import_module("stages.evaluate"), fake


def test_stage_metrics_schema(tmp_path, monkeypatch, tiny, raw_corpus, stage):
    stage, fake = stage
    model, tok = tiny
    model.config.max_position_embeddings = 32  # so a long length is clamped, and cheap
    monkeypatch.chdir(tmp_path)
    save_model(model, tok, "data/models/base", {"method": "base"})
    save_model(remove_blocks(copy.deepcopy(model), [1]), tok, "data/models/pruned", {"method": "depth"})
    build_shards(raw_corpus, tok, "data/shards", seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                 max_tokens_per_domain=100_000, seed=0)
    # 4096 is above the model's 32 positions: clamped; no lm-eval tasks here (see test_lmeval_tasks)
    params = Params(evaluate=EvaluateParams(ppl_seq_lens=[16, 4096], ppl_max_tokens=1024, batch_size=16, tasks=[],
                                            speed=SpeedParams(batch_sizes=[1, 2], prompt_len=8, new_tokens=2,
                                                              repeats=1)))
    params.run.device = "cpu"

    stage.main(params, argparse.Namespace(model="base"))
    base = json.loads((tmp_path / "reports/eval/base/metrics.json").read_text())
    assert base["params"] == count_parameters(model)
    assert set(base["ppl"]) == set(base["loss"]) == {"16", "4096"}
    for length in ("16", "4096"):
        assert set(base["ppl"][length]) == {"code", "prose", "mean"}
        assert base["ppl"][length]["code"] == pytest.approx(math.exp(base["loss"][length]["code"]))
        assert base["ppl"][length]["mean"] == pytest.approx(
            math.exp((base["loss"][length]["code"] + base["loss"][length]["prose"]) / 2))
    assert base["ppl_protocol"]["bos"] == 0
    assert base["ppl_protocol"]["seq_len"] == {"16": 16, "4096": 32}
    assert base["ppl_protocol"]["tokens"]["16"]["code"] == 64 * 15
    assert base["ppl_protocol"]["tokens"]["4096"]["code"] == 32 * 31
    assert base["speed"]["decode"]["batch_2"]["tokens_per_s"] == 200.0
    assert base["tasks"] == {} and "retention" not in base and "speedup" not in base
    assert non_numeric_keys(base) == []
    assert base["info"]["model"] == "base" and base["info"]["device"] == "cpu"

    stage.main(params, argparse.Namespace(model="pruned"))
    pruned = json.loads((tmp_path / "reports/eval/pruned/metrics.json").read_text())
    assert pruned["params"]["total"] < base["params"]["total"]
    # the base model's speed is measured again in the pruned model's run
    assert fake.measured == [base["params"]["total"], pruned["params"]["total"], base["params"]["total"]]
    assert pruned["speedup"] == {"decode_batch_1": 1.0}
    assert set(pruned["retention"]) == {"ppl_16", "ppl_4096"}
    assert pruned["retention"]["ppl_16"] == pytest.approx(base["ppl"]["16"]["mean"] / pruned["ppl"]["16"]["mean"])
    assert non_numeric_keys(pruned) == []
