"""Offline lm-eval tasks over held-out real text, written as lm-eval YAML at run time.

No zero-shot benchmark data ships with the pipeline, so the default tasks are built from
documents the corpus stage kept out of training (`data/heldout/<domain>.jsonl`):

- `shear_lastword` (LAMBADA-style, books): a passage of a few sentences that ends a
  paragraph; the model must predict its last word. `acc` = the whole word is the greedy
  continuation (lm-eval's `is_greedy` on a loglikelihood request), as in LAMBADA.
- `shear_foldoc_mc` (multiple choice, encyclopedic = FOLDOC): a dictionary term and four
  definitions, its own and three of other terms drawn with a seeded RNG. `acc` and
  `acc_norm` (length-normalised) as in ARC/HellaSwag. A definition that names its own
  term would be found by copying, so each term is masked as `___` in its definition.

`write_tasks` turns the documents into examples, writes them as JSONL and writes one lm-eval
YAML per task next to them, with absolute data paths so the task loads from any working
directory. Point `lm_eval.tasks.TaskManager(include_path=...)` at the returned directory.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from shear.data import read_jsonl_docs
from shear.errors import ShearError

# Task name -> the held-out domain its examples come from.
BUILTIN_TASKS = {"shear_lastword": "books", "shear_foldoc_mc": "encyclopedic"}

LASTWORD_MIN_WORDS = 30   # a passage gives enough context to guess its last word ...
LASTWORD_MAX_WORDS = 150  # ... and stays short enough to batch
FOLDOC_CHOICES = 4        # the definition and 3 distractors
FOLDOC_MIN_WORDS = 5      # skip cross-references such as "See {foo}."
FOLDOC_MAX_WORDS = 40


def _sentences(paragraph: str) -> list[str]:
    """Split on whitespace after ., ! or ? (or after one of them and a closing quote)."""
    return [s for s in re.split(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019])\s+", paragraph) if s]


def lastword_examples(docs: list[dict], seed: int) -> list[dict]:
    """LAMBADA-style examples {"context", "target"} from book paragraphs, in a seeded order.

    The passage is the last sentences of a paragraph (as many as fit in LASTWORD_MAX_WORDS
    words, at least LASTWORD_MIN_WORDS); the target is its final word with trailing
    punctuation and quotes stripped, kept only when purely alphabetic. The target carries
    its leading space, so the continuation is " word" as in lm-eval's lambada task.
    """
    examples = []
    for doc in docs:
        for paragraph in re.split(r"\n\s*\n", doc["text"]):
            paragraph = " ".join(paragraph.split())
            passage: list[str] = []
            for sentence in reversed(_sentences(paragraph)):
                words = sentence.split()
                if len(passage) + len(words) > LASTWORD_MAX_WORDS:
                    break
                passage = words + passage
            if len(passage) < LASTWORD_MIN_WORDS:
                continue
            match = re.fullmatch(r"([A-Za-z]+)[^A-Za-z0-9]*", passage[-1])
            if match is None:
                continue
            examples.append({"context": " ".join(passage[:-1]), "target": " " + match.group(1)})
    random.Random(seed).shuffle(examples)
    return examples


def foldoc_definition(doc: dict) -> tuple[str, str] | None:
    """(term, short definition with the term masked) of one FOLDOC document, or None.

    The document is "<term>\\n\\n<definition>" (title = term). The definition is the first
    sentence of at least FOLDOC_MIN_WORDS words (skipping expansions such as "709 PACkage."),
    without FOLDOC's {cross-reference} braces and leading <category> tags.
    """
    text = doc["text"].strip()
    term = (doc.get("title") or text.split("\n", 1)[0]).strip()
    body = text.split("\n\n", 1)[1] if "\n\n" in text else text.split("\n", 1)[-1]
    if not term:
        return None
    for paragraph in re.split(r"\n\s*\n", body.strip()):
        paragraph = " ".join(paragraph.replace("{", "").replace("}", "").split())
        for sentence in _sentences(re.sub(r"^(<[^>]*>\s*)+", "", paragraph)):
            words = sentence.split()[:FOLDOC_MAX_WORDS]
            if len(words) >= FOLDOC_MIN_WORDS:
                definition = " ".join(words)
                return term, re.sub(rf"(?<!\w){re.escape(term)}(?!\w)", "___", definition, flags=re.IGNORECASE)
    return None


def foldoc_examples(docs: list[dict], seed: int) -> list[dict]:
    """Multiple-choice examples {"term", "choices", "label"}: the term's definition among distractors."""
    pairs, seen = [], set()
    for doc in docs:
        pair = foldoc_definition(doc)
        if pair and pair[1] not in seen:  # distinct definitions, so exactly one choice is right
            seen.add(pair[1])
            pairs.append(pair)
    if len(pairs) < FOLDOC_CHOICES:
        return []
    rng = random.Random(seed)
    examples = []
    for i, (term, definition) in enumerate(pairs):
        others = rng.sample([j for j in range(len(pairs)) if j != i], FOLDOC_CHOICES - 1)
        choices = [pairs[j][1] for j in others]
        label = rng.randrange(FOLDOC_CHOICES)
        choices.insert(label, definition)
        examples.append({"term": term, "choices": choices, "label": label})
    rng.shuffle(examples)
    return examples


def task_config(name: str, data_file: Path, cache_dir: Path) -> dict:
    """The lm-eval YAML config of a built-in task over `data_file` (absolute paths)."""
    config = {
        "task": name,
        "dataset_path": "json",
        # cache_dir keeps the datasets library's cache out of the user's home directory
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}, "cache_dir": str(cache_dir.resolve())},
        "test_split": "test",
        "metadata": {"version": 1.0},
    }
    if name == "shear_lastword":
        config |= {
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    elif name == "shear_foldoc_mc":
        config |= {
            "output_type": "multiple_choice",
            "doc_to_text": "Term: {{term}}\nDefinition:",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    else:
        raise ValueError(f"not a built-in task: {name}")
    return config


def write_tasks(tasks: list[str], heldout_dir: str | Path, out_dir: str | Path, seed: int) -> Path:
    """Write examples (JSONL) and lm-eval YAML of the built-in `tasks` into `out_dir`/tasks.

    Returns the directory to give `TaskManager(include_path=...)`. A task whose held-out
    file is missing or yields no example raises a one-line ShearError.
    """
    builders = {"shear_lastword": lastword_examples, "shear_foldoc_mc": foldoc_examples}
    task_dir = Path(out_dir) / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        source = Path(heldout_dir) / f"{BUILTIN_TASKS[name]}.jsonl"
        if not source.is_file():
            raise ShearError(
                f"params.yaml: evaluate.tasks has {name}, which needs {source} (held-out text of the corpus "
                f"stage's {BUILTIN_TASKS[name]!r} domain); add that domain to corpus.domains or remove the task"
            )
        examples = builders[name](read_jsonl_docs(source), seed)
        if not examples:
            raise ShearError(
                f"{source}: no usable example for evaluate.tasks {name}; raise corpus.heldout_docs or remove the task"
            )
        data_file = task_dir / f"{name}.jsonl"
        with data_file.open("w") as f:
            for ex in examples:
                f.write(json.dumps(ex) + "\n")
        config = task_config(name, data_file, Path(out_dir) / "hf_cache")
        (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return task_dir
