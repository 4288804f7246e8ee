"""Smoke test of ``python -m bench`` on a tiny CPU sweep: the files it writes and the
shape of the JSON (run with ``pytest bench/``; not part of the default test run)."""

from __future__ import annotations

import json

from bench import runner

TOP_KEYS = {"card", "torch", "cuda", "commit", "command", "device", "copy_gbps", "matmul_tflops", "rows"}
ROW_KEYS = {"op", "impl", "T", "H", "K", "N", "norm", "dtype", "device", "median_us", "p20_us", "p80_us",
            "graph_us", "gbps", "tflops", "pct_of_copy_bw", "pct_of_matmul", "pct_of_roofline", "correct",
            "max_rel_err", "tol", "bytes", "flops", "n_rot", "error"}


def test_runner_cpu_smoke(tmp_path, capsys):
    rc = runner.main(["--device", "cpu", "--ops", "all", "--num-tokens", "1,5", "--hidden-size", "260",
                      "--no-compile", "--budget-ms", "5", "--out", str(tmp_path)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| op | T | H | K |" in table and "rms_norm_cat_linear/chunk" in table
    [path] = list(tmp_path.glob("*.json"))
    data = json.loads(path.read_text())
    assert TOP_KEYS <= set(data)
    assert data["device"] == "cpu" and data["copy_gbps"] > 0 and data["matmul_tflops"] > 0
    rows = data["rows"]
    # 2 T x (3 norms x [eagle3, eager] + fc x [eagle3, eager, linear])
    assert len(rows) == 2 * (3 * 2 + 3)
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["correct"] and r["error"] is None and r["median_us"] > 0, r
    ours = [r for r in rows if r["impl"] == "eagle3"]
    assert all(r["ratio_vs_eager"] > 0 for r in ours)
    assert all(r["ratio_vs_linear"] > 0 and r["tflops"] > 0 for r in ours if r["op"] == "rms_norm_cat_linear")
    assert path.with_suffix(".md").exists()
