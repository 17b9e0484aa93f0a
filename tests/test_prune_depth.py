import json
import shutil
import subprocess
import sys

import pytest
import torch

from shear.config import Params
from shear.errors import ShearError
from shear.importance.blocks import sleb_scores
from shear.io import read_json
from shear.models import make_tiny_model, save_model
from shear.prune.depth import (
    blocks_removed,
    blocks_to_remove,
    check_protected,
    protected_blocks,
    prune_iterative,
    remove_blocks,
    select_blocks,
)


def test_ratio_rounds_to_whole_blocks():
    assert blocks_to_remove(30, 30 * 1000, 0.2, None) == 6
    assert blocks_to_remove(30, 30 * 1000, 0.25, None) == 8  # 7.5 rounds half up
    assert blocks_to_remove(32, 32 * 7, 0.35, None) == 11  # 11.2
    assert blocks_to_remove(30, 30 * 1000, 0.2, 3) == 3  # num_blocks wins


@pytest.mark.parametrize("ratio, num_blocks, message", [
    (0.01, None, r"prune.depth.ratio=0.01 removes no block of 30 \(rounds to 0\); valid: prune.depth.ratio in \[0.0167, 0.983\)"),
    (0.99, None, r"prune.depth.ratio=0.99 removes every block \(30 of 30\)"),
    (None, 30, r"prune.depth.num_blocks=30 removes every block .*prune.depth.num_blocks in 1..29"),
    (None, None, r"needs prune.depth.ratio"),
])
def test_bad_targets_are_refused(ratio, num_blocks, message):
    with pytest.raises(ShearError, match=message):
        blocks_to_remove(30, 30 * 1000, ratio, num_blocks)


def test_protected_blocks_and_conflicts():
    assert protected_blocks("ppl", 30, 4, 2) == []
    assert protected_blocks("taylor+", 30, 4, 2) == [0, 1, 2, 3, 28, 29]
    with pytest.raises(ShearError) as e:
        check_protected(26, 30, protected_blocks("ppl+", 30, 4, 2), "ppl+", "prune.depth.num_blocks=26")
    assert str(e.value) == "params.yaml: prune.depth.num_blocks=26 conflicts with ppl+ protecting 6 of 30 blocks; valid: 1..24"
    check_protected(24, 30, protected_blocks("ppl+", 30, 4, 2), "ppl+", "prune.depth.num_blocks=24")
    with pytest.raises(ShearError, match="unknown block criterion 'depth'"):
        protected_blocks("depth", 30, 4, 2)


def test_select_blocks():
    record = {"criterion": "ppl+", "scores": [0.1, 5, 3, 1, 4, 0.2]}
    assert select_blocks(record, 2) == [0, 5]
    assert select_blocks(record, 2, protected=[0, 5]) == [2, 3]
    sleb = {"criterion": "sleb", "scores": [9, 1, 2, 3], "removal_order": [2, 1]}
    assert select_blocks(sleb, 2) == [1, 2]
    with pytest.raises(ShearError, match="re-run the score stage"):
        select_blocks(sleb, 3)


def test_blocks_removed_restores_the_model(tiny):
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(ids).logits
        with blocks_removed(model, [1, 2]):
            assert model.config.num_hidden_layers == 2
            assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]
        torch.testing.assert_close(model(ids).logits, before)
    assert model.config.num_hidden_layers == 4
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2, 3]


def test_iterative_ppl_follows_sleb(tiny):
    import copy

    from shear.importance.blocks import ppl_scores

    model, _ = tiny
    with torch.no_grad():  # make the blocks matter more than at init so the ranking is clear
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.mul_(4)
    calib = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    _, order = sleb_scores(model, calib, batch_size=3, n=2)
    pruned = copy.deepcopy(model)
    pruned, removed, steps = prune_iterative(pruned, 2, ppl_scores(model, calib, 3, progress=False),
                                             lambda m, k: ppl_scores(m, calib, 3, progress=False))
    assert removed == order
    assert pruned.config.num_hidden_layers == 2 and steps[1]["blocks"] == [b for b in range(4) if b != order[0]]


def test_iterative_never_removes_protected(tiny):
    model, _ = tiny
    _, removed, _ = prune_iterative(model, 2, [0.0, 1, 2, 3], lambda m, k: [0.0] * m.config.num_hidden_layers,
                                    protected=[0, 3])
    assert sorted(removed) == [1, 2]


def scaled_blocks(factors):
    """A tiny model whose block i has its weight matrices scaled by factors[i]: magnitude ranks them."""
    model, _ = make_tiny_model(f"layers={len(factors)},hidden=32,heads=2,kv_heads=1,mlp=64", seed=1)
    with torch.no_grad():
        for layer, f in zip(model.model.layers, factors):
            for p in layer.parameters():
                if p.dim() == 2:
                    p.mul_(f)
    return model


def test_healing_between_rounds_changes_the_next_choice_in_original_indices():
    from shear.importance.blocks import block_magnitude, magnitude_scores

    factors = [2.0, 4.0, 1.0, 5.0, 3.0]  # magnitude order: 2 < 0 < 4 < 1 < 3
    _, plain, _ = prune_iterative(scaled_blocks(factors), 2, magnitude_scores(scaled_blocks(factors)),
                                  lambda m, k: magnitude_scores(m))
    assert plain == [2, 0]

    seen = []

    def heal(m, r):  # stands in for training: after round 0, original block 0 (now first) grows
        seen.append([round(block_magnitude(layer)) for layer in m.model.layers])
        with torch.no_grad():
            if r == 0:
                for p in m.model.layers[0].parameters():
                    p.mul_(10)
        return m, {"round": r}

    model = scaled_blocks(factors)
    model, removed, rounds = prune_iterative(model, 2, magnitude_scores(model), lambda m, k: magnitude_scores(m),
                                             heal=heal)
    assert removed == [2, 4]  # the healed block 0 is kept; block 4 (current index 3) goes, reported as 4
    assert [r["removed"] for r in rounds] == [[2], [4]] and rounds[1]["blocks"] == [0, 1, 3, 4]
    assert [r["heal"] for r in rounds] == [{"round": 0}, {"round": 1}]
    assert len(seen[0]) == 4 and len(seen[1]) == 3  # healed after each round's removal, the last one included
    assert model.config.num_hidden_layers == 3


def test_rounds_of_several_blocks():
    from shear.importance.blocks import magnitude_scores

    factors = [2.0, 4.0, 1.0, 5.0, 3.0, 6.0]
    first = magnitude_scores(scaled_blocks(factors))
    # one round of n blocks is the one-shot choice
    _, removed, rounds = prune_iterative(scaled_blocks(factors), 3, first, lambda m, k: magnitude_scores(m),
                                         per_round=3)
    assert sorted(removed) == select_blocks({"scores": first}, 3) == [0, 2, 4] and len(rounds) == 1
    # 3 blocks, 2 per round: a round of 2 then a round of 1, each the lowest of the current model
    calls = []
    _, removed, rounds = prune_iterative(scaled_blocks(factors), 3, first,
                                         lambda m, k: calls.append(k) or magnitude_scores(m), per_round=2)
    assert removed == [2, 0, 4] and [r["removed"] for r in rounds] == [[2, 0], [4]] and calls == [1]


LOGITS_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([[3, 70, 71, 72, 100, 101, 102, 33]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
print(model.config.num_hidden_layers, [l.self_attn.layer_idx for l in model.model.layers])
"""


def test_pruned_checkpoint_reloads_in_a_fresh_process(tmp_path):
    model, tok = make_tiny_model("layers=5,hidden=64,heads=4,kv_heads=2,mlp=128", seed=3)
    remove_blocks(model, [1, 3])
    save_model(model, tok, tmp_path / "pruned", {"method": "depth", "removed_blocks": [1, 3]})
    script = tmp_path / "logits.py"
    script.write_text(LOGITS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "pruned"), str(tmp_path / "l.pt")],
                         capture_output=True, text=True, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.stdout.split("\n")[0] == "3 [0, 1, 2]"
    ids = torch.tensor([[3, 70, 71, 72, 100, 101, 102, 33]])
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "l.pt"), model(ids).logits)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3

    prompt = torch.tensor([tok("def main():").input_ids])
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == prompt.shape[1] + 12
    assert torch.equal(cached, uncached)


def stage_params(**depth) -> Params:
    params = Params()
    params.score.block_criteria = ["ppl", "ppl+", "taylor", "taylor+", "magnitude", "bi", "angular", "sleb", "random"]
    params.score.width_criteria = []
    params.score.calib_sequences, params.score.calib_seq_len, params.score.batch_size = 4, 32, 2
    params.score.keep_first, params.score.keep_last = 1, 1
    params.run.device = "cpu"
    params.prune.depth.ratio = 0.5  # 2 of 4 blocks
    for key, value in depth.items():
        setattr(params.prune.depth, key, value)
    return params


def test_score_and_prune_stages(tmp_path, monkeypatch, tiny, shards):
    from stages import prune, score

    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    save_model(model, tok, "data/models/base", {"method": "base", "source": "tiny:"})
    (tmp_path / "data" / "shards").symlink_to(shards)
    score.main(stage_params(), None)
    for c in stage_params().score.block_criteria:
        record = read_json(f"reports/scores/block_{c}.json")
        assert len(record["scores"]) == 4 and record["num_blocks"] == 2
        assert (tmp_path / "reports" / "scores" / f"block_{c}.png").is_file()
    assert read_json("reports/scores/block_ppl+.json")["protected"] == [0, 3]
    assert len(read_json("reports/scores/block_sleb.json")["removal_order"]) == 2

    prune.main(stage_params(criterion="ppl+"), None)
    info = read_json("data/models/pruned/shear.json")
    ppl = read_json("reports/scores/block_ppl+.json")["scores"]
    assert info["removed_blocks"] == [1, 2]  # the only unprotected ones
    assert info["method"] == "depth" and info["criterion"] == "ppl+" and info["scores"] == ppl
    assert info["parameters"]["total"] < info["parameters_before"]["total"]
    assert info["architecture"]["num_hidden_layers"] == 2
    assert (tmp_path / "data" / "checkpoints" / "prune").is_dir() and (tmp_path / "reports" / "train" / "prune").is_dir()

    prune.main(stage_params(criterion="taylor", mode="iterative", ratio=None, num_blocks=2), None)
    info = read_json("data/models/pruned/shear.json")
    assert info["mode"] == "iterative" and len(info["removal_steps"]) == 2
    taylor = read_json("reports/scores/block_taylor.json")["scores"]
    assert info["removed_blocks"][0] == min(range(4), key=taylor.__getitem__)

    with pytest.raises(ShearError, match="prune.depth.num_blocks=3 conflicts with ppl\\+ protecting 2 of 4 blocks; valid: 1..2"):
        prune.main(stage_params(criterion="ppl+", ratio=None, num_blocks=3), None)


@pytest.mark.parametrize("method", ["lora", "cpt"])
def test_prune_and_heal_stage(tmp_path, monkeypatch, tiny, shards, method):
    from transformers import AutoModelForCausalLM

    from shear.data import calibration_batch
    from stages import prune, prune_depth, score

    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    save_model(model, tok, "data/models/base", {"method": "base", "source": "tiny:"})
    (tmp_path / "data" / "shards").symlink_to(shards)
    params = stage_params(criterion="ppl", mode="iterative", ratio=None, num_blocks=2)
    params.score.block_criteria = ["ppl"]
    params.retrain.method, params.retrain.lr = method, 1e-3
    params.retrain.batch_size, params.retrain.seq_len = 2, 32  # 64 tokens a step
    params.mixture.eval_sequences = 2
    score.main(params, None)

    # heal_tokens 0 is today's iterative mode: SLEB's greedy order on the calibration rows
    prune.main(params, None)
    plain = read_json("data/models/pruned/shear.json")
    calib = calibration_batch("data/shards", 4, 32, tok)
    assert plain["removed_blocks"] == sleb_scores(model, calib, batch_size=2, n=2)[1]
    assert plain["rounds"] == 2 and plain["heal_tokens"] == 0 and "heal" not in plain["removal_steps"][0]

    # killed while healing round 2: the previous output stays (written once, atomically) ...
    params.prune.depth.heal_tokens = 350  # 5 steps of 64 tokens: 3 in round 1, 2 in round 2
    real_train, calls = prune_depth.train, []

    def dies_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(prune_depth, "train", dies_in_round_2)
    with pytest.raises(RuntimeError, match="killed"):
        prune.main(params, None)
    assert read_json("data/models/pruned/shear.json") == plain
    # ... and the re-run resumes after round 1 (one more healing run) and equals an uninterrupted run
    prune.main(params, None)
    assert len(calls) == 3
    resumed = read_json("data/models/pruned/shear.json")
    resumed_weights = AutoModelForCausalLM.from_pretrained("data/models/pruned").state_dict()
    shutil.rmtree("data/checkpoints/prune")
    monkeypatch.setattr(prune_depth, "train", real_train)
    prune.main(params, None)
    info = read_json("data/models/pruned/shear.json")
    for a, b in zip(resumed["removal_steps"], info["removal_steps"]):
        a["heal"].pop("train_s"), b["heal"].pop("train_s")
    assert resumed == info
    pruned = AutoModelForCausalLM.from_pretrained("data/models/pruned")
    for name, tensor in pruned.state_dict().items():
        assert torch.equal(tensor, resumed_weights[name]), name

    steps = info["removal_steps"]
    assert info["rounds"] == 2 and info["heal_tokens"] == 320 and info["blocks_per_round"] == 1
    assert [s["heal"]["tokens"] for s in steps] == [192, 128] and all(s["heal"]["method"] == method for s in steps)
    # original indices: round 2 chose among the blocks round 1 left, numbered as in the base model
    assert info["removed_blocks"] == steps[0]["removed"] + steps[1]["removed"]
    assert steps[1]["blocks"] == [b for b in range(4) if b not in steps[0]["removed"]]
    assert steps[1]["removed"][0] in steps[1]["blocks"]
    # round 1 chose from the base model's scores; round 2 scored the healed model, not the plain one
    assert steps[0]["scores"] == plain["removal_steps"][0]["scores"]
    if steps[0]["removed"] == plain["removal_steps"][0]["removed"]:
        assert steps[1]["scores"] != plain["removal_steps"][1]["scores"]

    # a plain checkpoint (LoRA merged) whose surviving blocks were trained
    assert pruned.config.num_hidden_layers == 2 and not any("lora" in k for k in pruned.state_dict())
    kept = [b for b in range(4) if b not in info["removed_blocks"]]
    for j, b in enumerate(kept):
        assert not torch.equal(pruned.model.layers[j].mlp.down_proj.weight, model.model.layers[b].mlp.down_proj.weight)


def test_sleb_with_healing_re_scores_by_ppl(tmp_path, monkeypatch, tiny, shards):
    """SLEB's step is the ppl criterion on the current model: with healing, sleb and ppl prune alike."""
    from stages import prune, score

    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    save_model(model, tok, "data/models/base", {"method": "base", "source": "tiny:"})
    (tmp_path / "data" / "shards").symlink_to(shards)
    params = stage_params(mode="iterative", ratio=None, num_blocks=2, heal_tokens=256)
    params.score.block_criteria = ["ppl", "sleb"]
    params.retrain.method, params.retrain.batch_size, params.retrain.seq_len = "cpt", 2, 32
    params.mixture.eval_sequences = 1
    score.main(params, None)
    runs = {}
    for criterion in ("sleb", "ppl"):
        params.prune.depth.criterion = criterion
        prune.main(params, None)
        info = read_json("data/models/pruned/shear.json")
        for step in info["removal_steps"]:
            step["heal"].pop("train_s")
        runs[criterion] = info
    assert runs["sleb"]["removal_steps"] == runs["ppl"]["removal_steps"]
    assert runs["sleb"]["removed_blocks"] == runs["ppl"]["removed_blocks"]

def test_healing_budget_below_one_step_per_round_is_refused(tmp_path, monkeypatch, tiny, shards):
    from stages import prune

    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    save_model(model, tok, "data/models/base", {"method": "base", "source": "tiny:"})
    (tmp_path / "data" / "shards").symlink_to(shards)
    (tmp_path / "reports" / "scores").mkdir(parents=True)
    (tmp_path / "reports" / "scores" / "block_ppl.json").write_text(json.dumps({"scores": [1.0, 2, 3, 4]}))
    params = stage_params(criterion="ppl", mode="iterative", ratio=None, num_blocks=2, heal_tokens=1100)
    params.retrain.batch_size, params.retrain.seq_len = 2, 512
    with pytest.raises(ShearError) as e:
        prune.main(params, None)
    assert str(e.value) == ("params.yaml: prune.depth.heal_tokens=1100 pays for 1 retrain steps of 1024 tokens "
                            "(retrain.batch_size x seq_len x grad_accum), fewer than the 2 rounds; set "
                            "prune.depth.heal_tokens >= 2048 or 0")
    assert not (tmp_path / "data" / "models" / "pruned").exists()


def test_healing_reads_other_rows_than_the_retraining_after_it(tmp_path, monkeypatch, tiny, shards):
    from shear.data import load_domains
    from shear.mixture import build_sampler
    from stages.prune_depth import healing

    model, tok = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shards").symlink_to(shards)
    params = stage_params(mode="iterative", heal_tokens=1024)
    params.retrain.batch_size, params.retrain.seq_len, params.mixture.eval_sequences = 4, 32, 1
    _, heal_sampler = healing(params, model, tok, rounds=2)
    retrain_sampler = build_sampler("fixed", load_domains(shards, "train", tok), 32, params.run.seed)
    healed_rows = {tuple(r.tolist()) for _ in range(4) for r in heal_sampler.next_batch(4)[0]}
    retrain_rows = {tuple(r.tolist()) for _ in range(4) for r in retrain_sampler.next_batch(4)[0]}
    assert not healed_rows & retrain_rows

@pytest.mark.parametrize("depth, retrain, message", [
    ({"heal_tokens": 4096}, {}, "prune.depth.heal_tokens=4096 and prune.depth.blocks_per_round=1 need "
                                "prune.depth.mode=iterative"),
    ({"mode": "iterative", "heal_tokens": 4096}, {"method": "none"},
     "prune.depth.heal_tokens=4096 heals with retrain.method, which is none; set retrain.method to lora or cpt"),
])
def test_bad_rounds_are_refused(depth, retrain, message):
    from shear.config import parse_params

    raw = {"prune": {"depth": depth}, "retrain": retrain}
    with pytest.raises(ShearError, match=message):
        parse_params(raw)
    parse_params({**raw, "prune": {"method": "width", "depth": depth}})  # inert unless prune.method is depth


def test_prune_settings_declare_healing_keys():
    from shear.config import parse_params, prune_settings

    plain = prune_settings(parse_params({"prune": {"depth": {"mode": "iterative"}}}))
    healed = prune_settings(parse_params({"prune": {"depth": {"mode": "iterative", "heal_tokens": 4096}}}))
    assert "retrain" not in plain and "prune.depth" in plain
    assert {"retrain", "data.domain_weights", "mixture.eval_sequences"} <= set(healed)

def test_removing_blocks_keeps_each_blocks_attention_type(tmp_path):
    """Gemma 3's local (sliding) and global layers: the survivors keep their own type, in the
    config (what the saved model is built from) and in the modules (what runs now)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=types)
    model = AutoModelForCausalLM.from_config(config).eval()
    remove_blocks(model, [1, 2])
    kept = [types[i] for i in (0, 3, 4)]
    assert model.config.layer_types == kept
    assert [layer.self_attn.layer_type for layer in model.model.layers] == kept
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert [layer.self_attn.layer_type for layer in loaded.model.layers] == kept
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))  # longer than the window
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
