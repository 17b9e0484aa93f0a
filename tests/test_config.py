"""params.yaml validation: every bad value stops a stage with one line and leaves no output."""
import sys

import pytest
import yaml

from shear.config import Params, load_params, parse_params
from shear.errors import ConfigError
from tests.conftest import REPO

BAD = [
    ({"prune": {"depth": {"ratio": 1.4}}}, "params.yaml: prune.depth.ratio=1.4 is out of range (0, 1)"),
    ({"prune": {"depth": {"ratio": 0}}}, "params.yaml: prune.depth.ratio=0.0 is out of range (0, 1)"),
    ({"prune": {"method": "magic"}}, "params.yaml: prune.method='magic' is not valid; choose one of depth, width, sheared"),
    ({"prune": {"depth": {"criterion": "vibes"}}}, "params.yaml: prune.depth.criterion='vibes' is not valid"),
    ({"prune": {"depth": {"rato": 0.2}}}, "params.yaml: unknown key prune.depth.rato; valid keys under prune.depth: criterion"),
    ({"bogus": 1}, "params.yaml: unknown key bogus; valid keys: run"),
    ({"retrain": {"tokens": "many"}}, "params.yaml: retrain.tokens='many' must be an integer"),
    ({"retrain": {"lora": {"r": 0}}}, "params.yaml: retrain.lora.r=0 is out of range [1, inf]"),
    ({"retrain": {"distill": 1.5}}, "params.yaml: retrain.distill=1.5 is out of range [0, 1]"),
    ({"shards": {"calib_fraction": 0.6, "eval_fraction": 0.5}}, "shards.calib_fraction + shards.eval_fraction = 1.1 must be below 1"),
    ({"score": {"block_criteria": ["ppl", "psychic"]}}, "score.block_criteria has unknown criterion 'psychic'"),
    ({"corpus": {"domains": ["poetry"]}}, "corpus.domains has unknown domain 'poetry'"),
    ({"data": {"mixture": "random"}}, "data.mixture='random' is not valid; choose one of auto, fixed, dynamic"),
    ({"retrain": {"betas": [0.9, 1.5]}}, "retrain.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ({"evaluate": {"speed": {"batch_sizes": 4}}}, "evaluate.speed.batch_sizes=4 must be a list of an integer"),
    ({"run": {"device": "tpu"}}, "run.device='tpu' is not valid; choose one of auto, cpu, cuda"),
    ({"run": {"dtype": "float16"}}, "run.dtype='float16' is not valid; choose one of auto, float32, bfloat16"),
    ({"prune": {"sheared": {"warmup_fraction": 0.2}}}, "unknown key prune.sheared.warmup_fraction"),
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


def test_missing_and_corrupt_params_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("prune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("override", [o for o, _ in BAD[:10]])
def test_stage_with_bad_params_exits_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, override):
    from stages import base

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**override, "base": {"source": "tiny:"}}))
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

    (tmp_path / "params.yaml").write_text("base: {source: 'zip:model'}\n")
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
