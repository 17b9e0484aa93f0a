"""shear.records: every stage contract reads back what its writer wrote, and a bad file is one clear line."""
import json

import pytest

from shear.errors import ShearError
from shear.models import architecture, count_parameters, make_tiny_model, save_model
from shear.prune.shapes import source_shape
from shear.config import HELDOUT_SEQ_LEN
from shear.records import (EvalMetrics, ModelRecord, ModelShape, ParameterCounts, SpeedRecord,
                           WidthScoreSummary, flatten, non_numeric_keys)


def test_model_shape_reads_a_config_shape():
    model, _ = make_tiny_model("layers=3,hidden=64,heads=4,kv_heads=2,mlp=96", seed=0)
    shape = ModelShape.from_dict(source_shape(model.config), "shape")
    assert shape == ModelShape(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=96, head_dim=16)
    assert shape.describe() == "3 L · d 64 · 4/2 heads · MLP 96"
    with pytest.raises(ShearError, match=r"^x.json: no 'head_dim'; re-run"):
        ModelShape.from_dict({k: v for k, v in source_shape(model.config).items() if k != "head_dim"}, "x.json")
    with pytest.raises(ShearError, match="num_hidden_layers=True is not a int"):
        ModelShape.from_dict({**source_shape(model.config), "num_hidden_layers": True}, "x.json")


def test_save_model_writes_a_model_record(tmp_path):
    model, tok = make_tiny_model("layers=2,hidden=32,heads=2,kv_heads=1,mlp=64", seed=0)
    info = save_model(model, tok, tmp_path / "m", {"method": "depth", "criterion": "ppl", "removed_blocks": [1]})
    written = json.loads((tmp_path / "m/shear.json").read_text())
    assert written == info
    record = ModelRecord.from_dict(written, "shear.json")
    assert record.to_dict() == written  # reads back what was written
    assert record.method == "depth" and record.criterion == "ppl" and record.details["removed_blocks"] == [1]
    assert record.architecture == architecture(model.config)
    assert record.parameters == ParameterCounts(**count_parameters(model))
    assert record.shape == ModelShape.from_dict(source_shape(model.config), "config")
    # an older shear.json without architecture or counts still reads (the report shows dashes)
    assert ModelRecord.from_dict({"method": "base"}, "old").shape is None
    with pytest.raises(ShearError, match="old: not a shear.json record"):
        ModelRecord.from_dict([1, 2], "old")


def test_eval_metrics_roundtrip_and_mixture_reference():
    data = {"params": {"total": 10, "non_embedding": 4},
            "ppl": {"128": {"a": 3.0, "mean": 3.0}}, "loss": {"128": {"a": 1.1, "b": 0.9, "mean": 1.0}},
            "ppl_protocol": {"bos": 0, "seq_len": {"128": 128}}, "tasks": {},
            "info": {"model": "base", "dtype": "float32"}}
    m = EvalMetrics.from_dict(data, "metrics.json")
    assert m.to_dict() == data and m.params.non_embedding == 4
    assert m.domain_losses(HELDOUT_SEQ_LEN, "metrics.json") == {"a": 1.1, "b": 0.9}
    with pytest.raises(ShearError, match="metrics.json: no loss at 64 tokens; evaluate.ppl_seq_lens must contain 64"):
        m.domain_losses(64, "metrics.json")
    with pytest.raises(ShearError, match="metrics.json: no 'ppl_protocol'"):
        EvalMetrics.from_dict({k: v for k, v in data.items() if k != "ppl_protocol"}, "metrics.json")
    assert non_numeric_keys(data) == []


def test_speed_record():
    row = {"decode_ms_per_token": 2.0, "tokens_per_s": 500.0}
    data = {"reference": "base",
            "models": {"base": {"path": "eager", "batch": {"bs8": row, "bs1": row}},
                       "pruned": {"path": "eager", "batch": {"bs1": row}}},
            "speedup": {"pruned": {"ideal": 1.25, "bs1": {"decode": 1.2}}}, "info": {"cpu": "x", "load_average": 0.3}}
    s = SpeedRecord.from_dict(data, "speed.json")
    assert s.to_dict() == data
    assert list(s.batches("base")) == [1, 8] and s.batches("retrained") == {}
    assert s.decode_speedup("pruned", 1) == 1.2 and s.decode_speedup("base", 8) == 1.0
    assert s.decode_speedup("pruned", 8) is None and s.decode_speedup("base", 4) is None
    assert non_numeric_keys(data, strings_allowed=("reference", "models", "info")) == []
    with pytest.raises(ShearError, match="speed.json models.pruned: no 'batch'"):
        SpeedRecord.from_dict({**data, "models": {"pruned": {}}}, "speed.json")


def test_width_score_summary_and_flatten():
    shape = {"num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 16, "head_dim": 4}
    data = {"criterion": "magnitude", "shape": shape, "calibration": None, "tensors": {"heads": [2, 2]},
            "file": "width_magnitude.safetensors"}
    assert WidthScoreSummary.from_dict(data, "w.json").to_dict() == data
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
