"""bench/gpu_check.py: its smoke mode runs every part on the CPU without dvc, dvclive, lm-eval or gguf."""
import json
import subprocess
import sys

from tests.conftest import REPO

BLOCKED = ("dvc", "dvclive", "lm_eval", "gguf")


def test_smoke_runs_every_part_without_dvc_lmeval_gguf(tmp_path):
    code = (f"import sys\nfor m in {BLOCKED!r}: sys.modules[m] = None  # import m now raises ImportError\n"
            f"from bench.gpu_check import main\nmain(['--smoke', '--out', {str(tmp_path)!r}])\n"
            f"print(sorted(m for m in {BLOCKED!r} if sys.modules.get(m) is not None))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: part["status"] for name, part in result["parts"].items()}
    assert statuses == {p: "ok" for p in ("ppl_scoring", "sheared_steps", "cpt_step", "mask_overhead", "decode")}, \
        {n: p.get("error") for n, p in result["parts"].items()}
    assert result["parts"]["ppl_scoring"]["result"]["same_ranking"]["vs_loop"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "torch" in md and "| decode | ok |" in md


def test_a_failing_part_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    from bench import gpu_check

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(gpu_check, "part_cpt_step", broken)
    gpu_check.main(["--smoke", "--out", str(tmp_path), "--parts", "cpt_step", "mask_overhead"])
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["cpt_step"]["status"] == "failed" and "simulated failure" in parts["cpt_step"]["error"]
    assert parts["mask_overhead"]["status"] == "ok"
