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


# ----------------------------------------------------------------------------- damaged model files

TINY_SPEC = "layers=2,hidden=32,heads=4,kv_heads=2,mlp=48"
KEEP_BASE = {"data/models/base/shear.json": '{"method": "base"}\n'}  # base's previous output, for the base stage


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny checkpoint and its f16 GGUF export, made once and copied into each case."""
    from shear.export import export_gguf
    from shear.models import make_tiny_model, save_model

    root = tmp_path_factory.mktemp("tiny")
    model, tok = make_tiny_model(TINY_SPEC)
    save_model(model, tok, root / "model", {"method": "base", "source": f"tiny:{TINY_SPEC}"})
    export_gguf(model, tok, root / "model.gguf", "f16")
    return root


def truncate(path):
    """Cut a file to half its length, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def remove_tokenizer(directory):
    """Delete the tokenizer files of a checkpoint, keeping config and weights."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).unlink()


DAMAGE = {
    "truncated safetensors": lambda d: truncate(d / "model.safetensors"),
    "garbage safetensors": lambda d: (d / "model.safetensors").write_bytes(b"not safetensors at all" * 40),
    "no weights": lambda d: (d / "model.safetensors").unlink(),
    "no tokenizer": remove_tokenizer,
    "config not JSON": lambda d: (d / "config.json").write_text("{model_type: llama"),
}
# the line each damage gives, after the path of the checkpoint directory
DAMAGE_LINE = {
    "truncated safetensors": "/model.safetensors: truncated or not a safetensors file (",
    "garbage safetensors": "/model.safetensors: truncated or not a safetensors file (",
    "no weights": ": no weights (no *.safetensors file next to config.json); ",
    "no tokenizer": ": no tokenizer (no tokenizer.json, tokenizer.model or vocab.json); ",
    "config not JSON": "/config.json: not valid JSON (",
}


def run_stage_expecting_error(tmp_path, monkeypatch, capsys, module, params: dict, previous: dict, message: str):
    """Run stage `module` in tmp_path with `params`; it must exit 1 with one line starting with
    `message` and leave every file (and `previous`, its earlier outputs) as it was."""
    from shear.stage import run_stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [module.__name__])
    for path, content in previous.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params(params)))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    with pytest.raises(SystemExit) as exit_info:
        run_stage(module.__doc__, module.main)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_base_checkpoint_stops_the_prune_stage(tmp_path, monkeypatch, capsys, tiny_checkpoint, damage):
    import shutil

    from stages import prune

    shutil.copytree(tiny_checkpoint / "model", tmp_path / "data/models/base")
    DAMAGE[damage](tmp_path / "data/models/base")
    run_stage_expecting_error(tmp_path, monkeypatch, capsys, prune, {}, PREVIOUS,
                              "error: data/models/base" + DAMAGE_LINE[damage])


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_hf_source_stops_the_base_stage(tmp_path, monkeypatch, capsys, tiny_checkpoint, damage):
    import shutil

    from stages import base

    shutil.copytree(tiny_checkpoint / "model", tmp_path / "my-model")
    (tmp_path / "my-model" / "shear.json").unlink()  # a user's download has none
    DAMAGE[damage](tmp_path / "my-model")
    run_stage_expecting_error(tmp_path, monkeypatch, capsys, base, {"base": {"source": "hf:my-model"}}, KEEP_BASE,
                              "error: my-model" + DAMAGE_LINE[damage])


@pytest.mark.parametrize("cut", [10, 100, "half"], ids=["header", "metadata", "tensors"])
def test_truncated_gguf_stops_the_base_stage(tmp_path, monkeypatch, capsys, tiny_checkpoint, cut):
    from stages import base

    data = (tiny_checkpoint / "model.gguf").read_bytes()
    (tmp_path / "model.gguf").write_bytes(data[: len(data) // 2 if cut == "half" else cut])
    run_stage_expecting_error(tmp_path, monkeypatch, capsys, base, {"base": {"source": "gguf:model.gguf"}}, KEEP_BASE,
                              "error: model.gguf: cannot read this GGUF file (")


def test_usage_error_is_one_line(tmp_path, monkeypatch, capsys):
    """A missing or unknown command-line argument is a bad input like any other: exit 1, one line."""
    from shear.stage import run_stage
    from stages import evaluate

    monkeypatch.chdir(tmp_path)
    for argv, message in ((["stages.evaluate"], "the following arguments are required: model"),
                          (["stages.evaluate", "final"], "argument model: invalid choice: 'final'")):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            run_stage(evaluate.__doc__, evaluate.main, evaluate.add_arguments)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_error_after_loading_the_model_is_still_one_line(tmp_path, monkeypatch, capsys, tiny_checkpoint):
    """The base model loads (no progress bar on stderr), then the missing score file stops the stage."""
    import shutil

    from stages import prune

    shutil.copytree(tiny_checkpoint / "model", tmp_path / "data/models/base")
    run_stage_expecting_error(tmp_path, monkeypatch, capsys, prune, {}, PREVIOUS,
                              "error: reports/scores/block_ppl+.json: file not found")
