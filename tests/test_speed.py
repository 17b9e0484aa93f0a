"""shear.speed: the fast decode path gives generate's tokens, floors match a hand calculation,
and the benchmark runs end to end on CPU with tiny models (no timings are asserted)."""
import json

import pytest
import torch
from transformers import LlamaConfig, StaticCache

from shear.errors import ShearError
from shear.models import make_tiny_model
from shear.speed import compare_speed, floors, greedy_decode, ideal_speedup, kv_cache_bytes, measure_speed, speedup


def _peaky(spec="layers=2,hidden=64,heads=4,kv_heads=2,mlp=128"):
    """A tiny model with large weights, so its greedy tokens depend on the context (the default
    init gives near-uniform logits and repeats one token, which would hide a broken cache)."""
    model, _ = make_tiny_model(spec, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    model.generation_config.eos_token_id = None  # generate must not stop early or suppress EOS
    return model


def _prompt(model, batch=2, length=12):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def _generate(model, prompt, n):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False)
    return out[:, prompt.shape[1]:]


@torch.inference_mode()
def test_fast_path_gives_generate_tokens():
    model = _peaky()
    prompt = _prompt(model)
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 10)
    fast = greedy_decode(model, prompt, 10, cache)
    assert fast.shape == (2, 10)
    assert len(set(fast[0].tolist())) > 3  # the tokens vary, so a wrong cache would show
    assert torch.equal(fast, _generate(model, prompt, 10))
    # the cache is reset between runs: a second run gives the same tokens
    assert torch.equal(greedy_decode(model, prompt, 10, cache), fast)


@torch.inference_mode()
def test_compiled_step_gives_generate_tokens():
    # backend="eager" runs the dynamo capture (the part that must handle the static cache)
    # without inductor's slow C++ compilation; the GPU path adds inductor and CUDA graphs.
    model = _peaky("layers=1,hidden=32,heads=2,kv_heads=1,mlp=64")
    prompt = _prompt(model, length=6)
    torch._dynamo.reset()
    step = torch.compile(model.__call__, backend="eager", dynamic=False)
    cache = StaticCache(config=model.config, max_cache_len=6 + 6)
    try:
        assert torch.equal(greedy_decode(model, prompt, 6, cache, step=step), _generate(model, prompt, 6))
    finally:
        torch._dynamo.reset()


def test_floors_match_hand_calculation():
    # LLaMA-2-7B shape in bf16, batch 2, prompt 100, 20 new tokens; round machine numbers.
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, head_dim=128)
    non_emb = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096  # 6,476,271,616
    bw, rate = 2e12, 100e12
    f = floors(config, non_emb, batch=2, prompt_len=100, new_tokens=20, dtype_bytes=2, bandwidth=bw, flops_rate=rate)
    weights = 6_476_271_616 + 32000 * 4096  # non-embedding + lm_head read every step
    kv = 2 * 32 * 32 * 128 * 2 * 110 * 2  # K and V, 32 layers, 32 heads x 128, batch 2, mean context 110, 2 bytes
    assert f["decode_bytes"] == weights * 2 + kv
    assert f["decode_floor_ms"] == pytest.approx((weights * 2 + kv) / bw * 1e3)  # memory-bound
    prefill_flops = 2 * 6_476_271_616 * 200 + 2 * 32000 * 4096 * 2 + 2 * 32 * 32 * 128 * 2 * 100**2
    assert f["prefill_flops"] == prefill_flops
    assert f["prefill_floor_ms"] == pytest.approx(prefill_flops / rate * 1e3)  # compute-bound
    assert kv_cache_bytes(config, 2, 120, 2) == 2 * 32 * 32 * 128 * 2 * 120 * 2
    assert ideal_speedup(100, 80) == pytest.approx(1.25)


def test_measure_speed_and_speedup_on_cpu():
    model, _ = make_tiny_model("layers=2,hidden=32,heads=2,kv_heads=1,mlp=64", seed=0)
    small, _ = make_tiny_model("layers=1,hidden=32,heads=2,kv_heads=1,mlp=64", seed=0)
    kw = dict(batch_sizes=[2, 1], prompt_len=8, new_tokens=3, repeats=2)
    base = measure_speed(model, "cpu", paths=["eager", "generate_static"], baseline=True, **kw)
    s = measure_speed(small, "cpu", paths=["eager"], **kw)
    assert base["path"] in ("eager", "generate_static") and set(base["candidates"]) == {"eager", "generate_static"}
    assert list(base["batch"]) == ["bs1", "bs2"] and base["dtype"] == "float32"
    for row in base["batch"].values():
        assert row["decode_ms_per_token"] > 0 and row["decode_floor_ms"] > 0
        assert row["decode_ratio_to_floor"] == pytest.approx(row["decode_ms_per_token"] / row["decode_floor_ms"])
        assert row["speedup_over_generate"] > 0 and row["decode_spread"] >= 0
    assert set(base["baseline"]) == {"bs1", "bs2"}
    up = speedup(s, base)
    assert up["ideal"] == pytest.approx(base["non_embedding_params"] / s["non_embedding_params"])
    assert up["bs1"]["decode"] == pytest.approx(base["batch"]["bs1"]["decode_ms_per_token"]
                                                / s["batch"]["bs1"]["decode_ms_per_token"])
    json.dumps(base)  # ready for metrics.json


def test_decode_benchmark_runs_on_cpu(tmp_path):
    from bench.decode_speed import main

    out = tmp_path / "speed"
    main(["--device", "cpu", "--shape", "tiny", "--batch-sizes", "1", "--prompt-len", "8", "--new-tokens", "3",
          "--repeats", "1", "--paths", "eager", "--no-baseline", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    names = [r["variant"] for r in result["results"]]
    assert names == ["dense", "depth-20%", "depth-35%", "width-20%", "width-20%-a1"]
    depth20, width = result["results"][1], result["results"][3]
    assert [r["shape"].split()[0] for r in result["results"][:3]] == ["L6", "L5", "L4"]
    # the width model matches the depth-20% model's parameter count (planner tolerance 3%)
    assert width["non_embedding_params"] == pytest.approx(depth20["non_embedding_params"], rel=0.03)
    assert "cpu" in result["machine"] and "torch" in result["machine"]
    assert "| depth-35% |" in out.with_suffix(".md").read_text()


def test_shape_benchmark_cases_on_cpu():
    from bench.shape_speed import attention_cases, linear_cases

    cpu = torch.device("cpu")
    rows = linear_cases([("up", "out", 16, 32, [32, 31])], [1, 4], cpu, torch.float32, repeats=2, min_block_ms=0.1)
    assert [(r["tokens"], r["size"], r["in"], r["out"]) for r in rows] == [(1, 32, 16, 32), (1, 31, 16, 31),
                                                                            (4, 32, 16, 32), (4, 31, 16, 31)]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["cost_vs_ref"] == 1.0
    att = attention_cases([4, 3], 8, 2, 16, cpu, torch.float32, repeats=2, min_block_ms=0.1)
    assert [r["size"] for r in att] == [4, 3] and att[0]["cost_vs_ref"] == 1.0


def test_failing_path_is_recorded_and_skipped(monkeypatch):
    import shear.speed

    def broken(model, device):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(shear.speed, "compile_step", broken)
    model, _ = make_tiny_model("layers=1,hidden=32,heads=2,kv_heads=1,mlp=64", seed=0)
    s = measure_speed(model, "cpu", [1], prompt_len=4, new_tokens=2, repeats=1, paths=["compiled", "eager"])
    assert s["path"] == "eager" and list(s["candidates"]) == ["eager"]
    assert s["errors"] == {"compiled_bs1": "RuntimeError: no compiler here"}
    with pytest.raises(ShearError, match="not valid"):
        measure_speed(model, "cpu", [1], prompt_len=4, new_tokens=2, repeats=1, paths=["fast"])


def test_compare_speed_interleaves_runs(monkeypatch):
    """Every model is warmed up, then repeat r runs each model once starting from model r mod n."""
    import shear.speed

    names = {}
    log = []

    def fake_runner(model, path, batch, prompt_len, new_tokens, device, step_cache):
        def run():
            log.append((names[id(model)], batch))
            return 1.0, float(model.config.num_hidden_layers)  # decode time grows with depth
        return run, 1

    monkeypatch.setattr(shear.speed, "_runner", fake_runner)
    models = {}
    for name, layers in (("base", 3), ("pruned", 2), ("retrained", 1)):
        models[name], _ = make_tiny_model(f"layers={layers},hidden=32,heads=2,kv_heads=1,mlp=64", seed=0)
        names[id(models[name])] = name
    out = compare_speed(models, "cpu", [1, 2], prompt_len=4, new_tokens=3, repeats=3, paths=["eager"])
    warm = [("base", 1), ("pruned", 1), ("retrained", 1)]
    timed = [("base", 1), ("pruned", 1), ("retrained", 1), ("pruned", 1), ("retrained", 1), ("base", 1),
             ("retrained", 1), ("base", 1), ("pruned", 1)]
    assert log[:12] == warm + timed
    assert [b for _, b in log[12:]] == [2] * 12
    assert list(out["models"]) == ["base", "pruned", "retrained"] and list(out["speedup"]) == ["pruned", "retrained"]
    assert out["speedup"]["pruned"]["bs1"]["decode"] == pytest.approx(3 / 2)
    assert out["speedup"]["retrained"]["bs2"]["decode"] == pytest.approx(3.0)
    assert out["models"]["pruned"]["batch"]["bs2"]["tokens_per_s"] == pytest.approx(2 * 1e3 / 2)


def test_speed_stage(tmp_path, monkeypatch):
    """The stage times base, pruned and retrained in one run; an identical retrained model is timed once."""
    import argparse

    import stages.speed as stage
    from shear.config import Params, SpeedParams
    from shear.models import save_model
    from shear.records import SpeedRecord, non_numeric_keys

    monkeypatch.chdir(tmp_path)
    base, tok = make_tiny_model("layers=2,hidden=32,heads=2,kv_heads=1,mlp=64", seed=0)
    pruned, _ = make_tiny_model("layers=1,hidden=32,heads=2,kv_heads=1,mlp=64", seed=0)
    save_model(base, tok, "data/models/base", {"method": "base"})
    save_model(pruned, tok, "data/models/pruned", {"method": "depth"})
    save_model(pruned, tok, "data/models/retrained", {"method": "depth", "retrain": {"method": "none"}})
    params = Params()
    params.evaluate.speed = SpeedParams(batch_sizes=[1], prompt_len=4, new_tokens=2, repeats=1)
    params.run.device = "cpu"
    stage.main(params, argparse.Namespace())
    data = json.loads((tmp_path / "reports/speed.json").read_text())
    record = SpeedRecord.from_dict(data, "speed.json")
    assert record.reference == "base" and set(record.models) == {"base", "pruned", "retrained"}
    assert record.models["retrained"]["same_as"] == "pruned"
    assert record.models["retrained"]["batch"] == record.models["pruned"]["batch"]
    assert record.decode_speedup("retrained", 1) == record.decode_speedup("pruned", 1) > 0
    assert record.decode_speedup("base", 1) == 1.0
    assert non_numeric_keys(data, strings_allowed=("reference", "models", "info")) == []
