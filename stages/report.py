"""Stage `report`: table and figures comparing base, pruned and retrained -> reports/report.md, reports/figures/.

Quality from reports/eval/<model>/metrics.json, every speed figure from reports/speed.json
(one run), how each model was made from data/models/<model>/shear.json.
"""
from shear.io import read_json
from shear.paths import EXPORT_METRICS, FIGURES, MODEL_NAMES, REPORT, SPEED, metrics_file, model_dir
from shear.records import EvalMetrics, ModelRecord, SpeedRecord
from shear.report import write_report


def main(params, args):
    metrics = {}
    for name in MODEL_NAMES:
        path = metrics_file(name)
        metrics[name] = EvalMetrics.from_dict(read_json(path), str(path)).to_dict()  # checked, then as a dict
    speed = SpeedRecord.from_dict(read_json(SPEED), str(SPEED))
    # shear.json says how each model was made and its shape (a missing one leaves "—" cells)
    records = {name: ModelRecord.from_dict(read_json(path), str(path)) for name in MODEL_NAMES
               if (path := model_dir(name) / "shear.json").is_file()}
    export = read_json(EXPORT_METRICS) if EXPORT_METRICS.is_file() else None
    text = write_report(metrics, REPORT, FIGURES, records, speed, export)
    table = text[text.index("| "):text.index("## How")]
    print(table, end="")
    print(f"report: wrote {REPORT} and {FIGURES}/")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
