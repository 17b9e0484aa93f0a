"""shear.compare on a real `dvc exp show --json` sample: experiments, table, Pareto frontier, command line."""
import json

import pytest

from shear.compare import comparison, default_seq_len, experiments, find_dvc_root, main, mark_fronts, pareto_front
from shear.errors import ShearError

# Captured from `dvc exp show --json` (dvc 3.67.1) in a scratch repository whose stage writes
# metrics in the evaluate stage's schema; trimmed (deps/outs/meta, the pruned model's file, per-domain
# perplexities and two experiments removed). The workspace holds r20cpt's results (after `dvc exp run`);
# r10 is queued (no metrics yet).
EXP_SHOW = r'''
[
 {
  "rev": "workspace",
  "name": null,
  "data": {
   "rev": "workspace",
   "timestamp": null,
   "params": {
    "params.yaml": {"data": {"prune": {"method": "depth", "ratio": 0.2}, "retrain": {"method": "cpt", "tokens": 1000}}}
   },
   "metrics": {
    "reports/eval/base/metrics.json": {
     "data": {
      "params": {"total": 1000, "non_embedding": 800},
      "ppl": {"128": {"mean": 12.0}},
      "tasks": {"shear_lastword": {"acc": 0.4, "acc_stderr": 0.02}},
      "speed": {"batch": {"bs1": {"tokens_per_s": 100.0}}}
     }
    },
    "reports/eval/retrained/metrics.json": {
     "data": {
      "params": {"total": 840, "non_embedding": 640},
      "ppl": {"128": {"mean": 16.32}},
      "tasks": {"shear_lastword": {"acc": 0.34, "acc_stderr": 0.02}},
      "speed": {"batch": {"bs1": {"tokens_per_s": 125.0}}},
      "speedup": {"bs1": {"decode": 1.25}}
     }
    }
   }
  },
  "error": null,
  "experiments": null
 },
 {
  "rev": "5bbd1158b351392efe66e51748025cb082d7574c",
  "name": "master",
  "data": {
   "rev": "5bbd1158b351392efe66e51748025cb082d7574c",
   "timestamp": "2026-11-22T22:29:16",
   "params": {
    "params.yaml": {"data": {"prune": {"method": "depth", "ratio": 0.2}, "retrain": {"method": "lora", "tokens": 1000}}}
   },
   "metrics": {
    "reports/eval/base/metrics.json": {
     "data": {
      "params": {"total": 1000, "non_embedding": 800},
      "ppl": {"128": {"mean": 12.0}},
      "tasks": {"shear_lastword": {"acc": 0.4, "acc_stderr": 0.02}},
      "speed": {"batch": {"bs1": {"tokens_per_s": 100.0}}}
     }
    },
    "reports/eval/retrained/metrics.json": {
     "data": {
      "params": {"total": 840, "non_embedding": 640},
      "ppl": {"128": {"mean": 14.88}},
      "tasks": {"shear_lastword": {"acc": 0.36, "acc_stderr": 0.02}},
      "speed": {"batch": {"bs1": {"tokens_per_s": 125.0}}},
      "speedup": {"bs1": {"decode": 1.25}}
     }
    }
   }
  },
  "error": null,
  "experiments": [
   {
    "revs": [
     {
      "rev": "7b5aaae615dfaba4cc5e3c9e75ae25300bf3eadc",
      "name": "r20cpt",
      "data": {
       "rev": "7b5aaae615dfaba4cc5e3c9e75ae25300bf3eadc",
       "timestamp": "2026-11-22T22:30:59",
       "params": {
        "params.yaml": {"data": {"prune": {"method": "depth", "ratio": 0.2}, "retrain": {"method": "cpt", "tokens": 1000}}}
       },
       "metrics": {
        "reports/eval/base/metrics.json": {
         "data": {
          "params": {"total": 1000, "non_embedding": 800},
          "ppl": {"128": {"mean": 12.0}},
          "tasks": {"shear_lastword": {"acc": 0.4, "acc_stderr": 0.02}},
          "speed": {"batch": {"bs1": {"tokens_per_s": 100.0}}}
         }
        },
        "reports/eval/retrained/metrics.json": {
         "data": {
          "params": {"total": 840, "non_embedding": 640},
          "ppl": {"128": {"mean": 16.32}},
          "tasks": {"shear_lastword": {"acc": 0.34, "acc_stderr": 0.02}},
          "speed": {"batch": {"bs1": {"tokens_per_s": 125.0}}},
          "speedup": {"bs1": {"decode": 1.25}}
         }
        }
       }
      },
      "error": null,
      "experiments": null
     }
    ],
    "executor": null,
    "name": "r20cpt"
   },
   {
    "revs": [
     {
      "rev": "5d3e9f340b8d8d1a6e196fe374fa1f7c4f33fdc6",
      "name": "r50cpt",
      "data": {
       "rev": "5d3e9f340b8d8d1a6e196fe374fa1f7c4f33fdc6",
       "timestamp": "2026-11-22T22:29:31",
       "params": {
        "params.yaml": {"data": {"prune": {"method": "depth", "ratio": 0.5}, "retrain": {"method": "cpt", "tokens": 1000}}}
       },
       "metrics": {
        "reports/eval/base/metrics.json": {
         "data": {
          "params": {"total": 1000, "non_embedding": 800},
          "ppl": {"128": {"mean": 12.0}},
          "tasks": {"shear_lastword": {"acc": 0.4, "acc_stderr": 0.02}},
          "speed": {"batch": {"bs1": {"tokens_per_s": 100.0}}}
         }
        },
        "reports/eval/retrained/metrics.json": {
         "data": {
          "params": {"total": 600, "non_embedding": 400},
          "ppl": {"128": {"mean": 22.8}},
          "tasks": {"shear_lastword": {"acc": 0.25, "acc_stderr": 0.02}},
          "speed": {"batch": {"bs1": {"tokens_per_s": 200.0}}},
          "speedup": {"bs1": {"decode": 2.0}}
         }
        }
       }
      },
      "error": null,
      "experiments": null
     }
    ],
    "executor": null,
    "name": "r50cpt"
   },
   {
    "revs": [
     {
      "rev": "6f6984d5cd1a1d692aa459cf00d73f6466574c0f",
      "name": "r10",
      "data": {
       "rev": "6f6984d5cd1a1d692aa459cf00d73f6466574c0f",
       "timestamp": "2026-11-22T22:29:37",
       "params": {
        "params.yaml": {"data": {"prune": {"method": "depth", "ratio": 0.1}, "retrain": {"method": "cpt", "tokens": 1000}}}
       },
       "metrics": {}
      },
      "error": null,
      "experiments": null
     }
    ],
    "executor": {"state": "queued", "name": "dvc-task"},
    "name": "r10"
   }
  ]
 }
]
'''


def test_pareto_front():
    # minimize both: (1, 5) and (2, 2) and (4, 1) trade off; (3, 3) is dominated by (2, 2)
    assert pareto_front([(1, 5), (2, 2), (3, 3), (4, 1)], (False, False)) == [True, True, False, True]
    # larger x is better: (3, 3) dominates (2, 3); (4, 4) is faster but worse than (3, 3)
    assert pareto_front([(2, 3), (3, 3), (4, 4)], (True, False)) == [False, True, True]
    assert pareto_front([(2, 3), (3, 3), (4, 1)], (True, False)) == [False, False, True]
    assert pareto_front([(1, 1), (1, 1), (2, 2)], (False, False)) == [True, True, False]  # ties both stay
    assert pareto_front([(1, None), (2, 2)], (False, False)) == [False, True]
    assert pareto_front([], (False, False)) == []


def test_experiments_from_exp_show():
    runs = experiments(json.loads(EXP_SHOW))
    # the workspace repeats r20cpt, r10 is only queued
    assert [(r["name"], r["rev"]) for r in runs] == [("master", "5bbd115"), ("r20cpt", "7b5aaae"), ("r50cpt", "5d3e9f3")]
    assert runs[2]["params"]["prune.ratio"] == 0.5
    assert runs[2]["metrics"]["reports/eval/retrained/metrics.json"]["ppl"]["128"]["mean"] == 22.8


def test_all_commits_lists_repeated_results_once():
    exp_show = json.loads(EXP_SHOW)
    commit = next(entry for entry in exp_show if entry.get("experiments"))
    # --all-commits: an older commit with the same params and results, and an experiment of its own
    older = json.loads(json.dumps(commit)) | {"rev": "0123456789abcdef", "name": None}
    exp_show.append(older)
    names = [r["name"] for r in experiments(exp_show)]
    assert names.count("master") == 1 and "0123456" not in names
    assert names.count("r20cpt") == 2  # the older commit's experiments are still listed


def test_running_experiment_is_left_out():
    exp_show = json.loads(EXP_SHOW)
    commit = next(entry for entry in exp_show if entry.get("experiments"))
    r10 = next(exp for exp in commit["experiments"] if exp["name"] == "r10")
    # While it runs, an experiment's row carries its baseline's metrics: they are not its own.
    r10["executor"]["state"] = "running"
    r10["revs"][0]["data"]["metrics"] = commit["data"]["metrics"]
    assert "r10" not in [r["name"] for r in experiments(exp_show)]
    r10["executor"]["state"] = "success"
    assert "r10" in [r["name"] for r in experiments(exp_show)]


def test_comparison_and_fronts():
    keys, rows = comparison(experiments(json.loads(EXP_SHOW)), "retrained", "128")
    assert keys == ["prune.ratio", "retrain.method"]  # retrain.tokens and prune.method are the same everywhere
    mark_fronts(rows, "ppl")
    table = {r["name"]: r for r in rows}
    assert list(table) == ["master", "r20cpt", "r50cpt", "base model"]
    assert table["r50cpt"]["non_embedding_params"] == 400 and table["r50cpt"]["tokens_per_s"] == 200.0
    assert table["master"]["acc"] == 0.36 and table["master"]["speedup"] == 1.25
    assert table["base model"]["speedup"] == 1.0 and table["base model"]["prune.ratio"] is None
    # r20cpt: same size and speed as master, worse perplexity
    assert {n: (r["front_size"], r["front_speed"]) for n, r in table.items()} == {
        "master": (True, True), "r20cpt": (False, False), "r50cpt": (True, True), "base model": (True, True)}
    mark_fronts(rows, "acc")
    assert not table["r20cpt"]["front_size"] and table["r50cpt"]["front_speed"]


def test_speed_file_gives_the_same_rows_as_legacy_metrics():
    """Runs with reports/speed.json (the speed stage) compare as runs whose metrics carried their own speed."""
    legacy = json.loads(EXP_SHOW)
    new = json.loads(EXP_SHOW)

    def move_speed(data):
        metrics = (data or {}).get("metrics") or {}
        models, speedup = {}, {}
        for name in ("base", "retrained"):
            m = metrics.get(f"reports/eval/{name}/metrics.json", {}).get("data")
            if m is None:
                continue
            models[name] = m.pop("speed")
            if "speedup" in m:
                speedup[name] = m.pop("speedup")
            # a stale figure in the metrics file must lose against the speed file
            m["speed"] = {"batch": {"bs1": {"tokens_per_s": 1.0}}}
        if models:
            metrics["reports/speed.json"] = {"data": {"reference": "base", "models": models, "speedup": speedup}}

    for entry in new:
        move_speed(entry["data"])
        for exp in entry.get("experiments") or []:
            for rev in exp.get("revs") or []:
                move_speed(rev.get("data"))
    assert comparison(experiments(new)) == comparison(experiments(legacy))


def test_default_seq_len():
    runs = experiments(json.loads(EXP_SHOW))
    assert default_seq_len(runs, "retrained") == "128"
    short = [{"metrics": {"reports/eval/retrained/metrics.json": {"ppl": {"64": {}, "32": {}}}}}]
    assert default_seq_len(short, "retrained") == "32"


def test_workspace_only():
    ws = json.loads(EXP_SHOW)[0]
    runs = experiments([ws])
    assert [r["name"] for r in runs] == ["workspace"]
    keys, rows = comparison(runs)
    assert keys == [] and [r["name"] for r in rows] == ["workspace", "base model"]


def test_command_line(tmp_path, capsys):
    (tmp_path / "exps.json").write_text(EXP_SHOW)
    main(["--json", str(tmp_path / "exps.json"), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out/compare.md").read_text()
    assert "| r20cpt | 7b5aaae | 0.2 | cpt | 640 | 16.32 | 0.34 | 125 | 1.25 |  |  |" in md
    assert (tmp_path / "out/compare_pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out/compare.csv").read_text().splitlines()[0].startswith("name,rev,prune.ratio,retrain.method")
    assert "compare: 4 rows" in capsys.readouterr().out

    (tmp_path / "empty.json").write_text("[]")  # a repository without commits
    with pytest.raises(SystemExit):
        main(["--json", str(tmp_path / "empty.json"), "--out", str(tmp_path / "out")])
    assert "no run has reports/eval/retrained/metrics.json" in capsys.readouterr().err


def test_outside_a_dvc_repository(tmp_path, monkeypatch, capsys):
    with pytest.raises(ShearError, match="not inside a DVC repository"):
        find_dvc_root(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main([])
    assert "not inside a DVC repository" in capsys.readouterr().err
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub").mkdir()
    assert find_dvc_root(tmp_path / "sub") == tmp_path
