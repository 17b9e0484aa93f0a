"""Stage `report`: table and figures comparing base, pruned and retrained -> reports/report.md, reports/figures/."""
from shear.io import read_json
from shear.paths import FIGURES, MODEL_NAMES, REPORT, metrics_file, model_dir
from shear.report import write_report


def main(params, args):
    metrics = {name: read_json(metrics_file(name)) for name in MODEL_NAMES}
    # shear.json says how each model was made and its shape (a missing one leaves "—" cells)
    records = {name: read_json(model_dir(name) / "shear.json") for name in MODEL_NAMES
               if (model_dir(name) / "shear.json").is_file()}
    text = write_report(metrics, REPORT, FIGURES, records)
    table = text[text.index("| "):text.index("## How")]
    print(table, end="")
    print(f"report: wrote {REPORT} and {FIGURES}/")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
