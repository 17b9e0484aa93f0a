"""The offline lm-eval tasks: example builders, the YAML, and a real lm-eval run on a tiny model."""
import json
import random

import pytest
import yaml

from shear.errors import ShearError
from shear.evaluate import run_tasks
from shear.lmeval_tasks import foldoc_definition, foldoc_examples, lastword_examples, write_tasks

WORDS = "the house garden letter sister morning walk evening friend answer window river carriage".split()


def book_docs(n_docs=3, seed=0):
    """Chapters of made-up sentences: paragraphs of 4-8 sentences, separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        paragraphs = []
        for _ in range(4):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
                         for _ in range(rng.randint(4, 8))]
            paragraphs.append(" ".join(sentences))
        paragraphs.append('"Short one."')  # too short to be a passage
        docs.append({"text": "\n\n".join(paragraphs), "source": "test", "license": "CC0", "title": f"ch{d}"})
    return docs


def foldoc_docs(n=8):
    docs = []
    for i in range(n):
        term = f"term{i}"
        text = (f"{term}\n\n   <programming> A {{{term}}} is a kind of {WORDS[i]} used by the {WORDS[i + 1]}. "
                f"More text follows here.\n\n   (1999-01-01)")
        docs.append({"text": text, "title": term, "source": "test", "license": "GPL"})
    docs.append({"text": "seealso\n\n   {term1}.", "title": "seealso", "source": "test", "license": "GPL"})
    return docs


def write_heldout(directory, books=True, foldoc=True):
    directory.mkdir(parents=True, exist_ok=True)
    for name, docs, wanted in (("books", book_docs(), books), ("encyclopedic", foldoc_docs(), foldoc)):
        if wanted:
            with open(directory / f"{name}.jsonl", "w") as f:
                for doc in docs:
                    f.write(json.dumps(doc) + "\n")
    return directory


def test_lastword_examples_end_paragraphs():
    docs = book_docs()
    examples = lastword_examples(docs, seed=0)
    assert len(examples) == 12  # 4 long paragraphs per doc, the short quote skipped
    text = "\n".join(d["text"] for d in docs)
    for ex in examples:
        assert ex["target"].startswith(" ") and ex["target"][1:].isalpha()
        assert 30 <= len((ex["context"] + ex["target"]).split()) <= 150
        assert (ex["context"] + ex["target"] + ".") in text  # the passage is verbatim, last word stripped of "."
    assert examples == lastword_examples(docs, seed=0)
    assert examples != lastword_examples(docs, seed=1)  # seeded order


def test_foldoc_examples_mask_term_and_label_the_definition():
    assert foldoc_definition({"text": "term3\n\n   <lang> A {term3} is a kind of walk used by it. More."}) == (
        "term3", "A ___ is a kind of walk used by it.")
    examples = foldoc_examples(foldoc_docs(), seed=0)
    assert len(examples) == 8  # the cross-reference entry is too short
    for ex in examples:
        choices = ex["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        i = int(ex["term"][4:])
        assert choices[ex["label"]] == f"A ___ is a kind of {WORDS[i]} used by the {WORDS[i + 1]}."
    assert len({ex["label"] for ex in examples}) > 1


def test_missing_heldout_names_param_and_file(tmp_path):
    heldout = write_heldout(tmp_path / "heldout", foldoc=False)
    with pytest.raises(ShearError, match=r"evaluate\.tasks has shear_foldoc_mc.*encyclopedic\.jsonl") as e:
        write_tasks(["shear_lastword", "shear_foldoc_mc"], heldout, tmp_path / "out", seed=0)
    assert "\n" not in str(e.value)


def test_yaml_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    heldout = write_heldout(tmp_path / "heldout")
    task_dir = write_tasks(["shear_lastword", "shear_foldoc_mc"], "heldout", "out", seed=0)  # relative in
    for name in ("shear_lastword", "shear_foldoc_mc"):
        config = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert data_file.startswith("/") and data_file.endswith(f"{name}.jsonl")
        assert config["dataset_kwargs"]["cache_dir"].startswith("/")
    assert heldout.is_dir()


def test_lm_eval_runs_offline_from_another_directory(tmp_path, monkeypatch, tiny):
    model, tokenizer = tiny
    heldout = write_heldout(tmp_path / "heldout")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    results = run_tasks(model, tokenizer, ["shear_lastword", "shear_foldoc_mc"], heldout, limit=4,
                        batch_size=4, seed=0)
    assert set(results) == {"shear_lastword", "shear_foldoc_mc"}
    for values in results.values():
        assert values["n"] == 4
        assert 0 <= values["acc"] <= 1 and values["acc_stderr"] >= 0
    assert 0 <= results["shear_foldoc_mc"]["acc_norm"] <= 1
    # a random tiny model does not know the last word
    assert results["shear_lastword"]["acc"] == 0
    assert list(elsewhere.iterdir()) == []  # nothing written into the working directory
