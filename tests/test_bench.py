"""`qwen2 bench`: the report's shape on a real quick run, the row-picking and roofline arithmetic, and
one-line errors for options the bench cannot use."""

import json
import os
import subprocess
import sys

import pytest

from qwen2.bench.report import METRICS, pick, ratios, roofline
from qwen2.cli import main


def test_quick_bench_writes_the_report_and_names_a_missing_peer(default_gguf, tmp_path):
    out = tmp_path / "bench.json"
    # QWEN2_BENCH_HIDE puts None in the children's sys.modules for llama_cpp, so `import llama_cpp`
    # raises ImportError exactly as when the package is not installed: the real missing-peer path
    # runs whether or not llama-cpp-python is in this venv, and no engine is faked.
    env = os.environ | {"QWEN2_BENCH_HIDE": "llama_cpp"}
    cmd = [sys.executable, "-m", "qwen2.bench", "--quick", "--peers", "qwen2,llama.cpp",
           "--model", str(default_gguf), "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == report  # stdout ends with the same JSON line
    assert set(report) == {"machine", "results"}
    assert set(report["results"]) == {"qwen2", "llama.cpp", "transformers"}
    assert report["machine"]["bandwidth_gbs"] > 0 and report["machine"]["threads"] >= 1

    ours = report["results"]["qwen2"]
    for key in ("load_s", "prefill_tps", "decode_tps", "decode_tps_c4", "peak_rss_mb"):
        assert ours[key] > 0, key
    assert ours["decode_tps_c16"] is None  # --quick runs c4 only
    assert 0 < ours["roofline"]["roofline_frac"]
    assert ours["other_cpu_cores"] >= 0  # how busy the rest of the machine was meanwhile

    llama = report["results"]["llama.cpp"]
    assert "llama_cpp" in llama["missing"]
    assert all(llama[k] is None for k in METRICS)
    assert "not requested" in report["results"]["transformers"]["missing"]


def row(decode: float) -> dict:
    return {"load_s": 1.0, "prefill_tps": 100.0, "decode_tps": decode, "decode_tps_c4": 2 * decode,
            "decode_tps_c16": None, "peak_rss_mb": 500.0}


def test_pick_takes_a_peers_faster_decode_and_ours_as_loaded():
    peer = pick("llama.cpp", {"fa off": row(10.0), "fa on": row(12.0)})
    assert peer["variant"] == "fa on" and peer["decode_tps"] == 12.0
    assert peer["variants"]["fa off"]["decode_tps"] == 10.0
    # ours is judged by the first row (quant=auto) even when an explicit mode is faster
    ours = pick("qwen2", {"auto": row(5.0), "int4": row(9.0)})
    assert ours["variant"] == "auto" and ours["decode_tps"] == 5.0
    failed = pick("transformers", {"fp32": {"missing": "failed (signal 11): boom"}})
    assert "boom" in failed["missing"] and all(failed[k] is None for k in METRICS)


def test_each_ratio_is_against_the_peers_fastest_variant_at_that_metric():
    ours = {"prefill_tps": 800.0, "decode_tps": 40.0, "decode_tps_c4": 120.0, "decode_tps_c16": None}
    keys = ("prefill_tps", "decode_tps", "decode_tps_c4", "decode_tps_c16")
    variants = {"t [float32]": dict(zip(keys, (330.0, 10.8, 20.0, 55.0))),
                "t [bfloat16]": dict(zip(keys, (1250.0, 10.5, 40.0, 140.0)))}
    assert ratios(ours, variants) == pytest.approx([0.64, 40 / 10.8, 3.0, None])


def test_roofline_is_bandwidth_over_bytes_per_token():
    r = row(5.0) | {"weight_bytes": 900_000_000, "kv_bytes_per_pos": 1000}
    roof = roofline(r, bandwidth_gbs=10.0, context=100_000)  # 0.9 GB of weights + 0.1 GB of KV
    assert roof["bytes_per_token"] == 1_000_000_000
    assert roof["roofline_tps"] == 10.0 and roof["roofline_frac"] == 0.5 and roof["achieved_gbs"] == 5.0
    assert roofline({"missing": "x"}, 10.0, 100) == {}


def error_lines(capsys, *argv: str) -> list[str]:
    """stderr of `qwen2 bench ARGV`, which must exit 1."""
    with pytest.raises(SystemExit) as exited:
        main(["bench", *argv])
    assert exited.value.code == 1
    return capsys.readouterr().err.splitlines()


def test_a_missing_model_is_one_error_line(capsys):
    lines = error_lines(capsys, "--model", "nonexistent.gguf")
    assert len(lines) == 1 and lines[0].startswith("qwen2: error:") and "no such file" in lines[0], lines


@pytest.mark.parametrize("kind", ["file", "hf folder", "hub id"])
def test_a_model_that_is_not_a_gguf_is_refused_before_any_run(capsys, tmp_path, kind):
    if kind == "file":
        spec = tmp_path / "model.safetensors"
        spec.write_bytes(b"")
    elif kind == "hf folder":
        spec = tmp_path
        (spec / "config.json").write_text("{}")
    else:
        spec = "Qwen/Qwen2-0.5B-Instruct"  # refused by its kind: nothing is downloaded
    lines = error_lines(capsys, "--model", str(spec))
    assert len(lines) == 1 and lines[0].startswith("qwen2: error:") and "one GGUF file" in lines[0], lines


def test_an_unknown_peer_is_an_option_error(capsys):
    lines = error_lines(capsys, "--peers", "qwen2,vllm")
    assert lines == ["qwen2: error: unknown peer(s) vllm; choose from qwen2, llama.cpp, transformers"]
