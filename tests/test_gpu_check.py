"""bench/gpu_check.py, the script a lent GPU runs, works end to end here: without CUDA it runs dry
on the CPU at tiny sizes, and the correctness checks that need no GPU pass."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "bench" / "gpu_check.py"


@pytest.mark.slow  # the whole script at tiny sizes: ~18 s, past the default suite's budget
def test_gpu_check_runs_dry_on_the_cpu_and_its_checks_pass(tmp_path):
    out = tmp_path / "report.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, cwd=SCRIPT.parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu (dry run)"
    checks = report["correctness"]
    assert checks["ok"] and checks["cached_decode_max_abs_diff"] < 1e-3 and checks["fused_grad_max_abs_diff"] < 1e-3
    assert report["train_step"]["full/ours"]["tokens_per_s"] > 0 and report["decode"]["ours"]["tokens_per_s"] > 0
    assert report["moe_correctness"]["ok"] and report["moe_correctness"]["moe_layers_ungrouped"] == []
    assert report["moe_correctness"]["moe_grouped_vs_cpu_loop_max_abs_diff"] < 1e-3
    assert [(row["config"], row["quant"]) for row in report["engine"]] == [
        ("tiny", "none"), ("tiny", "int4"), ("tiny-moe", "none")]
    assert all(row["decode/batch4/static"]["tokens_per_s"] > 0 for row in report["engine"])
    assert "aten::" in report["profile"]
    assert all(row["us"] > 0 for row in report["int4_layers"].values()) and report["wall_s"] > 0
