"""Retraining: LoRA / CPT reduce the loss, LoRA merges exactly, resume is exact, each method's
optimizer recipe and schedule, distillation (logits, pure KD, hidden states), a 2-process run of
the stage through accelerate (gloo), and the user-facing errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from shear.config import RetrainParams, parse_params
from shear.data import build_shards, load_domains
from shear.distill import BlockMap, block_map, distill_kl, hidden_state_loss, retrain_loss
from shear.errors import ShearError
from shear.io import trim_logs
from shear.mixture import build_sampler, heldout_rows
from shear.models import make_tiny_model, save_model
from shear.prune.depth import remove_blocks
from shear.train import Retraining, apply_lora, decoder_layers, load_teacher, train
from shear.trainer import check_seq_len, check_train_tokens, lr_factor, make_accelerator, plan_run, read_checkpoint
from tests.conftest import REPO, full_params

SPEC = "layers=2,hidden=64,heads=4,kv_heads=2,mlp=128"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ, BATCH = 32, 4



@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator("cpu")


def settings(method, steps, **overrides):
    """RetrainParams for a tiny run of `steps` optimizer steps."""
    grad_accum = overrides.get("grad_accum", 1)
    values = dict(method=method, tokens=steps * BATCH * SEQ * grad_accum, batch_size=BATCH, seq_len=SEQ,
                  lr=3e-3 if method == "cpt" else 1e-2,  # a random tiny model: big steps show progress in a few
                  warmup_fraction=0.0, eval_every=1000, checkpoint_every=1000)
    return RetrainParams(**(values | overrides))


def make_sampler(shards, mixture="fixed"):
    """The training sampler; `dynamic` with reference losses the tiny model is far above."""
    return build_sampler(mixture, load_domains(shards, "train"), SEQ, seed=0,
                         reference={"code": 1.0, "prose": 3.0}, eta=1.0, smoothing=1e-4)


def run(accelerator, shards, cfg, **kwargs):
    """Train a fresh tiny model (seed 0) on the test shards; returns (model, summary)."""
    model, tok = make_tiny_model(SPEC, seed=0)
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    sampler = kwargs.pop("sampler", None) or make_sampler(shards)
    rows = heldout_rows(shards, tok, 4, SEQ)
    return train(model, sampler, cfg, accelerator, eval_rows=rows, **kwargs)


@pytest.mark.parametrize("method", ["cpt", "lora"])
def test_loss_decreases(accelerator, shards, method):
    model, summary = run(accelerator, shards, settings(method, 8))
    assert summary["steps"] == 8 and summary["tokens"] == 8 * BATCH * SEQ
    assert summary["loss_after"]["mean"] < summary["loss_before"]["mean"] - 0.05
    # The result is a plain model: LoRA merged, nothing left of peft.
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_merged_lora_equals_peft_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = make_tiny_model(SPEC, seed=0)
    peft_model = apply_lora(model, 8, 16, 0.05, ALL_LINEAR)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters do something
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 256, (2, 24))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        merged = peft_model.merge_and_unload()
        assert torch.allclose(merged(input_ids=x).logits, expected, atol=1e-5)
    save_model(merged, tok, tmp_path / "m", {"method": "test"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, expected, atol=1e-5)


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


WIDE = "layers=4,hidden=128,heads=4,kv_heads=2,mlp=128"  # a teacher twice as wide as SPEC, from which SPEC's 2 blocks came


@pytest.mark.parametrize("method,grad_accum,mixture,hidden", [("cpt", 2, "fixed", False), ("lora", 1, "dynamic", False),
                                                              ("cpt", 1, "fixed", True)])
def test_resume_equals_uninterrupted(accelerator, shards, tmp_path, capsys, method, grad_accum, mixture, hidden):
    steps = 6
    cfg = settings(method, steps, grad_accum=grad_accum, checkpoint_every=2,
                   **({"distill": 0.5, "distill_hidden": 1.0} if hidden else {}))
    update_every = 2 if mixture == "dynamic" else None
    # hidden: distilled through the learned width map, whose weights the checkpoint must restore
    teacher = {"teacher": make_tiny_model(WIDE, seed=3)[0].requires_grad_(False),
               "mapping": BlockMap([1, 3], None)} if hidden else {}
    reference, expected_summary = run(accelerator, shards, cfg, sampler=make_sampler(shards, mixture),
                                      update_every=update_every, **teacher)

    # Killed while drawing the batches of step 5: the checkpoint of step 4 survives.
    sampler = make_sampler(shards, mixture)
    draw, calls = sampler.next_batch, []

    def dying_next_batch(n):
        calls.append(n)
        if len(calls) > 4 * grad_accum:
            raise Killed
        return draw(n)

    sampler.next_batch = dying_next_batch
    with pytest.raises(Killed):
        run(accelerator, shards, cfg, sampler=sampler, update_every=update_every, checkpoint_dir=tmp_path,
            run_id="run-a", **teacher)
    state = read_checkpoint(tmp_path, "run-a", "retrain")
    assert state["step"] == 4
    assert ("projection" in state["objective"]) == hidden

    resumed, summary = run(accelerator, shards, cfg, sampler=make_sampler(shards, mixture),
                           update_every=update_every, checkpoint_dir=tmp_path, run_id="run-a", resume=state, **teacher)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == steps
    assert summary["mixture_weights"] == pytest.approx(expected_summary["mixture_weights"], abs=1e-9)
    if mixture == "dynamic":  # three updates moved weight towards code, the domain furthest above its reference
        assert summary["mixture_weights"]["code"] > make_sampler(shards).weights["code"] + 0.1
    expected = reference.state_dict()
    for name, value in resumed.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-6), name

    # A checkpoint of other params is ignored, and the user is told.
    assert read_checkpoint(tmp_path, "run-b", "retrain") is None
    assert "ignoring the checkpoint" in capsys.readouterr().out


def test_distillation_from_itself_has_zero_kl(accelerator, shards):
    student, _ = make_tiny_model(SPEC, seed=0)
    teacher, _ = make_tiny_model(SPEC, seed=0)
    other, _ = make_tiny_model(SPEC, seed=1)
    x = torch.randint(0, 256, (2, 24))
    logits = student(input_ids=x).logits
    loss, parts = retrain_loss(logits, x, teacher(input_ids=x).logits.detach(), weight=1.0, temperature=2.0)
    assert abs(loss.item()) < 1e-6 and abs(parts["kl"].item()) < 1e-6
    loss.backward()
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-6
    assert distill_kl(logits, other(input_ids=x).logits, 1.0).item() > 1e-3
    # The distillation path of the loop runs (teacher = another model, half CE half KL).
    _, summary = run(accelerator, shards, settings("cpt", 2, distill=0.5), teacher=other.requires_grad_(False))
    assert summary["steps"] == 2


def test_pure_kd_trains_on_the_kl_alone(accelerator, shards):
    """retrain.distill = 1 is valid and is Minitron's pure logit distillation: loss = KL, CE only logged."""
    assert parse_params({"retrain": {"method": "cpt", "distill": 1.0}}).retrain.distill == 1.0
    student, _ = make_tiny_model(SPEC, seed=0)
    teacher, _ = make_tiny_model(SPEC, seed=1)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        teacher_logits = teacher(input_ids=x).logits
    logits = student(input_ids=x).logits
    loss, parts = retrain_loss(logits, x, teacher_logits, weight=1.0, temperature=2.0)
    kl = distill_kl(logits, teacher_logits, 2.0)
    assert set(parts) == {"ce", "kl"} and parts["ce"].item() > 1.0
    (grad_loss,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (grad_kl,) = torch.autograd.grad(kl, logits)
    assert torch.equal(grad_loss, grad_kl)  # no trace of the CE in what is trained on

    # Through the loop: the student moves towards the teacher on held-out text.
    held_out = heldout_rows(shards, make_tiny_model(SPEC)[1], 4, SEQ)["prose"]
    with torch.no_grad():
        held_out_teacher = teacher(input_ids=held_out).logits
        before = distill_kl(student(input_ids=held_out).logits, held_out_teacher).item()
    trained, summary = run(accelerator, shards, settings("cpt", 8, distill=1.0), teacher=teacher.requires_grad_(False))
    with torch.no_grad():
        after = distill_kl(trained(input_ids=held_out).logits, held_out_teacher).item()
    assert after < 0.7 * before and summary["final_train_loss"] < 0.7 * before


def test_hidden_state_loss_equals_a_loop_over_positions():
    torch.manual_seed(0)
    student = [torch.randn(2, 5, 8) for _ in range(3)]
    teacher = [torch.randn(2, 5, 8) * 3 for _ in range(3)]
    for kind, distance in (("cosine", lambda s, t: 1 - float(s @ t) / float(s.norm() * t.norm())),
                           ("nmse", lambda s, t: float((s - t).pow(2).sum()) / float(t.pow(2).sum()))):
        loop = np.mean([np.mean([distance(s[b, i], t[b, i]) for b in range(2) for i in range(5)])
                        for s, t in zip(student, teacher)])
        assert hidden_state_loss(student, teacher, kind).item() == pytest.approx(loop, rel=1e-5), kind
    assert hidden_state_loss(teacher, teacher, "nmse").item() == 0.0


def zero_blocks(model, blocks):
    """`model` with blocks that pass their input through unchanged (attention and MLP outputs zeroed)."""
    for i in blocks:
        layer = model.model.layers[i]
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    return model


@pytest.mark.parametrize("kind", ["cosine", "nmse"])
def test_hidden_loss_maps_blocks_by_their_original_index(tiny, kind):
    """Zero when the student is the teacher, and after depth pruning of blocks that did nothing
    (then each kept block computes exactly what the teacher block of its original index does)."""
    import copy

    teacher = zero_blocks(copy.deepcopy(tiny[0]), [1, 2]).requires_grad_(False)
    x = torch.randint(0, 256, (2, 24))

    def hidden_term(student, mapping):
        objective = Retraining(teacher, student=student, hidden=1.0, hidden_loss=kind, mapping=mapping)
        return objective.loss(student, x, 0)[1]["hidden"].item()

    itself = copy.deepcopy(teacher)
    assert hidden_term(itself, block_map({"method": "tiny"}, teacher.config, itself.config, "t")) < 1e-6
    pruned = remove_blocks(copy.deepcopy(teacher), [1, 2])
    mapping = block_map({"method": "depth", "removed_blocks": [2, 1]}, teacher.config, pruned.config, "p/shear.json")
    assert mapping == BlockMap([0, 3], None)
    assert hidden_term(pruned, mapping) < 1e-6
    assert hidden_term(pruned, BlockMap([0, 1], None)) > 1e-3  # by position instead: block 3 against block 1


def test_block_map_of_width_and_sheared_records_and_bad_records():
    wide, narrow = make_tiny_model(WIDE)[0].config, make_tiny_model(SPEC)[0].config
    record = {"method": "sheared", "kept": {"layers": [3, 1], "hidden": list(range(0, 128, 2))}}
    assert block_map(record, wide, narrow, "p") == BlockMap([1, 3], list(range(0, 128, 2)))
    with pytest.raises(ShearError, match=r"p/shear.json: the recorded blocks \[0, 2, 3\] do not map the pruned "
                                         r"model's 2 blocks into the teacher's 4"):
        block_map({"method": "depth", "removed_blocks": [1]}, wide, narrow, "p/shear.json")
    with pytest.raises(ShearError, match=r"kept.hidden lists 3 channels of the teacher's 128"):
        block_map({"kept": {"layers": [0, 1], "hidden": [0, 1, 2]}}, wide, narrow, "p")


def test_hidden_distillation_gradients_reach_adapters_and_width_map_and_teacher_states_die():
    """Hidden-state loss alone (no logit KD): gradients reach the LoRA adapters and the width map,
    the teacher gets none, and no teacher activation outlives the step."""
    import gc
    import weakref

    teacher, _ = make_tiny_model(WIDE, seed=3)
    teacher.requires_grad_(False)
    student, _ = make_tiny_model(SPEC, seed=0)
    student = apply_lora(student, 4, 8, 0.0, ALL_LINEAR)
    mapping = block_map({"kept": {"layers": [1, 3], "hidden": list(range(0, 128, 2))}}, teacher.config,
                        student.config, "p")
    objective = Retraining(teacher, 0.0, student=student, hidden=1.0, mapping=mapping)
    assert objective.projection.weight[2, 1].item() == 1.0 and objective.projection.weight.sum().item() == 64
    seen = []
    decoder_layers(teacher)[3].register_forward_hook(lambda m, a, out: seen.append(weakref.ref(out)))
    hooks_before = [len(layer._forward_hooks) for layer in decoder_layers(teacher)]

    x = torch.randint(0, 256, (2, 24))
    loss, parts = objective.loss(student, x, 0)
    assert set(parts) == {"ce", "hidden"} and loss.item() == pytest.approx(parts["ce"].item() + parts["hidden"].item())
    loss.backward()
    assert objective.projection.weight.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert all(grads[n].abs().sum() > 0 for n in grads if "lora_B" in n)  # B starts at 0: only its gradient moves
    assert all(p.grad is None for p in teacher.parameters())
    assert [len(layer._forward_hooks) for layer in decoder_layers(teacher)] == hooks_before
    del loss, parts
    gc.collect()
    assert seen and seen[0]() is None, "a teacher hidden state outlived the step"


def test_lr_schedule():
    lrs = [1e-3 * lr_factor(s, 20, 4) for s in range(20)]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_linear_schedule_is_the_hf_trainers_after_warmup():
    from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda as hf_linear

    factors = [lr_factor(s, 20, 4, "linear") for s in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # the shared warm-up
    assert factors[4:] == pytest.approx([hf_linear(s, num_warmup_steps=4, num_training_steps=20) for s in range(4, 20)])
    assert factors[-1] == pytest.approx(1 / 16) and all(a > b for a, b in zip(factors[4:], factors[5:]))
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_factor(5, 20, 4, "step")


def test_each_method_trains_with_its_papers_recipe(accelerator, shards, monkeypatch):
    """LoRA: Shortened LLaMA's HF Trainer defaults; CPT: Sheared-LLaMA's; the other method's section is not read."""
    import shear.train

    defaults = parse_params({})
    lora, cpt = defaults.retrain.lora, defaults.retrain.cpt
    assert (lora.weight_decay, lora.betas, lora.schedule) == (0.0, [0.9, 0.999], "linear")
    assert (cpt.weight_decay, cpt.betas, cpt.schedule) == (0.0, [0.9, 0.95], "cosine")
    as_cpt = parse_params({"retrain": {"method": "cpt", "cpt": {"betas": [0.8, 0.9]}}})
    assert as_cpt.retrain.recipe.betas == [0.8, 0.9] and defaults.retrain.recipe is defaults.retrain.lora

    seen = {}

    class Stop(Exception):
        pass

    def fake_fit(model, optimizer, objective, *args, lr_schedule, **kwargs):
        seen.update(schedule=lr_schedule, betas=optimizer.defaults["betas"],
                    decay={g["weight_decay"] for g in optimizer.param_groups if g["params"][0].dim() >= 2})
        raise Stop

    monkeypatch.setattr(shear.train, "fit", fake_fit)
    for method, recipe in (("lora", {"weight_decay": 0.1, "betas": [0.9, 0.98], "schedule": "cosine"}), ("cpt", {})):
        cfg = settings(method, 2, **{method: type(getattr(RetrainParams(), method))(**recipe)})
        with pytest.raises(Stop):
            run(accelerator, shards, cfg)
        want = cfg.recipe
        assert seen == {"schedule": want.schedule, "betas": tuple(want.betas),
                        "decay": {want.weight_decay}}, method


def test_errors(tmp_path):
    with pytest.raises(ShearError, match=r"retrain.tokens=100 is smaller than one optimizer step of 256"):
        plan_run("retrain", 100, 2, 64, 2, 1, 0.1)
    assert plan_run("retrain", 1000, 2, 64, 2, 1, 0.5).total_steps == 3  # floor: 1000 // 256
    with pytest.raises(ShearError, match=r"prune.sheared.seq_len=4096 is longer than the model's "
                                         r"max_position_embeddings=2048"):
        check_seq_len("prune.sheared", 4096, type("Config", (), {"max_position_embeddings": 2048})())
    model, _ = make_tiny_model(SPEC, seed=0)
    with pytest.raises(ShearError, match=r"'qkv_proj'.*valid: down_proj, gate_proj, k_proj, o_proj, q_proj"):
        apply_lora(model, 8, 16, 0.05, ["q_proj", "qkv_proj"])
    with pytest.raises(ShearError, match=r"retrain.distill > 0 \(or retrain.distill_hidden > 0\) needs the teacher "
                                         r".*missing"):
        load_teacher(tmp_path / "base", model, torch.device("cpu"))
    with pytest.raises(ShearError, match=r"retrain.seq_len=256 tokens \(the largest holds 100\)"):
        check_train_tokens("retrain", {"a": np.zeros((1, 100)), "b": np.zeros((0, 64))}, 256, tmp_path)


@pytest.mark.parametrize("retrain,message", [
    ({"method": "none", "distill_hidden": 0.5}, "retrain.distill_hidden=0.5 needs retrain.method lora or cpt"),
    ({"distill_hidden": -1}, r"retrain.distill_hidden=-1.0 is out of range \[0, inf\]"),
    ({"distill_hidden_loss": "mse"}, "retrain.distill_hidden_loss='mse' is not valid; choose one of cosine, nmse"),
    ({"cpt": {"betas": [0.9]}}, r"retrain.cpt.betas=\[0.9\] must be two numbers in \[0, 1\)"),
    ({"lora": {"schedule": "step"}}, "retrain.lora.schedule='step' is not valid; choose one of cosine, linear"),
])
def test_distillation_and_recipe_params_are_validated(retrain, message):
    from shear.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_params({"retrain": retrain})


def test_trim_logs(tmp_path):
    path = tmp_path / "plots" / "metrics" / "train" / "loss.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("step\tloss\n1\t3.0\n2\t2.5\n3\t2.4\n")
    trim_logs(tmp_path, 2)
    assert path.read_text() == "step\tloss\n1\t3.0\n2\t2.5\n"


def test_trim_logs_mends_what_a_kill_cut_short(tmp_path):
    """A run killed while DVCLive appended a row or rewrote its summary resumes: the cut row, a tsv
    whose header was cut and an unreadable metrics.json go; DVCLive then opens the directory."""
    from shear.trainer import open_live

    metrics = tmp_path / "plots" / "metrics"
    (metrics / "eval").mkdir(parents=True)
    (metrics / "loss.tsv").write_text("step\tloss\n1\t3.0\n2\t2.5\n3")
    (metrics / "lr.tsv").write_text("step\tlr\n1\t0.1\n2\t0.\n3\t")
    (metrics / "eval" / "loss.tsv").write_text("ste")
    (tmp_path / "metrics.json").write_text('{"step": 2, "loss": 2.')
    live = open_live(tmp_path, 2)
    assert (metrics / "loss.tsv").read_text() == "step\tloss\n1\t3.0\n2\t2.5\n"
    assert (metrics / "lr.tsv").read_text() == "step\tlr\n1\t0.1\n2\t0.\n"
    assert not (metrics / "eval" / "loss.tsv").exists() and not (tmp_path / "metrics.json").exists()
    live.step = 3
    live.log_metric("eval/loss", 2.0)
    live.make_summary()
    assert (metrics / "eval" / "loss.tsv").read_text().splitlines()[0].split("\t") == ["step", "loss"]
    assert json.loads((tmp_path / "metrics.json").read_text())["eval"]["loss"] == 2.0


def test_two_process_stage(tmp_path, raw_corpus):
    """The stage re-launches itself under accelerate with 2 gloo processes and trains CPT, distilling
    the hidden states of a twice wider teacher through the learned width map."""
    from transformers import AutoModelForCausalLM

    model, tok = make_tiny_model(SPEC, seed=0)
    build_shards(raw_corpus, tok, tmp_path / "data/shards", seq_len=64, calib_fraction=0.15, eval_fraction=0.15,
                 max_tokens_per_domain=200_000, seed=0)
    save_model(model, tok, tmp_path / "data/models/pruned",
               {"method": "sheared", "kept": {"layers": [1, 3], "hidden": list(range(0, 128, 2))}})
    save_model(make_tiny_model(WIDE, seed=3)[0], tok, tmp_path / "data/models/base", {"method": "tiny"})
    params = {
        "run": {"device": "cpu"},
        "mixture": {"eval_sequences": 4},
        "retrain": {"method": "cpt", "tokens": 6 * 2 * 2 * SEQ, "batch_size": 2, "seq_len": SEQ, "lr": 3e-3,
                    "warmup_fraction": 0.0, "num_processes": 2, "checkpoint_every": 4, "eval_every": 3,
                    "distill_hidden": 0.5},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params(params)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "stages.retrain"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    info = json.loads((tmp_path / "data/models/retrained/shear.json").read_text())["retrain"]
    assert info["world_size"] == 2 and info["steps"] == 6
    assert info["loss_after"]["mean"] < info["loss_before"]["mean"]
    checkpoint = tmp_path / "data/checkpoints/retrain"
    meta = json.loads((checkpoint / "last" / "meta.json").read_text())
    state = read_checkpoint(checkpoint, meta["fingerprint"], "test")
    assert len(state["rng"]) == 2 and state["step"] == 6
    assert state["objective"]["projection"]["weight"].shape == (128, 64) and info["distill_hidden"] == 0.5
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "data/models/retrained")
    assert torch.equal(trained.model.embed_tokens.weight, state["weights"]["model.embed_tokens.weight"])
    assert (tmp_path / "reports/train/retrain/plots/metrics/train/loss.tsv").is_file()


def test_stage_distills_hidden_states_of_a_depth_pruned_model(tmp_path, shards, tiny, monkeypatch):
    """The stage maps the pruned model's blocks through its shear.json and trains pure KD + hidden states."""
    import argparse
    import copy

    from shear.config import Params
    from stages.retrain import main

    teacher, tok = tiny
    save_model(teacher, tok, tmp_path / "data/models/base", {"method": "tiny"})
    pruned = remove_blocks(copy.deepcopy(teacher), [1, 2])
    save_model(pruned, tok, tmp_path / "data/models/pruned", {"method": "depth", "removed_blocks": [1, 2]})
    (tmp_path / "data/shards").symlink_to(shards)
    monkeypatch.chdir(tmp_path)
    params = Params()
    params.run.device, params.mixture.eval_sequences = "cpu", 2
    for key, value in {"method": "cpt", "tokens": 2 * BATCH * SEQ, "batch_size": BATCH, "seq_len": SEQ,
                       "distill": 1.0, "distill_hidden": 1.0, "distill_hidden_loss": "nmse"}.items():
        setattr(params.retrain, key, value)
    main(params, argparse.Namespace(params="params.yaml"))
    info = json.loads((tmp_path / "data/models/retrained/shear.json").read_text())["retrain"]
    assert (info["steps"], info["distill"], info["distill_hidden"], info["distill_hidden_loss"]) == (2, 1.0, 1.0, "nmse")
    assert info["cpt"] == {"weight_decay": 0.0, "betas": [0.9, 0.95], "schedule": "cosine"}
    logged = (tmp_path / "reports/train/retrain/plots/metrics/train/hidden.tsv").read_text().splitlines()
    assert len(logged) == 3 and 0 < float(logged[1].split("\t")[1]) < 1  # header + 2 steps, a normalised loss


def test_method_none_copies_the_pruned_model(tmp_path, shards, tiny, monkeypatch):
    from shear.config import Params
    from shear.models import load_model
    from stages.retrain import copy_pruned

    model, tok = tiny
    save_model(model, tok, tmp_path / "data/models/pruned", {"method": "depth"})
    (tmp_path / "data/shards").symlink_to(shards)
    monkeypatch.chdir(tmp_path)
    params = Params()
    params.retrain.method, params.mixture.eval_sequences = "none", 2
    copy_pruned(params)
    copied, _, record = load_model("data/models/retrained")
    assert record["method"] == "depth" and record["retrain"]["method"] == "none"
    assert set(record["retrain"]["loss_after"]) == {"code", "prose"}
    for (name, a), (_, b) in zip(copied.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stage,change,message", [
    ("retrain", {"tokens": 10}, r"retrain.tokens=10 is smaller than one optimizer step"),
    ("retrain", {"seq_len": 4096}, r"retrain.seq_len=4096 is longer than the model's max_position_embeddings=2048"),
    ("retrain", {"distill": 0.5}, r"needs the teacher data/models/base"),
    ("retrain", {"distill_hidden": 1.0}, r"needs the teacher data/models/base"),
    ("prune_sheared", {"tokens": 10}, r"prune.sheared.tokens=10 is smaller than one optimizer step"),
    ("prune_sheared", {"seq_len": 4096}, r"prune.sheared.seq_len=4096 is longer than the model's "
                                         r"max_position_embeddings=2048"),
])
def test_failing_run_leaves_outputs_and_logs(tmp_path, shards, monkeypatch, stage, change, message):
    """Every check runs before the stage empties or writes its model, checkpoint or learning curves."""
    import argparse
    import importlib

    from shear.config import Params

    model, tok = make_tiny_model(SPEC, seed=0)
    save_model(model, tok, tmp_path / "data/models/pruned", {"method": "depth"})
    if stage == "prune_sheared":
        save_model(model, tok, tmp_path / "data/models/base", {"method": "tiny"})
    (tmp_path / "data/shards").symlink_to(shards)
    out, name = ("data/models/retrained", "retrain") if stage == "retrain" else ("data/models/pruned", "prune")
    previous = {f"reports/train/{name}/plots/metrics/train/loss.tsv": "step\tloss\n1\t3.0\n",
                f"data/checkpoints/{name}/last/meta.json": "{}", f"{out}/marker": "previous output"}
    for path, text in previous.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    monkeypatch.chdir(tmp_path)
    params = Params()
    params.run.device, params.prune.method, params.retrain.method = "cpu", "sheared", "cpt"
    section = params.retrain if stage == "retrain" else params.prune.sheared
    for key, value in change.items():
        setattr(section, key, value)
    with pytest.raises(ShearError, match=message):
        importlib.import_module(f"stages.{stage}").main(params, argparse.Namespace(params="params.yaml"))
    for path, text in previous.items():
        assert (tmp_path / path).read_text() == text, path
    assert sorted(p.name for p in (tmp_path / f"reports/train/{name}").iterdir()) == ["plots"]
