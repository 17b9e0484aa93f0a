"""Stage `report`: table and figures comparing base, pruned and retrained -> reports/report.md, reports/figures/."""
from pathlib import Path

from shear.io import read_json
from shear.report import write_report

NAMES = ("base", "pruned", "retrained")
EVAL, MODELS = Path("reports/eval"), Path("data/models")
REPORT, FIGURES = "reports/report.md", "reports/figures"


def main(params, args):
    metrics = {name: read_json(EVAL / name / "metrics.json") for name in NAMES}
    # shear.json says how each model was made and its shape (a missing one leaves "—" cells)
    records = {name: read_json(MODELS / name / "shear.json") for name in NAMES
               if (MODELS / name / "shear.json").is_file()}
    text = write_report(metrics, REPORT, FIGURES, records)
    table = text[text.index("| "):text.index("## How")]
    print(table, end="")
    print(f"report: wrote {REPORT} and {FIGURES}/")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
