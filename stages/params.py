"""Stage `params`: validate the whole params.yaml before any other stage runs.

DVC tracks the whole file here, so every edit re-runs this stage (a misspelled section such
as `retrian:` included) and `dvc repro` stops at its one-line error before any stage writes.
Writes reports/params/checked.json, on which every stage depends (its content changes only
with the set of sections, so a valid edit does not re-run stages by itself), and
reports/params/<stage>.json for the stages whose keys depend on the method: exactly what they read.
"""
import dataclasses

from shear.config import STAGE_SETTINGS
from shear.io import write_json
from shear.paths import PARAMS_CHECKED, settings_file


def main(params, args):
    for stage, settings in STAGE_SETTINGS.items():
        write_json(settings_file(stage), settings(params))
    write_json(PARAMS_CHECKED, {"file": args.params, "valid": True,
                                "sections": [f.name for f in dataclasses.fields(params)]})
    print(f"params: {args.params} is valid; wrote {', '.join(str(settings_file(s)) for s in STAGE_SETTINGS)}")


if __name__ == "__main__":
    from shear.stage import run_stage

    run_stage(__doc__, main)
