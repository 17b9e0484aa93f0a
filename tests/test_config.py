"""params.yaml validation: every bad value stops a stage with one line and leaves no output."""
import json
import sys

import pytest
import yaml

from shear.config import STAGE_SETTINGS, Params, load_params, parse_params, prune_settings
from shear.errors import ConfigError
from tests.conftest import REPO, full_params

BAD = [
    ({"prune": {"depth": {"ratio": 1.4}}}, "params.yaml: prune.depth.ratio=1.4 is out of range (0, 1)"),
    ({"prune": {"depth": {"ratio": 0}}}, "params.yaml: prune.depth.ratio=0.0 is out of range (0, 1)"),
    ({"prune": {"method": "magic"}},
     "params.yaml: prune.method='magic' is not valid; choose one of depth, width, sheared"),
    ({"prune": {"depth": {"criterion": "vibes"}}}, "params.yaml: prune.depth.criterion='vibes' is not valid"),
    ({"prune": {"depth": {"rato": 0.2}}},
     "params.yaml: unknown key prune.depth.rato; valid keys under prune.depth: criterion"),
    ({"bogus": 1}, "params.yaml: unknown key bogus; valid keys: run"),
    ({"retrain": {"tokens": "many"}}, "params.yaml: retrain.tokens='many' must be an integer"),
    ({"retrain": {"lora": {"r": 0}}}, "params.yaml: retrain.lora.r=0 is out of range [1, inf]"),
    ({"retrain": {"distill": 1.5}}, "params.yaml: retrain.distill=1.5 is out of range [0, 1]"),
    ({"shards": {"calib_fraction": 0.6, "eval_fraction": 0.5}},
     "shards.calib_fraction + shards.eval_fraction = 1.1 must be below 1"),
    ({"score": {"block_criteria": ["ppl", "psychic"]}}, "score.block_criteria has unknown criterion 'psychic'"),
    ({"corpus": {"domains": ["poetry"]}}, "corpus.domains has unknown domain 'poetry'"),
    ({"data": {"mixture": "random"}}, "data.mixture='random' is not valid; choose one of auto, fixed, dynamic"),
    ({"retrain": {"lora": {"betas": [0.9, 1.5]}}}, "retrain.lora.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ({"evaluate": {"speed": {"batch_sizes": 4}}}, "evaluate.speed.batch_sizes=4 must be a list of an integer"),
    ({"run": {"device": "tpu"}}, "run.device='tpu' is not valid; choose one of auto, cpu, cuda"),
    ({"run": {"dtype": "float16"}}, "run.dtype='float16' is not valid; choose one of auto, float32, bfloat16"),
    ({"prune": {"sheared": {"warmup_fraction": 0.2}}}, "unknown key prune.sheared.warmup_fraction"),
    # cross-stage requirements, with advice that works
    ({"prune": {"depth": {"criterion": "sleb"}}},
     "prune.depth.criterion=sleb has no scores: add it to score.block_criteria (now ppl, ppl+, taylor"),
    ({"prune": {"method": "width", "width": {"criterion": "taylor"}}, "score": {"width_criteria": ["magnitude"]}},
     "prune.width.criterion=taylor has no scores: add it to score.width_criteria (now magnitude)"),
    ({"prune": {"method": "sheared"}, "evaluate": {"ppl_seq_lens": [256]}},
     "the dynamic mixture (data.mixture=auto, prune.method=sheared) compares losses with the base model's at 128 "
     "tokens: add 128 to evaluate.ppl_seq_lens (now [256]) or set mixture.reference_loss"),
]


def test_repo_params_equal_defaults():
    assert load_params(REPO / "params.yaml") == Params()


@pytest.mark.parametrize("override,message", BAD, ids=[str(o)[:40] for o, _ in BAD])
def test_bad_params_give_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        parse_params(override)
    text = str(e.value)
    assert message in text
    assert "\n" not in text


def test_cross_stage_checks_pass_when_met():
    parse_params({"prune": {"method": "sheared"}, "evaluate": {"ppl_seq_lens": [256]},
                  "mixture": {"reference_loss": {"code": 2.0}}})
    parse_params({"prune": {"method": "sheared"}, "data": {"mixture": "fixed"}, "evaluate": {"ppl_seq_lens": [256]}})
    parse_params({"prune": {"method": "width", "depth": {"criterion": "sleb"}}})  # depth's criterion unused


@pytest.mark.parametrize("text, message", [
    ("", "params.yaml: empty; it must set every section (run, base, corpus, shards, data, mixture, score, prune, "
         "retrain, evaluate, export); start from the repository's params.yaml"),
    ("run: {seed: 0, device: auto, dtype: auto}\n",
     "params.yaml: missing sections base, corpus, shards, data, mixture, score, prune, retrain, evaluate, export; "
     "every section must be set (copy them from the repository's params.yaml)"),
])
def test_empty_or_partial_params_file_names_what_is_missing(tmp_path, text, message):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(tmp_path / "params.yaml")
    assert str(e.value) == message


def test_missing_keys_are_named(tmp_path):
    params = full_params({})
    del params["prune"]["depth"]["mode"], params["retrain"]["lora"]["r"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^params.yaml: missing keys prune.depth.mode, retrain.lora.r; every key"):
        load_params(tmp_path / "params.yaml")


def test_missing_and_corrupt_params_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("prune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("override", [o for o, _ in BAD[:10]])
def test_stage_with_bad_params_exits_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, override):
    from stages import base

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params({**override, "base": {"source": "tiny:"}})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.base"])
    from shear.stage import run_stage

    with pytest.raises(SystemExit) as exit_info:
        run_stage(base.__doc__, base.main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: params.yaml: ") and "\n" not in err
    assert not (tmp_path / "data").exists()


def test_stage_with_unknown_source_writes_nothing(tmp_path, monkeypatch, capsys):
    from shear.stage import run_stage
    from stages import base

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params({"base": {"source": "zip:model"}})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.base"])
    with pytest.raises(SystemExit):
        run_stage(base.__doc__, base.main)
    assert "base.source='zip:model' is not valid" in capsys.readouterr().err
    assert not (tmp_path / "data" / "models" / "base").exists()


@pytest.mark.parametrize("mixture, method, kind", [
    ("auto", "sheared", "dynamic"), ("auto", "depth", "fixed"), ("auto", "width", "fixed"),
    ("fixed", "sheared", "fixed"), ("dynamic", "depth", "dynamic"),
])
def test_auto_mixture_is_dynamic_only_for_sheared(mixture, method, kind):
    params = parse_params({"data": {"mixture": mixture}, "prune": {"method": method}})
    assert params.mixture_kind() == kind


def test_prune_settings_hold_only_what_the_method_reads():
    depth = prune_settings(parse_params({}))
    assert "prune.depth" in depth and not any(k.startswith(("mixture", "data", "prune.sheared", "prune.width",
                                                            "prune.target", "score.calib")) for k in depth)
    assert "score.calib_sequences" in prune_settings(parse_params({"prune": {"depth": {"mode": "iterative"}}}))
    width = prune_settings(parse_params({"prune": {"method": "width"}}))
    assert set(width) == {"prune.method", "run.seed", "run.dtype", "prune.target", "prune.width"}
    sheared = prune_settings(parse_params({"prune": {"method": "sheared"}}))
    assert sheared["mixture_kind"] == "dynamic" and sheared["mixture.eta"] == 1.0
    assert "prune.depth" not in sheared


@pytest.mark.parametrize("stage", sorted(STAGE_SETTINGS))
def test_mixture_eta_changes_settings_only_under_the_dynamic_mixture(stage):
    settings = STAGE_SETTINGS[stage]
    for method, dynamic in (("depth", False), ("width", False), ("sheared", True)):
        before = settings(parse_params({"prune": {"method": method}}))
        after = settings(parse_params({"prune": {"method": method}, "mixture": {"eta": 2.0}}))
        assert (before != after) == dynamic, (stage, method)


def test_params_stage_writes_settings_and_refuses_an_unknown_section(tmp_path, monkeypatch, capsys):
    from shear.stage import run_stage
    from stages import params as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.params"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params({})))
    run_stage(stage.__doc__, stage.main)
    assert json.loads((tmp_path / "reports/params/prune.json").read_text()) == prune_settings(Params())
    checked = (tmp_path / "reports/params/checked.json").read_text()

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params({"retrian": {"tokens": 1}})))
    with pytest.raises(SystemExit) as exit_info:
        run_stage(stage.__doc__, stage.main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == ("error: params.yaml: unknown key retrian; valid keys: run, base, "
                                               "corpus, shards, data, mixture, score, prune, retrain, evaluate, export")
    assert (tmp_path / "reports/params/checked.json").read_text() == checked
