"""Bad inputs a user or a teammate makes: each stops the stage with exit code 1 and one line
on stderr, before anything is written; the outputs of the previous run stay as they were."""
import sys

import pytest
import yaml

from tests.conftest import full_params

PREVIOUS = {"data/models/pruned/shear.json": '{"method": "depth"}\n', "reports/train/prune/README.md": "old log\n"}


def params_text(overrides: dict, drop: tuple[str, ...] = ()) -> str:
    """A complete params file with `overrides`, less the dotted keys in `drop`."""
    params = full_params(overrides)
    for key in drop:
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        del node[last]
    return yaml.safe_dump(params)


BAD_PARAMS = [
    ("empty file", "", "error: params.yaml: empty; it must set every section (run, base, corpus, shards, data, "
                       "mixture, score, prune, retrain, evaluate, export); start from the repository's params.yaml"),
    ("only comments", "# nothing here\n", "error: params.yaml: empty;"),
    ("partial file", yaml.safe_dump({"prune": full_params({})["prune"]}),
     "error: params.yaml: missing sections run, base, corpus, shards, data, mixture, score, retrain, evaluate, export; "
     "every section must be set"),
    ("missing key", params_text({}, drop=("prune.depth.ratio",)),
     "error: params.yaml: missing keys prune.depth.ratio; every key must be set"),
    ("misspelled section", params_text({"retrian": {"tokens": 1}}),
     "error: params.yaml: unknown key retrian; valid keys: run, base, corpus"),
    ("old flat prune key", params_text({"prune": {"criterion": "ppl"}}),
     "error: params.yaml: unknown key prune.criterion; valid keys under prune: method, target, depth, width, sheared"),
    ("old base.seed", params_text({"base": {"seed": 1}}),
     "error: params.yaml: unknown key base.seed; valid keys under base: source"),
    ("bad dtype", params_text({"run": {"dtype": "fp16"}}),
     "error: params.yaml: run.dtype='fp16' is not valid; choose one of auto, float32, bfloat16"),
    ("criterion not scored", params_text({"prune": {"depth": {"criterion": "ppl+"}}, "score": {"block_criteria": ["ppl"]}}),
     "error: params.yaml: prune.depth.criterion=ppl+ has no scores: add it to score.block_criteria (now ppl)"),
    ("width criterion not scored",
     params_text({"prune": {"method": "width", "width": {"criterion": "taylor"}}, "score": {"width_criteria": []}}),
     "error: params.yaml: prune.width.criterion=taylor has no scores: add it to score.width_criteria (now empty)"),
    ("dynamic mixture without 128", params_text({"data": {"mixture": "dynamic"}, "evaluate": {"ppl_seq_lens": [64]}}),
     "error: params.yaml: the dynamic mixture (data.mixture=dynamic, prune.method=depth) compares losses with the "
     "base model's at 128 tokens: add 128 to evaluate.ppl_seq_lens (now [64]) or set mixture.reference_loss"),
]


@pytest.mark.parametrize("text, message", [case[1:] for case in BAD_PARAMS], ids=[case[0] for case in BAD_PARAMS])
def test_bad_params_stop_the_prune_stage_and_keep_its_outputs(tmp_path, monkeypatch, capsys, text, message):
    from shear.stage import run_stage
    from stages import prune

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages.prune"])
    for path, content in PREVIOUS.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    (tmp_path / "params.yaml").write_text(text)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    with pytest.raises(SystemExit) as exit_info:
        run_stage(prune.__doc__, prune.main)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    for path, content in PREVIOUS.items():
        assert (tmp_path / path).read_text() == content
