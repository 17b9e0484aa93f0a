"""shear.recipes: rows per phase, the winners that unlock later phases, the table and the target check."""
import math
import re
import subprocess
from pathlib import Path

import pytest

from shear.recipes import (EXP_PREFIX, RATIOS, RECIPE_TOKENS, Recipe, every_row, family, log_ratio, main, phase1,
                           phase2, phase4, plan, preset_args, preset_text, render, results, row_numbers, seed_twins,
                           select)
from shear.errors import ShearError
from shear.records import EvalMetrics

DOMAINS = ("books", "code")
# every row a plan can hold (for the params of the made-up experiments)
KNOWN = {r.row: r for r in every_row(500)}
SEED_TWINS = {f"ppl+-cpt-{pct}-seed{s}" for pct in RATIOS for s in (1, 2)}  # planned from the start


def metrics(loss_shift: float, non_embedding: int = 800) -> dict:
    """An evaluate-stage metrics file whose per-domain losses are the base's plus `loss_shift`."""
    base = {"books": 3.0, "code": 2.0}
    loss = {length: {d: base[d] + loss_shift for d in DOMAINS} for length in ("128", "1024")}
    for length in loss:
        loss[length]["mean"] = sum(loss[length][d] for d in DOMAINS) / len(DOMAINS)
    return {"params": {"total": non_embedding + 200, "non_embedding": non_embedding},
            "ppl": {k: {d: math.exp(v) for d, v in ls.items()} for k, ls in loss.items()}, "loss": loss,
            "ppl_protocol": {}, "tasks": {"shear_lastword": {"acc": 0.3, "acc_stderr": 0.05}},
            "info": {"wall_s": 60.0}}


def exp_show(rows: dict[str, float], states: dict[str, str] | None = None) -> list:
    """A `dvc exp show --json`-shaped list: one baseline commit and one experiment per row."""
    exps = []
    for i, (row, shift) in enumerate(rows.items()):
        recipe = KNOWN.get(row, Recipe(row, row, 1, {}))
        params = {}
        for key, value in {**recipe.overrides, "run.seed": recipe.overrides.get("run.seed", 0)}.items():
            node = params
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        state = (states or {}).get(row)
        exps.append({"name": EXP_PREFIX + row, "executor": {"state": state} if state else None,
                     "revs": [{"rev": f"{i:040d}", "name": EXP_PREFIX + row, "error": None, "data": {
                         "timestamp": f"2026-11-30T10:{i:02d}:00", "params": {"params.yaml": {"data": params}},
                         "metrics": {} if state == "queued" else {
                             "reports/eval/base/metrics.json": {"data": metrics(0.0, 1000)},
                             "reports/eval/retrained/metrics.json": {"data": metrics(shift)},
                             "reports/train/retrain/metrics.json": {"data": {"train_s": 540.0}}}}}]})
    return [{"rev": "workspace", "data": {}, "experiments": None}, {"rev": "a" * 40, "data": {}, "experiments": exps}]


def test_log_ratio_is_the_mean_loss_difference():
    row = EvalMetrics.from_dict(metrics(0.25), "row")
    base = EvalMetrics.from_dict(metrics(0.0), "base")
    assert abs(log_ratio(row, base, "128") - 0.25) < 1e-12
    assert log_ratio(row, base, "2048") is None


def test_phase1_has_the_seed_recipes_and_criteria_at_both_ratios():
    rows = {r.row: r for r in phase1()}
    for pct, ratio in RATIOS.items():
        for name in ("ppl+-lora", "taylor+-lora", "ppl+-cpt", "bi-cpt", "sleb-cpt"):
            r = rows[f"{name}-{pct}"]
            assert r.overrides["prune.depth.ratio"] == ratio
            assert r.overrides["retrain.tokens"] == RECIPE_TOKENS
    assert "sleb" in rows["sleb-cpt-20"].overrides["score.block_criteria"]
    assert "score.block_criteria" not in rows["bi-cpt-20"].overrides
    assert rows["ppl+-lora-20"].set_args()[:2] == ["-S", 'prune.method="depth"']


def test_later_phases_wait_for_the_winners():
    first = {r.row for r in phase1()} | SEED_TWINS
    # nothing finished: only phase 1 and the seed recipe's other seeds (they wait for no winner)
    assert {r.row for r in plan({}, 400)} == first
    # phase 1 finished, bi is the best CPT criterion: phase 2 uses bi
    shifts = {r.row: 0.5 for r in phase1()} | {"bi-cpt-20": 0.2, "bi-cpt-35": 0.3}
    found = results(exp_show(shifts))
    done = {n: row_numbers(r) for n, r in found.items()}
    rows = plan(done, 400)
    second = {r.row for r in rows} - first
    best_twins = {f"bi-cpt-{p}-seed{s}" for p in RATIOS for s in (1, 2)}  # the best so far at each cut
    assert second == {f"bi-{k}-{p}" for k in ("kd", "kdh", "iter") for p in RATIOS} | best_twins
    iterative = next(r for r in rows if r.row == "bi-iter-20").overrides
    assert iterative["prune.depth.heal_tokens"] + iterative["retrain.tokens"] == RECIPE_TOKENS
    # phase 2 finished, kd best: phase 3 retrains with kd, at half the base's non-embedding parameters
    shifts |= {f"bi-{k}-{p}": 0.4 for k in ("kdh", "iter") for p in RATIOS} | {"bi-kd-20": 0.1, "bi-kd-35": 0.2}
    done = {n: row_numbers(r) for n, r in results(exp_show(shifts)).items()}
    rows = {r.row: r for r in plan(done, 500)}
    assert {"half-depth-bi-kd", "half-width-kd", "half-sheared-kd", "ppl+-cpt-20-seed1", "bi-kd-20-seed1"} <= set(rows)
    # the half-size target's two rows get their seeds; half-depth is not part of it
    assert {"half-width-kd-seed1", "half-sheared-kd-seed2"} <= set(rows) and "half-depth-bi-kd-seed1" not in rows
    assert "bi-cpt-20-seed1" not in rows  # no longer the best, and no twin of it ran
    shifts |= {"bi-cpt-20-seed2": 0.25}   # ... but once one has, a later best keeps it in the table
    done = {n: row_numbers(r) for n, r in results(exp_show(shifts)).items()}
    assert {"bi-cpt-20-seed1", "bi-cpt-20-seed2"} <= {r.row for r in plan(done, 500)}
    assert rows["half-width-kd"].overrides["prune.target.params"] == 500
    assert rows["half-sheared-kd"].overrides["retrain.distill"] == 1.0
    assert rows["bi-kd-20-seed1"].overrides["run.seed"] == 1


def test_a_named_criterion_starts_phase_2_and_only_picks_rows_in_its_order():
    rows = plan({}, 400, criterion="ppl+")
    assert {r.row for r in rows} == {r.row for r in phase1() + phase2("ppl+") + phase4([])}
    with_half = {r.row for r in plan({}, 400, criterion="ppl+", retraining="kd")}
    halves = {"half-width-kd", "half-sheared-kd"}
    assert with_half == {r.row for r in rows} | {"half-depth-ppl+-kd"} | halves | {f"{h}-seed{s}" for h in halves
                                                                                   for s in (1, 2)}
    picked = select(rows, ["ppl+-kd-20", "ppl+-cpt-20", "half-width-kd"])  # half-width-kd: not unlocked yet
    assert [r.row for r in picked] == ["ppl+-kd-20", "ppl+-cpt-20"]
    assert select(rows, None) == rows
    assert {"half-sheared-kdh", "sleb-iter-35", "ppl+-kd-20-seed1", "half-depth-bi-cpt"} <= {r.row for r in every_row(0)}


def test_rows_another_criterion_ran_stay_in_the_table():
    # phase 2 ran with ppl+ at 20% and with bi at 35%; the table named with bi still lists ppl+'s rows
    done = {n: row_numbers(r) for n, r in results(exp_show({"ppl+-kd-20": 0.4, "bi-kd-35": 0.6,
                                                              "half-depth-ppl+-cpt": 1.0})).items()}
    rows = {r.row: r for r in plan(done, 400, criterion="bi", retraining="cpt")}
    assert {"ppl+-kd-20", "bi-kd-35", "half-depth-ppl+-cpt", "half-depth-bi-cpt"} <= set(rows)
    assert "ppl+-kdh-20" not in rows  # not run: only the named criterion's unfinished rows are listed
    assert rows["half-depth-ppl+-cpt"].overrides["prune.depth.criterion"] == "ppl+"


def test_an_unknown_row_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--only", "ppl+-cpt-20", "ppl-cpt-20"])
    assert stop.value.code == 2
    assert "--only: no row ppl-cpt-20" in capsys.readouterr().err


def test_unfinished_rows_do_not_count():
    shifts = {r.row: 0.5 for r in phase1()} | {"bi-cpt-35": 0.1, "sleb-cpt-20": 0.1, "taylor+-lora-20": 0.3,
                                                "taylor+-lora-35": 0.3}
    found = results(exp_show(shifts, states={"bi-cpt-35": "running", "sleb-cpt-20": "failed"}))
    assert found[EXP_PREFIX + "bi-cpt-35"].state == "running"
    done = {n: row_numbers(r) for n, r in found.items() if r.state == "success"}
    # the unfinished rows' 0.1 does not count: the best so far (whose twins are planned) is taylor+'s 0.3
    assert {r.row for r in plan(done, 400)} == {r.row for r in phase1()} | SEED_TWINS | {
        f"taylor+-lora-{p}-seed{s}" for p in RATIOS for s in (1, 2)}


def test_table_and_target():
    shifts = {r.row: 0.5 for r in phase1()} | {"ppl+-cpt-20": 0.4, "ppl+-cpt-35": 0.6, "bi-cpt-20": 0.3}
    found = results(exp_show(shifts))
    done = {n: row_numbers(r) for n, r in found.items()}
    assert done[EXP_PREFIX + "ppl+-cpt-20"]["wall_s"] == 600.0  # evaluation 60 s + training 540 s
    text = render(plan(done, 400), done, found)
    assert "| ppl+-cpt-20 | ppl+ + CPT, 20% (Shortened LLaMA v2) | 0.400 | 0.400 | 0.30 ± 0.05 |" in text
    # a gain of one seed against one seed is not shown, however large
    assert "20% @128: best bi-cpt-20 0.300 (1 seed) vs ppl+-cpt-20 0.400 (1 seed): +25.0% (not shown: one seed" in text
    assert "half size: not measured yet" in text
    # seeds: at 20% every seed of bi below every seed of ppl+ (met); at 35% a 12% gain inside the range
    shifts |= {"ppl+-cpt-20-seed1": 0.5, "bi-cpt-20-seed1": 0.32, "bi-cpt-35": 0.5, "bi-cpt-35-seed1": 0.45,
               "ppl+-cpt-35-seed1": 0.48, "taylor+-lora-20": 0.2}  # one seed: lower, but not the best
    found = results(exp_show(shifts))
    done = {n: row_numbers(r) for n, r in found.items()}
    text = render(plan(done, 400), done, found)
    assert ("20% @128: best bi-cpt-20 0.310 (2 seeds, 0.300-0.320) vs ppl+-cpt-20 0.450 (2 seeds, 0.400-0.500): "
            "+31.1% (met") in text
    assert "35% @1024: best bi-cpt-35 0.475 (2 seeds, 0.450-0.500) vs ppl+-cpt-35 0.540 (2 seeds, 0.480-0.600): " \
           "+12.0% (not shown: inside the seeds' range" in text
    assert "- seeds of ppl+-cpt-35 @128: 0.600, 0.480: range 0.120" in text
    assert "| bi-cpt-20-seed1 | bi + CPT, 20%, seed 1 | 0.320 |" in text
    # half size: sheared against width after the same retraining, by the same rule of seeds
    shifts |= {"half-sheared-cpt": 0.8, "half-width-cpt": 1.0}
    done = {n: row_numbers(r) for n, r in results(exp_show(shifts)).items()}
    assert ("- half size + cpt @128: sheared 0.800 (1 seed) vs width 1.000 (1 seed): +20.0% (not shown: one seed; "
            "target: sheared below width)") in render(plan(done, 400), done, {})
    shifts |= {"half-sheared-cpt-seed1": 0.9, "half-width-cpt-seed1": 0.95}
    done = {n: row_numbers(r) for n, r in results(exp_show(shifts)).items()}
    text = render(plan(done, 400), done, {})
    assert "- half size + cpt @1024: sheared 0.850 (2 seeds, 0.800-0.900) vs width 0.975 (2 seeds, 0.950-1.000)" in text
    assert "(met; target: sheared below width)" in text and "half size: not measured yet" not in text


def test_family_is_the_row_without_its_seed():
    assert family(EXP_PREFIX + "bi-cpt-20-seed2") == "bi-cpt-20" == family(EXP_PREFIX + "bi-cpt-20")
    assert family(EXP_PREFIX + "half-sheared-cpt") == "half-sheared-cpt"


def test_training_summaries_are_read_from_the_experiment_commit(tmp_path):
    import json

    from shear.recipes import training_metrics

    (tmp_path / "reports/train/retrain").mkdir(parents=True)
    (tmp_path / "reports/train/retrain/metrics.json").write_text(json.dumps({"train_s": 12.5}))
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "PATH": "/usr/bin:/bin"}
    subprocess.run("git init -q && git add -A && git commit -qm x", shell=True, cwd=tmp_path, env=env, check=True)
    assert training_metrics(tmp_path, "HEAD") == {"reports/train/retrain/metrics.json": {"train_s": 12.5}}


def test_queue_busy_reads_dvc_queue_status(monkeypatch):
    from shear import recipes

    def status(text):
        return lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=text, stderr="")

    table = "Task     Name                 Created    Status\nd346751  rcp-a  11:55 AM   {}\n\nWorker status: 0 active, 0 idle\n"
    for state, busy in (("Running", True), ("Queued", True), ("Success", False), ("Failed", False)):
        monkeypatch.setattr(recipes.subprocess, "run", status(table.format(state)))
        assert recipes.queue_busy(Path(".")) is busy


def test_a_preset_is_the_rows_recipe_without_its_cut_and_seed(tmp_path):
    (tmp_path / "params.yaml").write_text("prune:\n  method: depth\n  depth:\n    criterion: ppl+\n    ratio: 0.2\n"
                                          "    mode: one_shot\n    heal_tokens: 0\nretrain:\n  tokens: 65536\n"
                                          "  method: lora\n  distill: 0.0\nrun:\n  seed: 0\n")
    recipe = seed_twins(phase2("bi")[0])[0]  # bi-kd-20-seed1: pure KD, seed 1
    preset = tmp_path / "best.yaml"
    done = {n: row_numbers(r) for n, r in results(exp_show({"bi-kd-20": 0.1, "bi-kd-20-seed1": 0.3})).items()}
    preset.write_text(preset_text(recipe, [done["rcp-bi-kd-20"], done["rcp-bi-kd-20-seed1"]]))
    assert "(seeds 0, 1, 65,536 retraining tokens): mean log(PPL/base) @128 0.200 (2 seeds, 0.100-0.300)" in preset.read_text()
    assert preset.read_text().startswith("# Recipe preset from row bi-kd-20:")
    args = preset_args(tmp_path, preset)
    keys = [a.split("=")[0] for a in args[1::2]]
    assert "retrain.distill=1.0" in args and "prune.depth.ratio" not in keys and "run.seed" not in keys
    assert set(keys) == set(recipe.overrides) - {"prune.depth.ratio", "run.seed"}
    preset.write_text("retrain.distil: 1.0\n")  # a typo is refused, naming the key
    with pytest.raises(ShearError, match="retrain.distil not in params.yaml"):
        preset_args(tmp_path, preset)
    preset.write_text("- retrain.distill\n")
    with pytest.raises(ShearError, match="expected a mapping"):
        preset_args(tmp_path, preset)


def test_collect_tries_again_when_dvc_exp_show_races_a_queue_worker(monkeypatch, tmp_path):
    import shear.recipes as recipes

    calls = []

    def flaky(root, all_commits=False):
        calls.append(all_commits)
        if len(calls) == 1:
            raise ShearError("`dvc exp show --json` failed: directory '.dvc/tmp/exps/tmp1/.dvc' does not exist")
        return exp_show({"ppl+-cpt-20": 0.4})

    monkeypatch.setattr(recipes, "exp_show", flaky)
    monkeypatch.setattr(recipes, "training_metrics", lambda root, rev: {})
    found, done, half = recipes.collect(tmp_path, wait_s=0)
    assert len(calls) == 2 and abs(done[EXP_PREFIX + "ppl+-cpt-20"]["log_ratio"]["128"] - 0.4) < 1e-12
    monkeypatch.setattr(recipes, "exp_show", lambda root, all_commits=False: (_ for _ in ()).throw(ShearError("down")))
    with pytest.raises(ShearError, match="down"):
        recipes.collect(tmp_path, wait_s=0)


def test_finished_rows_outlive_their_experiments_in_the_record(monkeypatch, tmp_path, capsys):
    import json

    import shear.recipes as recipes

    monkeypatch.setattr(recipes, "training_metrics", lambda root, rev: {})
    monkeypatch.setattr(recipes, "exp_show", lambda root, all_commits=False: exp_show({"ppl+-cpt-20": 0.4, "bi-cpt-20": 0.3}))
    recipes.table(tmp_path, Path("reports/recipes.md"))
    record = json.loads((tmp_path / recipes.RECORD).read_text())
    assert sorted(record) == [EXP_PREFIX + "bi-cpt-20", EXP_PREFIX + "ppl+-cpt-20"]
    # a new clone: the experiments are gone, bi-cpt-20 ran again with another result (the experiment wins)
    monkeypatch.setattr(recipes, "exp_show", lambda root, all_commits=False: exp_show({"bi-cpt-20": 0.2}))
    text = recipes.table(tmp_path, Path("reports/recipes.md"))
    assert "| ppl+-cpt-20 | ppl+ + CPT, 20% (Shortened LLaMA v2) | 0.400 | 0.400 | 0.30 ± 0.05 |" in text
    assert "| bi-cpt-20 | bi + CPT, 20% | 0.200 |" in text
    found, done, half = recipes.collect(tmp_path)
    assert half == 500 and set(done) == set(record)
    (tmp_path / ".dvc").mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    main(["plan"])
    states = dict(re.match(r"(\S+) +phase \d +(success|not run)", line).groups()
                  for line in capsys.readouterr().out.splitlines())
    assert states[EXP_PREFIX + "ppl+-cpt-20"] == "success" and states[EXP_PREFIX + "ppl+-lora-20"] == "not run"
    # `run` queues neither a recorded row nor one with an experiment
    queued = []
    monkeypatch.setattr(recipes.subprocess, "run", lambda cmd, **k: queued.append(cmd[cmd.index("-n") + 1])
                        or subprocess.CompletedProcess(cmd, 0, "", ""))
    recipes.queue(tmp_path, phase1()[:4], found, done)
    assert queued == [EXP_PREFIX + "ppl+-lora-20", EXP_PREFIX + "taylor+-lora-20"]
    (tmp_path / recipes.RECORD).write_text(json.dumps({"rcp-x": {"log_ratio": {}}}))
    with pytest.raises(ShearError, match="reports/recipes.json: expected .*git checkout reports"):
        recipes.collect(tmp_path)
