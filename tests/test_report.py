"""The report builds from hand-written metrics files: table rows, PNG figures, CSV plot data."""
import argparse
import csv
import json

import pytest

from shear.records import ModelRecord, SpeedRecord
from shear.report import batch_speed, export_lines, quality_rows, table_rows, with_speed, write_report


def metrics_of(name: str, scale: float, params: int) -> dict:
    """A metrics.json in the evaluate stage's schema: two domains, lengths 16 and 64, one task, two batch sizes."""
    m = {
        "params": {"total": params + 1000, "non_embedding": params},
        "ppl": {"16": {"code": 4.0 * scale, "prose": 9.0 * scale, "mean": 6.0 * scale},
                "64": {"code": 3.0 * scale, "prose": 7.0 * scale, "mean": 4.5 * scale}},
        "loss": {},
        "ppl_protocol": {"bos": 0, "seq_len": {"16": 16, "64": 64}},
        "tasks": {"shear_lastword": {"acc": 0.5 / scale, "acc_stderr": 0.05, "n": 100}},
        "speed": {"path": "eager", "dtype": "float32", "prompt_len": 8, "new_tokens": 4, "repeats": 1,
                  "batch": {"bs1": {"prefill_ms": 2.0 * params / 4000, "decode_ms_per_token": params / 4000,
                                    "tokens_per_s": 4000 * 1e3 / params},
                            "bs8": {"prefill_ms": 9.0 * params / 4000, "decode_ms_per_token": 2 * params / 4000,
                                    "tokens_per_s": 8 * 4000 * 1e3 / (2 * params)}}},
        "info": {"model": name, "device": "cpu", "wall_s": 1.5},
    }
    if name != "base":
        m["speedup"] = {"ideal": 4000 / params,
                        "bs1": {"decode": 4000 / params, "prefill": 4000 / params, "decode_vs_ideal": 1.0},
                        "bs8": {"decode": 4000 / params, "prefill": 4000 / params, "decode_vs_ideal": 1.0}}
        m["retention"] = {"ppl_16": 1 / scale, "ppl_64": 1 / scale, "acc_mean": 1 / scale}
    return m


# With the speed sections of the one speed run merged in (as write_report does).
METRICS = {"base": metrics_of("base", 1.0, 4000), "pruned": metrics_of("pruned", 2.0, 3000),
           "retrained": metrics_of("retrained", 1.25, 3000)}
# The same split as the stages write them: quality per model, speed of all models in one record.
EVAL_ONLY = {n: {k: v for k, v in m.items() if k not in ("speed", "speedup")} for n, m in METRICS.items()}
SPEED = SpeedRecord(reference="base", models={n: m["speed"] for n, m in METRICS.items()},
                    speedup={n: m["speedup"] for n, m in METRICS.items() if "speedup" in m},
                    info={"device": "cpu", "cpu": "test cpu", "load_average": 0.5})
RECORD_DICTS = {"base": {"method": "base", "architecture": {"num_hidden_layers": 4, "hidden_size": 64,
                                                            "num_attention_heads": 4, "num_key_value_heads": 2,
                                                            "intermediate_size": 128, "head_dim": 16}},
                "pruned": {"method": "depth", "criterion": "ppl"}}
RECORDS = {n: ModelRecord.from_dict(r, n) for n, r in RECORD_DICTS.items()}


def row(rows, label):
    return next(r for r in rows if r[0] == label)


def test_table_rows():
    rows = table_rows(METRICS, RECORDS)
    assert row(rows, "made by") == ["made by", "base", "depth (ppl)", "—"]
    assert row(rows, "shape")[1] == "4 L · d 64 · 4/2 heads · MLP 128"
    assert row(rows, "parameters, non-embedding") == ["parameters, non-embedding", "4,000 (100.0%)",
                                                      "3,000 (75.0%)", "3,000 (75.0%)"]
    assert row(rows, "ppl@16 prose") == ["ppl@16 prose", "9.00", "18.00", "11.25"]
    assert row(rows, "ppl@64 mean") == ["ppl@64 mean", "4.50", "9.00", "5.62"]
    assert row(rows, "shear_lastword acc") == ["shear_lastword acc", "0.500 ± 0.050", "0.250 ± 0.050",
                                               "0.400 ± 0.050"]
    assert row(rows, "decode ms/token, batch 8") == ["decode ms/token, batch 8", "2.00", "1.50", "1.50"]
    assert row(rows, "decode tokens/s, batch 1") == ["decode tokens/s, batch 1", "1000.0", "1333.3", "1333.3"]
    assert row(rows, "decode speed-up, batch 1") == ["decode speed-up, batch 1", "—", "1.33×", "1.33×"]
    assert row(rows, "retention, ppl@16 (base/this)")[1:] == ["—", "0.500", "0.800"]
    # domains and lengths come from the files: nothing invented
    assert [r[0] for r in rows if r[0].startswith("ppl@")] == [
        "ppl@16 code", "ppl@16 prose", "ppl@16 mean", "ppl@64 code", "ppl@64 prose", "ppl@64 mean"]


def test_missing_values_are_dashes():
    partial = {"base": METRICS["base"], "pruned": {"params": {"total": 10, "non_embedding": 5},
                                                   "ppl": {"16": {"code": 5.0, "mean": 5.0}}}}
    rows = table_rows(partial)
    assert row(rows, "ppl@16 prose") == ["ppl@16 prose", "9.00", "—"]
    assert row(rows, "decode ms/token, batch 1")[2] == "—"
    assert batch_speed(partial["pruned"]) == {}


def test_quality_rows_use_shortest_length_and_smallest_batch():
    rows = quality_rows(METRICS)
    assert [r["model"] for r in rows] == ["base", "pruned", "retrained"]
    assert rows[1]["ppl"] == 12.0 and rows[1]["ppl_seq_len"] == 16
    assert rows[1]["batch"] == 1 and rows[1]["tokens_per_s"] == pytest.approx(4000 * 1e3 / 3000)
    assert rows[2]["acc_mean"] == pytest.approx(0.4)


def test_speed_comes_from_the_one_speed_run():
    # a metrics file with a speed of its own (another run, another load) must not reach the report
    stale = {n: dict(m, speed={"batch": {"bs1": {"tokens_per_s": 1.0, "decode_ms_per_token": 1000.0}}},
                     speedup={"bs1": {"decode": 5.9}}) for n, m in EVAL_ONLY.items()}
    merged = with_speed(stale, SPEED)
    assert merged == METRICS
    assert with_speed(stale, None) == EVAL_ONLY


def test_write_report(tmp_path):
    text = write_report(EVAL_ONLY, tmp_path / "report.md", tmp_path / "figures", RECORDS, SPEED)
    assert (tmp_path / "report.md").read_text() == text
    assert "|  | base | pruned | retrained |" in text
    assert "| ppl@16 prose | 9.00 | 18.00 | 11.25 |" in text
    assert "| shear_lastword acc | 0.500 ± 0.050 | 0.250 ± 0.050 | 0.400 ± 0.050 |" in text
    assert "![per-domain perplexity](figures/perplexity.png)" in text
    for png in ("perplexity.png", "speed.png", "quality.png"):
        data = (tmp_path / "figures" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    with open(tmp_path / "figures/perplexity/pruned.csv") as f:
        ppl = list(csv.DictReader(f))
    assert {(r["label"], float(r["ppl"])) for r in ppl} >= {("prose @16", 18.0), ("mean @64", 9.0)}
    with open(tmp_path / "figures/speed.csv") as f:
        speed = list(csv.DictReader(f))
    assert [r["label"] for r in speed] == [f"{m} · batch {b}" for m in METRICS for b in (1, 8)]
    with open(tmp_path / "figures/quality.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["base", "pruned", "retrained"]
    assert "| decode speed-up, batch 1 | — | 1.33× | 1.33× |" in text
    assert "- **speed**: base, pruned, retrained timed in one run (cpu, test cpu, load 0.50)" in text


def test_stage(tmp_path, monkeypatch, capsys):
    import stages.report as stage

    monkeypatch.chdir(tmp_path)
    for name, m in EVAL_ONLY.items():
        (tmp_path / "reports/eval" / name).mkdir(parents=True)
        (tmp_path / "reports/eval" / name / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "reports/speed.json").write_text(json.dumps(SPEED.to_dict()))
    (tmp_path / "data/models/pruned").mkdir(parents=True)
    (tmp_path / "data/models/pruned/shear.json").write_text(json.dumps(RECORD_DICTS["pruned"]))
    stage.main(None, argparse.Namespace())
    assert "| made by | — | depth (ppl) | — |" in (tmp_path / "reports/report.md").read_text()
    assert (tmp_path / "reports/figures/quality.png").is_file()
    out = capsys.readouterr().out
    assert "| ppl@64 mean | 4.50 | 9.00 | 5.62 |" in out
    assert "| decode tokens/s, batch 1 | 1000.0 | 1333.3 | 1333.3 |" in out


def test_stage_refuses_a_bad_speed_file(tmp_path, monkeypatch):
    import stages.report as stage
    from shear.errors import ShearError

    monkeypatch.chdir(tmp_path)
    for name, m in EVAL_ONLY.items():
        (tmp_path / "reports/eval" / name).mkdir(parents=True)
        (tmp_path / "reports/eval" / name / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "reports/speed.json").write_text(json.dumps({"reference": "base", "models": {"base": {}}}))
    with pytest.raises(ShearError, match=r"reports/speed.json models.base: no 'batch'"):
        stage.main(None, argparse.Namespace())
    assert not (tmp_path / "reports/report.md").exists()


def test_export_section_lists_every_file_with_its_llama_cpp_figures():
    row = {"file_bytes": 3 * 2**20, "reread_logits_rel_error": 4e-4, "ppl_llama_cpp": 20.5, "ppl_pipeline": 20.4,
           "decode_tokens_per_s": 50.0, "prompt_tokens_per_s": 300.0}
    export = {"base": {"non_embedding_params": 10, "ideal_speedup": 1.0, "f16": row},
              "retrained": {"non_embedding_params": 8, "ideal_speedup": 1.25,
                            "f16": {**row, "decode_speedup": 1.2, "decode_speedup_of_ideal": 0.96}},
              "info": {"llama_cpp": "0.3.36", "threads": 1, "ppl_seq_len": 128}}
    text = "\n".join(export_lines(export))
    assert "| base f16 | 3.0 | 4.0e-04 | 20.50 / 20.40 | 50.0 | 300.0 | — |" in text
    assert "| retrained f16 |" in text and "1.20× (0.96 of ideal)" in text
    assert export_lines(None) == []
