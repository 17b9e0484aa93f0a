"""Which pruning recipe keeps the most model per retraining token: queued DVC experiments and their table.

    python -m shear.recipes plan      # the rows, their params and whether each is done
    python -m shear.recipes run       # queue every row that is ready, run 2 at a time, repeat; then `table`
    python -m shear.recipes table     # reports/recipes.md (+ reports/recipes.json) from `dvc exp show --json`
    python -m shear.recipes preset ROW --name best   # configs/recipes/best.yaml: that row's recipe
    python -m shear.recipes apply configs/recipes/best.yaml [dvc exp run options]
    make recipes                      # = run

Every row is one DVC experiment of the default pipeline up to `evaluate@retrained`, named
`rcp-<row>`, with the params it overrides (`dvc exp run -S key=value`): the same retraining
budget (RECIPE_TOKENS) for every row, healing tokens of iterative pruning included. Rows come
in phases, because later ones use the winners of earlier ones:

1. seeds: the Shortened LLaMA recipes (Kim et al., 2024) at 20% and 35% of blocks: ppl + LoRA,
   taylor+ + LoRA (v1), ppl + CPT (v2); other block criteria with CPT: bi, sleb;
2. beyond (the best CPT criterion of phase 1): CPT + pure logit distillation (w = 1), + hidden-
   state distillation (Minitron), iterative prune-and-heal at the same total tokens;
3. half the non-embedding parameters: depth (the best criterion), width and sheared, each with
   the best retraining of phases 1-2;
4. seeds 1 and 2 (`run.seed`) of the strongest seed recipe and of the best recipe so far, at 20%
   and 35%, and of the half-size width and sheared rows, so that a difference between rows can be
   told from the noise of one seed.

Experiments live in one clone's git refs (a new machine, `dvc exp gc` or `dvc exp remove` loses
them), so `table` also writes the numbers of every finished row to reports/recipes.json: commit it
with the table, and later tables, plans and presets start from it (a row's experiment, when
present, wins). `run` does not queue a row the record holds.

The table reports, per row, the mean over the domains of log(PPL / base PPL) at each evaluated
length (the log-ratio; lower is better, 0 = the base model), the two offline task accuracies
with their standard errors, the token budget, the seed and the run time. `run` sets
OMP_NUM_THREADS=1 for the DVC queue workers: one thread per experiment, two at once on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shear.compare import exp_show, find_dvc_root
from shear.errors import ShearError
from shear.io import atomic_file, read_json, write_json
from shear.records import EvalMetrics, flatten
from shear.report import markdown_table

RECIPE_TOKENS = 65_536       # retraining tokens of every row (the default retrain.tokens)
RATIOS = {"20": 0.2, "35": 0.35}
EXP_PREFIX = "rcp-"
TARGET = "evaluate@retrained"  # what a row runs: no speed, export or report
BASE_EVAL = "reports/eval/base/metrics.json"
RETRAINED_EVAL = "reports/eval/retrained/metrics.json"
TRAIN_METRICS = ("reports/train/prune/metrics.json", "reports/train/retrain/metrics.json")
RECORD = Path("reports/recipes.json")  # {exp name: row_numbers()} of every finished row: outlives the experiments
RECORD_KEYS = ("log_ratio", "tasks", "non_embedding", "base_non_embedding", "tokens", "pruning_tokens", "seed", "wall_s")
SEED_RECIPE = "ppl+-cpt"       # Shortened LLaMA v2: the strongest seed recipe (the target's reference)
# block criteria compared under CPT; ppl+ is the paper's PPL (first 4 / last 2 blocks protected, as the
# released Shortened LLaMA models were made), bi (ShortGPT) and sleb (SLEB) as their papers: unprotected
PHASE1_CRITERIA = ("ppl+", "bi", "sleb")
# score.block_criteria when a row prunes with sleb (it is not in the default list: ~6x ppl's cost)
SCORE_WITH_SLEB = ["ppl", "ppl+", "taylor", "taylor+", "magnitude", "bi", "angular", "random", "sleb"]
HEAL_FRACTION = 0.25           # iterative rows spend a quarter of the budget healing between removals
PRESET_DIR = Path("configs/recipes")
PRESET_LEAVES_OUT = ("prune.depth.ratio", "run.seed")  # the user's cut and seed: not part of a recipe
HIDDEN_DISTILL_WEIGHT = 1.0    # hidden-state distillation weight beside the logit KL (Minitron: equal weights)
EXTRA_SEEDS = (1, 2)           # run.seed of a row's twins (`<row>-seed1`, ...); the row itself is seed 0


@dataclass(frozen=True)
class Recipe:
    """One row: an experiment name, what it is, and the params it sets."""

    row: str                   # short id, e.g. "ppl-lora-20"; the experiment is EXP_PREFIX + row
    title: str                 # what a reader sees, e.g. "ppl + LoRA (Shortened LLaMA v1)"
    phase: int
    overrides: dict = field(default_factory=dict)

    @property
    def exp_name(self) -> str:
        return EXP_PREFIX + self.row

    def set_args(self) -> list[str]:
        """The `-S key=value` arguments of `dvc exp run` (values as YAML/JSON)."""
        args = []
        for key, value in self.overrides.items():
            args += ["-S", f"{key}={json.dumps(value)}"]
        return args


@dataclass
class RowResult:
    """A finished (or failed) row read from `dvc exp show --json`."""

    state: str                 # success | failed | queued | running
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rev: str = ""              # the experiment's commit


# ----------------------------------------------------------------------------- the rows


def depth(criterion: str, ratio: float, retraining: dict) -> dict:
    """Overrides of one depth-pruning row."""
    out = {"prune.method": "depth", "prune.depth.criterion": criterion, "prune.depth.ratio": ratio,
           "prune.depth.mode": "one_shot", "prune.depth.heal_tokens": 0, "retrain.tokens": RECIPE_TOKENS,
           **retraining}
    if criterion == "sleb":
        out["score.block_criteria"] = SCORE_WITH_SLEB
    return out


LORA = {"retrain.method": "lora"}
CPT = {"retrain.method": "cpt"}
KD = {"retrain.method": "cpt", "retrain.distill": 1.0}
KD_HIDDEN = {**KD, "retrain.distill_hidden": HIDDEN_DISTILL_WEIGHT}
RETRAININGS = {"cpt": ("CPT", CPT), "kd": ("CPT + KD (w = 1)", KD), "kdh": ("CPT + KD + hidden-state KD", KD_HIDDEN)}


def phase1() -> list[Recipe]:
    """The seeds' recipes and the other criteria under CPT, at 20% and 35% of blocks."""
    rows = []
    for pct, ratio in RATIOS.items():
        rows += [Recipe(f"ppl+-lora-{pct}", f"ppl+ + LoRA, {pct}% (Shortened LLaMA v1)", 1, depth("ppl+", ratio, LORA)),
                 Recipe(f"taylor+-lora-{pct}", f"taylor+ + LoRA, {pct}% (Shortened LLaMA v1)", 1,
                        depth("taylor+", ratio, LORA)),
                 Recipe(f"ppl+-cpt-{pct}", f"ppl+ + CPT, {pct}% (Shortened LLaMA v2)", 1, depth("ppl+", ratio, CPT))]
        rows += [Recipe(f"{c}-cpt-{pct}", f"{c} + CPT, {pct}%", 1, depth(c, ratio, CPT))
                 for c in PHASE1_CRITERIA if c != "ppl+"]
    return rows


def phase2(criterion: str) -> list[Recipe]:
    """Beyond the seeds with the best CPT criterion: pure KD, hidden-state KD, iterative prune-and-heal."""
    rows = []
    heal = int(RECIPE_TOKENS * HEAL_FRACTION)
    for pct, ratio in RATIOS.items():
        rows += [Recipe(f"{criterion}-kd-{pct}", f"{criterion} + CPT + KD (w = 1), {pct}%", 2,
                        depth(criterion, ratio, KD)),
                 Recipe(f"{criterion}-kdh-{pct}", f"{criterion} + CPT + KD + hidden-state KD, {pct}%", 2,
                        depth(criterion, ratio, KD_HIDDEN)),
                 Recipe(f"{criterion}-iter-{pct}", f"{criterion} iterative prune-and-heal + CPT, {pct}%", 2,
                        {**depth(criterion, ratio, CPT), "prune.depth.mode": "iterative",  # one block a round
                         "prune.depth.heal_tokens": heal, "retrain.tokens": RECIPE_TOKENS - heal})]
    return rows


def phase3(criterion: str, retraining: str, half_params: int) -> list[Recipe]:
    """Half the non-embedding parameters: depth, width and sheared, each with the best retraining."""
    label, settings = RETRAININGS[retraining]
    target = {"prune.target.params": half_params}
    return [
        Recipe(f"half-depth-{criterion}-{retraining}", f"half size: depth ({criterion}) + {label}", 3,
               depth(criterion, 0.5, settings)),
        Recipe(f"half-width-{retraining}", f"half size: width (activation) + {label}", 3,
               {"prune.method": "width", **target, "retrain.tokens": RECIPE_TOKENS, **settings}),
        Recipe(f"half-sheared-{retraining}", f"half size: sheared + {label}", 3,
               {"prune.method": "sheared", **target, "retrain.tokens": RECIPE_TOKENS, **settings}),
    ]


def seed_twins(recipe: Recipe) -> list[Recipe]:
    """`recipe` again with each of EXTRA_SEEDS: `<row>-seed1`, ... (same params, another `run.seed`)."""
    return [Recipe(f"{recipe.row}-seed{s}", f"{recipe.title}, seed {s}", 4, {**recipe.overrides, "run.seed": s})
            for s in EXTRA_SEEDS]


def phase4(rows: list[Recipe]) -> list[Recipe]:
    """The seed twins of the strongest seed recipe at 20% and 35% (they wait for no winner) and of `rows`."""
    seed_rows = [r for r in phase1() if r.row in {f"{SEED_RECIPE}-{pct}" for pct in RATIOS}]
    twinned = list({r.row: r for r in seed_rows + rows}.values())
    return [t for r in twinned for t in seed_twins(r)]


# ----------------------------------------------------------------------------- results


def log_ratio(row: EvalMetrics, base: EvalMetrics, seq_len: str) -> float | None:
    """Mean over the domains of log(PPL_row / PPL_base) at `seq_len`: the mean of per-domain loss differences."""
    a, b = row.loss.get(seq_len, {}), base.loss.get(seq_len, {})
    domains = [d for d in b if d != "mean" and d in a]
    if not domains:
        return None
    return sum(a[d] - b[d] for d in domains) / len(domains)


def results(exp_json: list) -> dict[str, RowResult]:
    """{experiment name: RowResult} of every `rcp-` experiment; the newest wins when a name repeats.

    Read from `dvc exp show --all-commits`: rows keep counting after later commits (an experiment
    is listed under the commit it started from)."""
    found: dict[str, tuple[str, RowResult]] = {}
    for entry in exp_json:
        for exp in entry.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state") or "success"
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or ""
                if not name.startswith(EXP_PREFIX):
                    continue
                data = rev.get("data") or {}
                params = {}
                for path, p in (data.get("params") or {}).items():
                    if path == "params.yaml":
                        params = flatten(p.get("data") or {})
                metrics = {path: m["data"] for path, m in (data.get("metrics") or {}).items() if "data" in m}
                if rev.get("error"):
                    state = "failed"
                stamp = data.get("timestamp") or ""
                if name not in found or stamp >= found[name][0]:
                    found[name] = (stamp, RowResult(state, params, metrics, rev.get("rev") or ""))
    return {name: result for name, (_, result) in found.items()}


def row_numbers(result: RowResult) -> dict | None:
    """The table's numbers of one finished row, or None when its metrics are missing."""
    if result.state != "success" or RETRAINED_EVAL not in result.metrics or BASE_EVAL not in result.metrics:
        return None
    row = EvalMetrics.from_dict(result.metrics[RETRAINED_EVAL], RETRAINED_EVAL)
    base = EvalMetrics.from_dict(result.metrics[BASE_EVAL], BASE_EVAL)
    wall = row.info.get("wall_s") or 0.0
    for path in TRAIN_METRICS:
        wall += (result.metrics.get(path) or {}).get("train_s") or 0.0
    p = result.params
    return {
        "log_ratio": {length: log_ratio(row, base, length) for length in row.loss},
        "tasks": {name: (t.get("acc"), t.get("acc_stderr")) for name, t in row.tasks.items()},
        "non_embedding": row.params.non_embedding,
        "base_non_embedding": base.params.non_embedding,
        "tokens": (p.get("retrain.tokens") or 0) + (p.get("prune.depth.heal_tokens") or 0
                                                    if p.get("prune.depth.mode") == "iterative" else 0),
        "pruning_tokens": p.get("prune.sheared.tokens") if p.get("prune.method") == "sheared" else 0,
        "seed": p.get("run.seed"),
        "wall_s": wall,
    }


def load_record(root: Path) -> dict[str, dict]:
    """{exp name: numbers} of the rows RECORD holds ({} when there is none yet)."""
    path = root / RECORD
    if not path.exists():
        return {}
    record = read_json(path)
    if not isinstance(record, dict) or not all(isinstance(n, dict) and all(k in n for k in RECORD_KEYS)
                                               for n in record.values()):
        raise ShearError(f"{RECORD}: expected {{experiment name: {{{', '.join(RECORD_KEYS)}}}}}; restore the "
                         f"committed one with `git checkout {RECORD}`")
    return record


def mean_log_ratio(numbers: dict | None, seq_len: str = "128") -> float | None:
    """The row's log-ratio at `seq_len` (None when not finished)."""
    return None if numbers is None else numbers["log_ratio"].get(seq_len)


# ----------------------------------------------------------------------------- the plan


def best_so_far(rows: list[Recipe], done: dict[str, dict | None]) -> Recipe | None:
    """The finished row of `rows` with the lowest log-ratio at 128 tokens (None when none has finished)."""
    scores = [(s, r) for r in rows if (s := mean_log_ratio(done.get(r.exp_name))) is not None]
    return min(scores, key=lambda sr: sr[0])[1] if scores else None


def lowest_summed(names: dict[str, str], done: dict[str, dict | None]) -> str | None:
    """The key of `names` ({key: row prefix}) whose rows have the lowest log-ratio summed over 20%
    and 35%, once every one of them has finished (else None)."""
    totals = {}
    for key, prefix in names.items():
        values = [mean_log_ratio(done.get(f"{EXP_PREFIX}{prefix}-{pct}")) for pct in RATIOS]
        if any(v is None for v in values):
            return None
        totals[key] = sum(values)
    return min(totals, key=totals.get)


def best_criterion(done: dict[str, dict | None]) -> str | None:
    """The CPT criterion of phase 1 with the lowest log-ratio summed over 20% and 35%."""
    return lowest_summed({c: f"{c}-cpt" for c in PHASE1_CRITERIA}, done)


def best_retraining(criterion: str, done: dict[str, dict | None]) -> str | None:
    """The key of RETRAININGS whose `criterion` rows have the lowest log-ratio summed over 20% and 35%."""
    return lowest_summed({key: f"{criterion}-{key}" for key in RETRAININGS}, done)


def plan(done: dict[str, dict | None], half_params: int | None, criterion: str | None = None,
         retraining: str | None = None) -> list[Recipe]:
    """Every row whose settings are known given the finished rows `done` ({exp name: numbers or None}).

    `criterion` and `retraining` start phases 2 and 3 with the named block criterion and retraining
    before the earlier phases have named their best (a user's choice when time is short; the table
    then shows which rows ran). Seed twins: of the seed recipe always, of the best finished row of
    phases 1-2 at each cut, of phase 3's width and sheared rows (the half-size target compares them),
    and of every row whose twin has finished (a later best keeps them)."""
    rows = phase1()
    criterion = criterion or best_criterion(done)
    if criterion is not None:
        rows += phase2(criterion)
        retraining = retraining or best_retraining(criterion, done)
        if retraining is not None and half_params is not None:
            rows += phase3(criterion, retraining, half_params)
    firsts = [r for r in rows if r.phase in (1, 2)]
    best = [b for pct in RATIOS if (b := best_so_far([r for r in firsts if r.row.endswith(f"-{pct}")], done))]
    twinned = [r for r in firsts if any(done.get(t.exp_name) for t in seed_twins(r))]
    # the half-size target compares sheared with width pruning: both get their seeds too
    halves = [r for r in rows if r.phase == 3 and not r.row.startswith("half-depth")]
    rows += phase4(best + twinned + halves)
    planned = {r.row for r in rows}
    # rows an earlier --criterion or --retraining ran stay in the table, beside their phase
    rows += [r for r in every_row(half_params or 0) if r.row not in planned and done.get(r.exp_name)]
    return sorted(rows, key=lambda r: r.phase)


def every_row(half_params: int) -> list[Recipe]:
    """Every row any phase can plan, whatever earlier phases find, each once."""
    rows = phase1()
    for c in PHASE1_CRITERIA:
        rows += phase2(c) + [r for key in RETRAININGS for r in phase3(c, key, half_params)]
    rows += phase4(list(rows))
    return list({r.row: r for r in rows}.values())


def training_metrics(root: Path, rev: str) -> dict[str, dict]:
    """The DVCLive summaries (TRAIN_METRICS) committed with experiment `rev`, read from git: they are
    not DVC metrics (a depth-pruning run has no prune summary), so `dvc exp show` does not list them."""
    out = {}
    for path in TRAIN_METRICS:
        done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
        if done.returncode == 0:
            try:
                out[path] = json.loads(done.stdout)
            except json.JSONDecodeError:
                continue
    return out


def collect(root: Path, attempts: int = 3, wait_s: float = 30.0) -> tuple[dict[str, RowResult], dict[str, dict],
                                                                         int | None]:
    """(all rcp- results, {exp name: numbers of finished rows}, half the base's non-embedding parameters).

    Finished rows are RECORD's and the finished experiments' (an experiment wins over the record).

    `dvc exp show` fails now and then while a queue worker sets up an experiment's temporary
    workspace ("directory .dvc/tmp/exps/tmp.../.dvc does not exist"): tried `attempts` times."""
    for attempt in range(attempts):
        try:
            shown = exp_show(root, all_commits=True)
            break
        except ShearError:
            if attempt == attempts - 1:
                raise
            time.sleep(wait_s)
    found = results(shown)
    for r in found.values():
        if r.state == "success":
            r.metrics |= training_metrics(root, r.rev)
    done = load_record(root) | {name: n for name, r in found.items() if r.state == "success" and (n := row_numbers(r))}
    base = next((n["base_non_embedding"] for n in done.values() if n), None)
    return found, done, None if base is None else base // 2


# ----------------------------------------------------------------------------- the table


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def row_state(recipe: Recipe, found: dict[str, RowResult], done: dict[str, dict | None]) -> str:
    """The row's experiment state, or "success" for a row only the record holds, or "not run"."""
    if recipe.exp_name in found:
        return found[recipe.exp_name].state
    return "success" if done.get(recipe.exp_name) else "not run"


def render(rows: list[Recipe], done: dict[str, dict | None], found: dict[str, RowResult]) -> str:
    """The markdown of reports/recipes.md."""
    lengths = sorted({length for n in done.values() if n for length in n["log_ratio"]}, key=int) or ["128", "1024"]
    tasks = sorted({t for n in done.values() if n for t in n["tasks"]})
    header = (["row", "recipe"] + [f"log(PPL/base) @{length}" for length in lengths]
              + [f"{t} acc" for t in tasks] + ["non-emb. params", "retrain tokens", "seed", "run time", "state"])
    body = []
    for r in rows:
        n = done.get(r.exp_name)
        state = row_state(r, found, done)
        if n is None:
            body.append([r.row, r.title] + ["—"] * (len(header) - 3) + [state])
            continue
        accs = [f"{acc:.2f} ± {err:.2f}" if acc is not None and err is not None else "—"
                for acc, err in (n["tasks"].get(t, (None, None)) for t in tasks)]
        tokens = f"{n['tokens']:,}" + (f" (+{n['pruning_tokens']:,} pruning)" if n["pruning_tokens"] else "")
        body.append([r.row, r.title] + [_fmt(n["log_ratio"].get(length)) for length in lengths] + accs
                    + [f"{n['non_embedding'] / 1e6:.1f}M", tokens, str(n["seed"]), f"{n['wall_s'] / 60:.0f} min", state])
    lines = ["# Recipes: quality kept per retraining token (default model)", "",
             f"Every row retrains on {RECIPE_TOKENS:,} tokens (iterative rows: healing tokens included); "
             "log(PPL/base) is the mean over the domains of the log of the perplexity ratio to the unpruned "
             "model (0 = no loss; lower is better); task accuracies with their standard errors over the "
             "documents. Run time = evaluation + training wall time, one thread per experiment, two at "
             "once on 2 cores (iterative rows: without the prune stage's re-scoring and healing rounds, which "
             "the pruned model's shear.json times under `removal_steps`). Built by `python -m shear.recipes "
             f"table` from `dvc exp show --json` and {RECORD} (the finished rows of earlier clones).", "",
             markdown_table(header, body)]
    lines += verdict(done)
    return "\n".join(lines) + "\n"


def family(exp_name: str) -> str:
    """The row an experiment measures, whatever its seed: `rcp-bi-cpt-20-seed1` -> `bi-cpt-20`."""
    row = exp_name.removeprefix(EXP_PREFIX)
    stem, _, seed = row.rpartition("-seed")
    return stem if stem and seed.isdigit() else row


def seed_values(done: dict[str, dict | None], seq_len: str) -> dict[str, list[float]]:
    """{row: its log-ratios at `seq_len`, one per finished seed}."""
    values: dict[str, list[float]] = {}
    for name, numbers in sorted(done.items()):
        value = mean_log_ratio(numbers, seq_len)
        if value is not None:
            values.setdefault(family(name), []).append(value)
    return values


def _over_seeds(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f} (1 seed)"
    return f"{mean:.3f} ({len(values)} seeds, {min(values):.3f}-{max(values):.3f})"


def compare_seeds(mine: list[float], reference: list[float], minimum_gain: float) -> tuple[float, str]:
    """(gain of `mine`'s seed mean over `reference`'s, the verdict): "met" needs the gain, at least 2
    seeds each and every seed of `mine` below every seed of `reference`."""
    reference_mean = statistics.fmean(reference)
    gain = 1 - statistics.fmean(mine) / reference_mean if reference_mean > 0 else float("nan")
    if not (gain > 0 and gain >= minimum_gain):  # nan fails both
        return gain, "not met"
    if min(len(mine), len(reference)) < 2:
        return gain, "not shown: one seed"
    if max(mine) >= min(reference):
        return gain, "not shown: inside the seeds' range"
    return gain, "met"


def verdict(done: dict[str, dict | None]) -> list[str]:
    """The target's check on the seeds' means: the best row vs ppl+ + CPT at 20% and 35%; sheared vs
    width at half size (after the same retraining); and every row's spread over its seeds."""
    out = ["", "## Target", "",
           "A row's value is the mean over its finished seeds (with their range); the best row is the lowest "
           "mean among rows with at least 2 seeds (among all rows while none has). The target counts as met "
           "when the best row's mean is at least 10% below the seed recipe's (at half size: sheared's below "
           "width's), with at least 2 seeds each and every seed of the one below every seed of the other; a "
           "gain inside the seeds' range is reported as not shown.", ""]
    by_length = {seq_len: seed_values(done, seq_len) for seq_len in ("128", "1024")}
    for pct in RATIOS:
        for seq_len, values in by_length.items():
            seed = values.get(f"{SEED_RECIPE}-{pct}")
            mine = {row: v for row, v in values.items() if row.endswith(f"-{pct}") and not row.startswith("half")}
            if not seed or not mine:
                out.append(f"- {pct}% @{seq_len}: not measured yet")
                continue
            pool = {row: v for row, v in mine.items() if len(v) > 1} or mine  # one lucky seed does not win
            name = min(pool, key=lambda row: statistics.fmean(pool[row]))
            gain, state = compare_seeds(mine[name], seed, 0.10)
            out.append(f"- {pct}% @{seq_len}: best {name} {_over_seeds(mine[name])} vs {SEED_RECIPE}-{pct} "
                       f"{_over_seeds(seed)}: {gain:+.1%} ({state}; target >= 10%)")
    before = len(out)
    retrainings = sorted(row.removeprefix("half-sheared-") for row in by_length["128"] if row.startswith("half-sheared-"))
    for retraining in retrainings:
        for seq_len, values in by_length.items():
            sheared, width = values.get(f"half-sheared-{retraining}"), values.get(f"half-width-{retraining}")
            if sheared and width:
                gain, state = compare_seeds(sheared, width, 0.0)
                out.append(f"- half size + {retraining} @{seq_len}: sheared {_over_seeds(sheared)} vs width "
                           f"{_over_seeds(width)}: {gain:+.1%} ({state}; target: sheared below width)")
    if len(out) == before:
        out.append("- half size: not measured yet")
    for seq_len, values in by_length.items():
        for row, v in values.items():
            if len(v) > 1:
                out.append(f"- seeds of {row} @{seq_len}: {', '.join(f'{x:.3f}' for x in v)}: "
                           f"range {max(v) - min(v):.3f}")
    return out


# ----------------------------------------------------------------------------- commands


def queue(root: Path, rows: list[Recipe], found: dict[str, RowResult], done: dict[str, dict]) -> list[Recipe]:
    """Queue the rows that have neither an experiment nor a recorded result (failed ones are left for
    the user to look at)."""
    queued = []
    for r in rows:
        if r.exp_name in found or r.exp_name in done:
            continue
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", r.exp_name, *r.set_args(), TARGET]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ShearError(f"queueing {r.exp_name} failed: {last}")
        queued.append(r)
    return queued


def queue_busy(root: Path) -> bool:
    """Whether DVC's experiment queue still has queued or running tasks (`dvc queue status`: cheap,
    unlike `dvc exp show --all-commits`)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "queue", "status"], cwd=root, capture_output=True, text=True)
    return any(line.split()[-1:] in (["Queued"], ["Running"]) for line in done.stdout.splitlines())


def select(rows: list[Recipe], only: list[str] | None) -> list[Recipe]:
    """The rows of `rows` named in `only`, in `only`'s order (all of `rows` when `only` is None): rows
    a later phase has not unlocked yet are left for the next round."""
    if only is None:
        return rows
    by_id = {r.row: r for r in rows}
    return [by_id[row] for row in only if row in by_id]


def run(root: Path, jobs: int, poll_s: float, criterion: str | None = None, retraining: str | None = None,
        only: list[str] | None = None) -> None:
    """Queue what is ready (only the rows `only`, in that order, when given), run it `jobs` at a time
    with one thread each, and repeat until nothing is left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while True:
        found, done, half = collect(root)
        ready = plan(done, half, criterion, retraining)
        new = queue(root, select(ready, only), found, done)
        pending = [n for n, r in found.items() if r.state in ("queued", "running")] + [r.exp_name for r in new]
        if not pending:
            break
        print(f"recipes: {len(new)} queued now, {len(pending)} pending; running {jobs} at a time", flush=True)
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)], cwd=root, env=env, check=False)
        while queue_busy(root):
            time.sleep(poll_s)
    table(root, Path("reports/recipes.md"), criterion, retraining)


def table(root: Path, out: Path, criterion: str | None = None, retraining: str | None = None) -> str:
    """Write the recipes table to `out` (relative to `root`) and every finished row's numbers to
    RECORD; return the table."""
    found, done, half = collect(root)
    text = render(plan(done, half, criterion, retraining), done, found)
    write_json(root / RECORD, dict(sorted(done.items())))
    with atomic_file(root / out) as f:
        f.write(text)
    return text


def preset_text(recipe: Recipe, measured: list[dict]) -> str:
    """A preset file: the row's params (minus PRESET_LEAVES_OUT) as dotted keys, with what it measured
    (`measured`: the numbers of the row's finished seeds)."""
    lines = [f"# Recipe preset from row {family(recipe.exp_name)}: {recipe.title} (reports/recipes.md)."]
    if measured:
        lengths = {k: [v for n in measured if (v := n["log_ratio"].get(k)) is not None] for k in measured[0]["log_ratio"]}
        values = "; ".join(f"@{k} {_over_seeds(v)}" for k, v in lengths.items() if v)
        seeds = ", ".join(str(n["seed"]) for n in measured)
        lines.append(f"# Measured on the default model (seeds {seeds}, {measured[0]['tokens']:,} retraining tokens): "
                     f"mean log(PPL/base) {values}.")
    lines += ["# Apply: python -m shear.recipes apply <this file> [-S prune.depth.ratio=0.35] [--queue]",
              "# (= dvc exp run -S key=value for each key below). Written by `python -m shear.recipes preset`."]
    body = {k: v for k, v in recipe.overrides.items() if k not in PRESET_LEAVES_OUT}
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False)


def preset_args(root: Path, path: Path) -> list[str]:
    """The `-S key=value` arguments of a preset file, every key checked against params.yaml first."""
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ShearError(f"preset {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    if not isinstance(body, dict) or not body:
        raise ShearError(f"preset {path}: expected a mapping of dotted params keys to values, e.g. 'retrain.distill: 1.0'")
    known = flatten(yaml.safe_load((root / "params.yaml").read_text()) or {})
    unknown = [k for k in body if k not in known]
    if unknown:
        raise ShearError(f"preset {path}: {', '.join(map(str, unknown))} not in params.yaml")
    return Recipe("preset", str(path), 0, body).set_args()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["plan", "run", "table", "preset", "apply"])
    parser.add_argument("what", nargs="?", help="preset: the row id; apply: the preset file")
    parser.add_argument("--name", default="best", help="preset: the file's name under configs/recipes (default best)")
    parser.add_argument("--jobs", type=int, default=2, help="experiments at a time (default 2, one thread each)")
    parser.add_argument("--poll", type=float, default=60.0, help="seconds between queue checks (default 60)")
    parser.add_argument("--criterion", choices=PHASE1_CRITERIA,
                        help="run: start phase 2 with this block criterion instead of waiting for phase 1's best")
    parser.add_argument("--retraining", choices=list(RETRAININGS),
                        help="run: start phase 3 with this retraining instead of waiting for phase 2's best")
    parser.add_argument("--only", nargs="+", metavar="ROW",
                        help="run: queue only these rows, in this order (ids as `plan` prints them, without 'rcp-')")
    parser.add_argument("--out", type=Path, default=Path("reports/recipes.md"), help="the table (default: %(default)s)")
    args, dvc_args = parser.parse_known_args(argv)
    if dvc_args and args.command != "apply":
        parser.error(f"unrecognized arguments: {' '.join(dvc_args)}")
    if args.command in ("preset", "apply") and not args.what:
        parser.error(f"{args.command} needs {'a row id' if args.command == 'preset' else 'a preset file'}")
    named = {"--only": args.only or [], "preset": [args.what] if args.command == "preset" else []}
    known = {r.row for r in every_row(0)}
    for option, rows in named.items():
        unknown = sorted(set(rows) - known)
        if unknown:
            parser.error(f"{option}: no row {', '.join(unknown)}; `python -m shear.recipes plan` lists the rows")
    try:
        root = find_dvc_root(Path.cwd())
        if args.command == "plan":
            found, done, half = collect(root)
            for r in plan(done, half, args.criterion, args.retraining):
                print(f"{r.exp_name:28s} phase {r.phase}  {row_state(r, found, done):8s}  {' '.join(r.set_args())}")
        elif args.command == "preset":
            found, done, half = collect(root)
            recipe = next((r for r in plan(done, half, args.criterion, args.retraining) if r.row == args.what), None)
            if recipe is None:
                raise ShearError(f"preset: row {args.what} is not planned yet (its phase waits for earlier rows)")
            out = PRESET_DIR / f"{args.name}.yaml"
            (root / PRESET_DIR).mkdir(parents=True, exist_ok=True)
            with atomic_file(root / out) as f:
                seeds = sorted((n for name, n in done.items() if n and family(name) == family(recipe.exp_name)),
                               key=lambda n: n["seed"])
                f.write(preset_text(recipe, seeds))
            print(f"wrote {out}")
        elif args.command == "apply":
            cmd = [sys.executable, "-m", "dvc", "exp", "run", *preset_args(root, Path(args.what).resolve()), *dvc_args]
            sys.exit(subprocess.run(cmd, cwd=root).returncode)
        elif args.command == "run":
            run(root, args.jobs, args.poll, args.criterion, args.retraining, args.only)
        else:
            print(table(root, args.out, args.criterion, args.retraining), end="")
    except ShearError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
