"""Memory plan: numbers of a tiny model against a hand calculation; stages that do not fit stop first."""
import json

import pytest
import torch

from shear import plan
from shear.config import parse_params
from shear.errors import ShearError
from shear.models import count_parameters, make_tiny_model, save_model
from shear.plan import RUNTIME_BYTES, GiB, check_fits, model_shape, plan_stages

# layers=2, hidden=8, heads=2 (head_dim 4), kv_heads=1, mlp=16, vocab=320, untied
SPEC = "layers=2,hidden=8,heads=2,kv_heads=1,mlp=16,vocab=320,tied=0"
BLOCK = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16 + 2 * 8   # q, k, v, o, gate/up/down, two norms = 592
TOTAL = 2 * BLOCK + 320 * 8 + 320 * 8 + 8                      # blocks, embeddings, LM head, final norm = 6312
RUNTIME = RUNTIME_BYTES["cpu"]


def small_params(**sections):
    raw = {"score": {"block_criteria": ["ppl"], "width_criteria": [], "calib_sequences": 2, "calib_seq_len": 4,
                     "batch_size": 2},
           "prune": {"depth": {"criterion": "ppl"}},
           "retrain": {"method": "cpt", "batch_size": 2, "seq_len": 8},
           "evaluate": {"ppl_seq_lens": [4], "batch_size": 2, "speed": {"batch_sizes": [1, 3], "prompt_len": 5,
                                                                       "new_tokens": 3}}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return parse_params(raw)


@pytest.fixture(scope="module")
def config():
    return make_tiny_model(SPEC)[0].config


def test_parameter_counts_by_hand(config):
    s = model_shape(config)
    assert (s.block_params, s.embedding_params, s.head_params, s.norm_params) == (BLOCK, 2560, 2560, 8)
    assert s.total == TOTAL == count_parameters(make_tiny_model(SPEC)[0])["total"]


def test_stage_memory_by_hand(config):
    plans = plan_stages(small_params(), config, torch.float32, "cpu", 64 * GiB)
    # score: float32 weights; states entering each block and the last output: 3 x (2 x 4 tokens) x 8 x 4 B;
    # transient: the logits (8 positions x 320 x (4 + 4 + 4)) exceed one block's, plus one hidden state
    score = plans["score"].memory
    assert (score.weights, score.calibration, score.gradients) == (TOTAL * 4, 3 * 8 * 8 * 4, 0)
    assert score.activations == 8 * 320 * 12 + 8 * 8 * 4
    assert score.total == TOTAL * 4 + 768 + 30976 + RUNTIME
    # CPT: float32 weights + two AdamW moments = 12 B per parameter; per token per block autograd keeps
    # 4 x (2d + q + kv + 4q + q + 4I) + 16d = 4 x 132 + 128 = 656 B; the loss on the shifted logits keeps
    # 5 float32 [tokens, vocab] tensors (logits, slice copy, log-probs and two gradients). The peak is the
    # start of the backward: every activation, and of the gradients only the LM head's and the final
    # norm's (one micro-batch, one process: none carried over)
    cpt = plans["retrain"].memory
    assert (cpt.weights, cpt.gradients, cpt.optimizer) == (TOTAL * 4, (2560 + 8) * 4, TOTAL * 8)
    assert cpt.activations == 2 * 16 * 656 + 16 * 320 * 20
    # with gradient accumulation every gradient is alive during the next micro-batch's forward
    accum = plan_stages(small_params(retrain={"grad_accum": 2}), config, torch.float32, "cpu", 64 * GiB)
    assert accum["retrain"].memory.gradients == TOTAL * 4
    assert plans["retrain"].checkpoint_bytes == TOTAL * 12
    # speed: static KV cache of 2 (K, V) x 2 layers x 1 KV head x 4 dims x batch 3 x 8 positions x 4 B
    assert plans["speed"].memory.kv_cache == 2 * 2 * 1 * 4 * 3 * 8 * 4


def test_processes_and_micro_batch_to_fit(config):
    params = small_params(retrain={"batch_size": 8})
    full = plan_stages(params, config, torch.float32, "cpu", 64 * GiB)["retrain"]
    assert (full.processes, full.micro_batch) == (1, 8)
    state = TOTAL * 12 + (2560 + 8) * 4  # weights, moments, the LM head's and final norm's gradients
    per_sequence = 2 * 8 * 656 + 8 * 320 * 20
    # room for the optimizer state and 3 sequences: one process at micro-batch 3
    tight = plan_stages(params, config, torch.float32, "cpu", RUNTIME + state + 3 * per_sequence + 10)["retrain"]
    assert (tight.processes, tight.micro_batch) == (1, 3)
    # one process cannot hold the state and one sequence: sharded over 2 processes (half the weights,
    # moments and gradients, which DDP/FSDP keep all the time, and two gathered blocks each)
    budget = RUNTIME + TOTAL * 16 // 2 + 2 * BLOCK * 4 + per_sequence + 10
    assert budget < RUNTIME + state + per_sequence
    sharded = plan_stages(params, config, torch.float32, "cpu", budget)["retrain"]
    assert (sharded.processes, sharded.micro_batch) == (2, 1)


def test_layerwise_chosen_when_the_whole_model_does_not_fit(config):
    params = small_params()
    whole = plan_stages(params, config, torch.float32, "cpu", 64 * GiB)["score"]
    small = plan_stages(params, config, torch.float32, "cpu", whole.memory.total - 1)["score"]
    assert not whole.layerwise and small.layerwise and small.memory.weights == 2560 * 4 + 8 * 4
    with_taylor = plan_stages(small_params(score={"block_criteria": ["taylor"]},
                                           prune={"depth": {"criterion": "taylor"}}), config, torch.float32, "cpu",
                              whole.memory.total - 1)["score"]
    assert not with_taylor.layerwise and "need the whole model" in with_taylor.notes[0]
    forced = plan_stages(small_params(score={"layerwise": True}), config, torch.float32, "cpu", 64 * GiB)["score"]
    assert forced.layerwise


def test_check_fits_one_line(config):
    p = plan_stages(small_params(), config, torch.float32, "cpu", 64 * GiB)["retrain"]
    check_fits(p, p.memory.total, "nothing")
    with pytest.raises(ShearError) as e:
        check_fits(p, p.memory.total - 1, "set retrain.batch_size=1")
    assert "\n" not in str(e.value) and "retrain (cpt)" in str(e.value) and "retrain.batch_size=1" in str(e.value)


@pytest.fixture
def repo(tmp_path, monkeypatch, shards):
    """A working directory with a saved tiny base model and shards, as the stages expect."""
    model, tok = make_tiny_model("layers=4,hidden=64,heads=4,kv_heads=2,mlp=128", seed=0)
    save_model(model, tok, tmp_path / "data/models/base", {"source": "tiny"})
    (tmp_path / "data/shards").symlink_to(shards)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("stage,what_to_change", [
    ("score", "taylor"), ("evaluate", "evaluate.batch_size"), ("speed", "evaluate.speed.batch_sizes"),
    ("depth", "set run.dtype: bfloat16"), ("width", "set run.dtype: bfloat16")])
def test_stage_that_does_not_fit_stops_first_and_writes_nothing(repo, monkeypatch, stage, what_to_change):
    import argparse
    import shutil

    from stages import evaluate, prune, score, speed

    for name in ("pruned", "retrained"):  # the speed stage holds all three models at once
        shutil.copytree(repo / "data/models/base", repo / f"data/models/{name}")
    monkeypatch.setattr(plan, "device_memory", lambda device: 10**6)
    params = small_params(score={"block_criteria": ["ppl", "taylor"], "width_criteria": ["activation"]},
                          prune={"method": stage if stage in ("depth", "width") else "depth"})
    with pytest.raises(ShearError) as e:
        if stage == "score":
            score.main(params, argparse.Namespace())
        elif stage == "evaluate":
            evaluate.main(params, argparse.Namespace(model="base"))
        elif stage == "speed":
            speed.main(params, argparse.Namespace())
        else:
            prune.main(params, argparse.Namespace())
    message = str(e.value)
    assert "\n" not in message and "GiB per device" in message and what_to_change in message
    assert not (repo / "reports").exists()
    assert sorted(p.name for p in (repo / "data/models").iterdir()) == ["base", "pruned", "retrained"]
    assert not (repo / "data/checkpoints").exists()


def test_speed_plan_holds_every_model_at_once(repo, monkeypatch):
    """The speed stage's check adds the weights of base, pruned and retrained (they are timed in one process)."""
    from shear.models import load_model, read_config
    from shear.prune.depth import remove_blocks

    model, tok, _ = load_model(repo / "data/models/base")
    remove_blocks(model, [0, 1])
    save_model(model, tok, repo / "data/models/pruned", {"method": "depth"})
    params = small_params()
    dirs = [repo / f"data/models/{n}" for n in ("base", "pruned", "pruned")]
    both = plan.check_speed(params, dirs, torch.device("cpu"))
    single = [plan_stages(params, read_config(d), torch.float32, "cpu", 64 * GiB)["speed"].memory for d in dirs[:2]]
    assert both.memory.weights == single[0].weights + 2 * single[1].weights
    assert both.memory.kv_cache == single[0].kv_cache and both.memory.runtime == RUNTIME
    monkeypatch.setattr(plan, "device_memory", lambda device: both.memory.total - 1)
    with pytest.raises(ShearError, match="speed: needs"):
        plan.check_speed(params, dirs, torch.device("cpu"))


def test_score_stage_runs_layer_by_layer_when_the_model_does_not_fit(repo, monkeypatch, capsys):
    """Same records as whole-model scoring, when the plan picks layer-by-layer scoring."""
    import argparse

    from stages import score

    params = small_params(score={"block_criteria": ["ppl", "bi", "angular", "magnitude"],
                                 "width_criteria": ["activation"], "calib_sequences": 3, "calib_seq_len": 32})
    score.main(params, argparse.Namespace())
    whole = {p.name: json.loads(p.read_text()) for p in (repo / "reports/scores").glob("*.json")}
    config = make_tiny_model("layers=4,hidden=64,heads=4,kv_heads=2,mlp=128")[0].config
    need = plan_stages(params, config, torch.float32, "cpu", 64 * GiB)["score"].memory.total
    monkeypatch.setattr(plan, "device_memory", lambda device: need - 1)  # whole model: 1 byte short
    capsys.readouterr()
    score.main(params, argparse.Namespace())
    assert "layer by layer" in capsys.readouterr().out
    layerwise = {p.name: json.loads(p.read_text()) for p in (repo / "reports/scores").glob("*.json")}
    assert set(whole) == set(layerwise) == {"block_ppl.json", "block_bi.json", "block_angular.json",
                                            "block_magnitude.json", "width_activation.json"}

    def numbers(x):
        return [v for item in x for v in numbers(item)] if isinstance(x, list) else [x]

    for name in whole:
        a, b = whole[name], layerwise[name]
        assert a.keys() == b.keys(), name
        for key in a:
            if isinstance(a[key], (list, float)):
                x, y = numbers(a[key]), numbers(b[key])
                assert len(x) == len(y) and all(abs(u - v) <= 1e-5 * abs(u) for u, v in zip(x, y)), (name, key)
            else:
                assert a[key] == b[key], (name, key)


@pytest.mark.parametrize("layerwise", [False, True])
def test_score_stage_in_bfloat16(repo, layerwise):
    """run.dtype: bfloat16 on the CPU: the score stage loads (or reads block by block) in bf16 and scores."""
    import argparse

    from stages import score

    params = small_params(run={"dtype": "bfloat16"}, score={"block_criteria": ["ppl", "bi"], "width_criteria":
                                                           ["activation"], "layerwise": layerwise})
    score.main(params, argparse.Namespace())
    record = json.loads((repo / "reports/scores/block_ppl.json").read_text())
    assert len(record["scores"]) == 4 and all(s > 1 for s in record["scores"])
    assert (repo / "reports/scores/width_activation.json").is_file()


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision: the
    bf16 stages below need their own, and the tests after them the usual one ("no" on the CPU)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_prune_and_retrain_stages_in_bfloat16(repo, monkeypatch, fresh_accelerator_state):
    """run.dtype: bfloat16 on the CPU. Depth and width pruning load, cut and save in bf16; sheared
    pruning and CPT train float32 master weights under bf16 autocast; LoRA trains float32 adapters
    over a bf16 frozen base. Every written model loads and has the target shape."""
    import argparse

    from safetensors import safe_open

    from shear.models import load_model
    from stages import prune, retrain, score

    def stored_dtypes(directory):
        with safe_open(str(repo / directory / "model.safetensors"), framework="pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}

    args = argparse.Namespace(params="params.yaml")
    train = {"batch_size": 2, "seq_len": 32, "tokens": 2 * 2 * 32}
    params = small_params(run={"dtype": "bfloat16"}, data={"mixture": "fixed"},
                          score={"block_criteria": ["ppl"], "width_criteria": ["activation"]},
                          prune={"depth": {"criterion": "ppl", "ratio": None, "num_blocks": 1},
                                 "target": {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2,
                                            "num_key_value_heads": 1, "intermediate_size": 64},
                                 "sheared": {**train, "checkpoint_every": 1}},
                          retrain={**train, "eval_every": 1, "checkpoint_every": 1},
                          mixture={"eval_sequences": 2})
    score.main(params, args)
    for method, kept_dtype in (("depth", "BF16"), ("width", "BF16"), ("sheared", "F32")):
        params.prune.method = method
        prune.main(params, args)
        pruned, _, record = load_model("data/models/pruned")
        assert stored_dtypes("data/models/pruned") == {kept_dtype}, method
        assert pruned.config.num_hidden_layers == 3 and record["method"] == method
    assert pruned.config.hidden_size == 32

    seen = {}
    real_train = retrain.train

    def spy(model, sampler, cfg, accelerator, **kw):
        seen[cfg.method] = (accelerator.mixed_precision,
                            {(p.requires_grad, p.dtype) for p in model.parameters()})
        return real_train(model, sampler, cfg, accelerator, **kw)

    monkeypatch.setattr(retrain, "train", spy)
    for method in ("lora", "cpt"):
        params.retrain.method = method
        retrain.main(params, args)
        retrained, _, record = load_model("data/models/retrained")
        assert record["retrain"]["method"] == method and stored_dtypes("data/models/retrained") == {"F32"}
        assert retrained.config.hidden_size == 32
    # LoRA: frozen bf16 base, trained float32 adapters; CPT: every weight float32 and trained
    assert seen["lora"] == ("bf16", {(False, torch.bfloat16), (True, torch.float32)})
    assert seen["cpt"] == ("bf16", {(True, torch.float32)})
