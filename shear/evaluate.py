"""Quality metrics of a model: per-domain perplexity, lm-eval tasks, retention vs the base model.

Perplexity protocol (written into every metrics file as `ppl_protocol`):
- the eval split of each domain, re-cut into rows of each length in `evaluate.ppl_seq_lens`
  (the first `ppl_max_tokens` tokens of the split, so every length sees the same text);
  a length above the model's `max_position_embeddings` is clamped to it;
- every row is scored independently (no KV cache, no sliding window): the loss is the mean
  next-token NLL (natural log) over the row's tokens 2..L, or 1..L when a BOS token is
  prepended. BOS is prepended only when the model's tokenizer adds one itself, i.e. when the
  model saw one at the start of its training text. SmolLM2's tokenizer adds none, and the
  shards hold none (documents are separated by EOS), so the default is no BOS;
- a float32 log-softmax and float64 sums whatever the weights' dtype (shear.nll, recorded as
  `info.dtype`), no autocast, so the figures do not depend on the device's precision;
- `ppl.<len>.<domain>` = exp(loss), `loss.<len>.mean` = the mean over domains (each
  domain counts once), `ppl.<len>.mean` = exp(loss.<len>.mean).
"""
from __future__ import annotations

import copy
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shear.data import rechunk
from shear.errors import ShearError
from shear.lmeval_tasks import BUILTIN_TASKS, write_tasks
from shear.nll import sequence_nll


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token in front of a text by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def perplexity(model, rows: torch.Tensor, batch_size: int, bos_token_id: int | None = None,
               desc: str = "perplexity") -> dict:
    """Mean next-token NLL over `rows` [N, L] of token ids: {"loss", "ppl", "tokens"}.

    Each row is one independent sequence (shear.nll.sequence_nll); with `bos_token_id` it
    is prepended to every row and the first token is scored too.
    """
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", leave=False):
        nll, tokens = sequence_nll(model, rows[start:start + batch_size], bos_token_id)
        total_nll += nll
        total_tokens += tokens
    model.train(was_training)
    loss = total_nll / max(total_tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": total_tokens}


def ppl_rows(split: np.ndarray, length: int, max_tokens: int) -> np.ndarray:
    """The rows [N, length] a domain's perplexity is measured on: its eval split's first `max_tokens` tokens."""
    return rechunk(split, length)[: max(1, max_tokens // length)]


def ppl_rows_per_pass(batch_size: int, seq_lens: list[int], length: int, max_positions: int, bos: bool) -> int:
    """Rows of `length` tokens per forward pass: `batch_size` rows' worth of the longest length's tokens.

    The float sums depend on it (a different batch rounds differently), so whoever must
    reproduce these losses exactly (the dynamic mixture, shear.mixture) batches the same way.
    """
    longest = min(max(seq_lens), max_positions - int(bos))
    return max(1, batch_size * longest // length)


def domain_perplexity(model, eval_splits: dict[str, np.ndarray], seq_lens: list[int], max_tokens: int,
                      batch_size: int, bos_token_id: int | None) -> dict:
    """Per-domain perplexity at each length: {"ppl", "loss", "ppl_protocol"} sections of metrics.json.

    Keys are the requested lengths (as strings) so metrics of models with different maximum
    lengths stay comparable; `ppl_protocol.seq_len.<len>` is the length actually used.

    `batch_size` is the number of rows of the longest length per forward pass; shorter rows
    are batched to the same number of tokens (the same activation memory). Rows are scored
    independently, so the figures do not depend on it, and a few long forward passes run
    faster than many short ones (on 2 CPU cores 64 x 128 tokens per pass took about half
    the time per token of 8 x 128: bench/results/eval_profile.md).
    """
    max_positions = getattr(model.config, "max_position_embeddings", None) or max(seq_lens)
    bos = bos_token_id is not None
    ppl, loss = {}, {}
    protocol = {"bos": int(bos), "seq_len": {}, "tokens": {}}
    for requested in seq_lens:
        key = str(requested)
        length = min(requested, max_positions - int(bos))
        rows_per_pass = ppl_rows_per_pass(batch_size, seq_lens, length, max_positions, bos)
        protocol["seq_len"][key] = length
        ppl[key], loss[key], protocol["tokens"][key] = {}, {}, {}
        for domain, split in eval_splits.items():
            rows = ppl_rows(split, length, max_tokens)
            if len(rows) == 0:
                print(f"evaluate: skipping {domain} at length {length}: its eval split holds fewer tokens")
                continue
            result = perplexity(model, torch.from_numpy(np.asarray(rows, dtype=np.int64)), rows_per_pass,
                                bos_token_id, desc=f"ppl {key} {domain}")
            ppl[key][domain] = result["ppl"]
            loss[key][domain] = result["loss"]
            protocol["tokens"][key][domain] = result["tokens"]
        if not loss[key]:
            raise ShearError(
                f"params.yaml: evaluate.ppl_seq_lens has {requested}, longer than every domain's eval split; "
                "use a shorter length or more text (shards.eval_fraction)"
            )
        loss[key]["mean"] = float(np.mean(list(loss[key].values())))
        ppl[key]["mean"] = math.exp(loss[key]["mean"])
    return {"ppl": ppl, "loss": loss, "ppl_protocol": protocol}


def run_tasks(model, tokenizer, tasks: list[str], heldout_dir: str | Path, limit: int | None,
              batch_size: int, seed: int) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the in-memory model: {task: {"acc", "acc_stderr", ..., "n"}}.

    Built-in `shear_*` tasks are written as YAML over the held-out text (see
    shear.lmeval_tasks); any other name is a standard lm-eval task, which runs when its
    dataset is already in the local Hugging Face cache (nothing is downloaded).
    """
    if not tasks:
        return {}
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    builtin = [t for t in tasks if t in BUILTIN_TASKS]
    standard = [t for t in tasks if t not in BUILTIN_TASKS]
    with tempfile.TemporaryDirectory(prefix="shear-lmeval-") as tmp:
        task_dir = write_tasks(builtin, heldout_dir, tmp, seed)
        # Indexing lm-eval's own ~15k task configs takes seconds: only when one is asked for.
        manager = TaskManager(include_path=str(task_dir), include_defaults=bool(standard))
        unknown = [t for t in standard if t not in manager.all_tasks]
        if unknown:
            raise ShearError(
                f"params.yaml: evaluate.tasks has unknown task {unknown[0]!r}; use a built-in task "
                f"({', '.join(BUILTIN_TASKS)}) or an lm-eval task name (`lm-eval ls tasks`)"
            )
        # lm-eval sets a pad token on the tokenizer it gets: give it a copy.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        # bootstrap_iters only matters for non-mean metrics (e.g. lambada's perplexity);
        # lm-eval's default of 100000 resamples takes minutes on CPU.
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
        except (ConnectionError, FileNotFoundError) as e:
            raise ShearError(
                f"params.yaml: evaluate.tasks {', '.join(standard)}: dataset not available offline "
                f"({type(e).__name__}); put it in the Hugging Face datasets cache or remove the task"
            ) from None
    return task_results(out)


def task_results(out: dict) -> dict[str, dict[str, float]]:
    """Numbers of lm-eval's results: "acc,none" -> "acc", "acc_stderr,none" -> "acc_stderr", plus "n"."""
    results = {}
    for task, values in out["results"].items():
        entry = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if metric == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                continue  # "alias", "N/A" stderrs, NaN; sample_len duplicates n
            entry[metric if filter_name in ("", "none") else f"{metric}_{filter_name}"] = float(value)
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            entry["n"] = int(n)
        results[task] = entry
    return results


def retention(metrics: dict, base: dict) -> dict:
    """What a model kept of the base model's quality: ratios > 1 are better than base.

    `ppl_<len>` = base ppl.<len>.mean / ppl.<len>.mean; `tasks.<task>` = acc / base acc;
    `acc_mean` = mean acc / mean base acc over the tasks both have.
    """
    out = {}
    for length, values in metrics.get("ppl", {}).items():
        base_ppl = base.get("ppl", {}).get(length, {}).get("mean")
        if base_ppl is not None:
            out[f"ppl_{length}"] = base_ppl / values["mean"]
    tasks, accs, base_accs = {}, [], []
    for task, values in metrics.get("tasks", {}).items():
        base_acc = base.get("tasks", {}).get(task, {}).get("acc")
        if base_acc is not None and "acc" in values:
            accs.append(values["acc"])
            base_accs.append(base_acc)
            if base_acc > 0:
                tasks[task] = values["acc"] / base_acc
    if tasks:
        out["tasks"] = tasks
    if base_accs and sum(base_accs) > 0:
        out["acc_mean"] = sum(accs) / sum(base_accs)
    return out
