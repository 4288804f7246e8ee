"""Smoke test of ``python -m bench`` on a tiny CPU sweep: the files it writes and the
shape of the JSON (run with ``pytest bench/``; not part of the default test run)."""

from __future__ import annotations

import json

import torch

from bench import cases as C
from bench import runner

TOP_KEYS = {"card", "torch", "cuda", "commit", "command", "device", "copy_gbps", "matmul_tflops", "rows"}
ROW_KEYS = {"op", "impl", "T", "H", "K", "N", "norm", "dtype", "device", "median_us", "p20_us", "p80_us", "host_us",
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
    # 2 T x (3 norms x [eagle3, eager] + fc x [eagle3, eager, linear] + 2 drafter steps x [eagle3, eager])
    assert len(rows) == 2 * (3 * 2 + 3 + 2 * 2)
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["correct"] and r["error"] is None and r["median_us"] > 0, r
    ours = [r for r in rows if r["impl"] == "eagle3"]
    assert all(r["ratio_vs_eager"] > 0 for r in ours)
    assert all(r["ratio_vs_linear"] > 0 and r["tflops"] > 0 for r in ours if r["op"] == "rms_norm_cat_linear")
    # the fc path that served ours (on the CPU always the pair), the norm plan ("cpu"); the
    # baselines have none
    assert all(r["path"] == "pair" for r in ours if r["op"] == "rms_norm_cat_linear" or r["op"] in C.DRAFTER_OPS)
    assert all(r["path"] == "cpu" for r in ours if r["op"] != "rms_norm_cat_linear" and r["op"] not in C.DRAFTER_OPS)
    assert all(r["path"] is None for r in rows if r["impl"] != "eagle3")
    steps = [r for r in ours if r["op"] == "drafter_step"]
    assert [r["T"] for r in steps] == [1, 5] and "| drafter_step | 1 | 260 | 3 |" in table
    for r in steps:
        assert r["norm"] == "shared" and r["H"] == 260 and r["K"] == 3 and r["N"] is None
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["pct_of_roofline"] > 0
        assert r["bytes"] == C.make_case("drafter_step", r["T"], 260, torch.bfloat16, "cpu").bytes_moved()
    assert path.with_suffix(".md").exists()


def test_drafter_step_case():
    """The drafter step's counts match the models it builds; both models hold the same
    weights; ours and the reference agree with the float64 truth under the numerics rule."""
    case = C.make_case("drafter_step", 6, 384, torch.bfloat16, "cpu")
    cfg = C.drafter_config(4096)  # the Llama-3-8B shape
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["intermediate_size"]) == (32, 8, 128, 14336)
    with torch.inference_mode():
        inp = C.make_inputs(case, seed=0)
        models = inp["models"]
        ours, eager = models["eagle3"], models["eager"]
        step = [n for n, p in ours.named_parameters() if not n.startswith(("embed_tokens", "lm_head"))]
        assert sum(ours.get_parameter(n).numel() for n in step) == C.drafter_param_counts(384)["weights"]
        assert case.shared_bytes() == C.drafter_param_counts(384)["weights"] * 2
        for n, t in ours.state_dict().items():
            assert torch.equal(t, eager.state_dict()[n]), n
        assert C.make_inputs(case, seed=1)["models"] is models  # built once per shape
        checker = C.Checker(case, inp)
        for impl in C.implementations(case, with_compile=False).impls:
            out = impl.prepare(inp)()
            assert len(out) == 2 and out[0].shape == (6, 384) and out[0].dtype == torch.bfloat16
            chk = checker(out)
            assert chk.ok, (impl.name, chk)
    C.release_drafter_models()


def test_mla_drafter_step_case():
    """The MLA drafter step: the Kimi-K2 shape at H = 7168, counts matching the models it
    builds, ours and the reference (same weights) within the numerics rule of the truth."""
    cfg = C.mla_drafter_config(7168)
    assert (cfg["num_attention_heads"], cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["intermediate_size"]) == (
        64, 1536, 512, 18432)
    case = C.make_case("mla_drafter_step", 5, 448, torch.bfloat16, "cpu")
    assert case.norm == "chunk"
    with torch.inference_mode():
        inp = C.make_inputs(case, seed=0)
        models = inp["models"]
        ours, eager = models["eagle3"], models["eager"]
        assert type(ours).__name__ == "Eagle3DeepseekDrafter" and ours.config.fc_norm and ours.config.norm_output
        step = [n for n, p in ours.named_parameters() if not n.startswith(("embed_tokens", "lm_head"))]
        counts = C.drafter_param_counts(448, "mla_drafter_step")
        assert sum(ours.get_parameter(n).numel() for n in step) == counts["weights"]
        matrices = [n for n in step if ours.get_parameter(n).dim() == 2]
        assert sum(ours.get_parameter(n).numel() for n in matrices) == counts["matmul"]
        for n, t in ours.state_dict().items():
            assert torch.equal(t, eager.state_dict()[n]), n
        checker = C.Checker(case, inp)
        for impl in C.implementations(case, with_compile=False).impls:
            out = impl.prepare(inp)()
            assert out[0].shape == (5, 448) and torch.equal(out[0], out[1])  # norm_output
            chk = checker(out)
            assert chk.ok, (impl.name, chk)
    C.release_drafter_models()


def test_rotation_splits_and_rotates():
    """Each name gets all its samples, split over the rounds; each round starts one name on."""
    from bench import timing
    turns = list(timing._rotation(["a", "b", "c"], 25, 10))
    assert [name for r, name, _ in turns if r == 0] == ["a", "b", "c"]
    assert [name for r, name, _ in turns if r == 1] == ["b", "c", "a"]
    assert [name for r, name, _ in turns if r == 2] == ["c", "a", "b"]
    for name in "abc":
        shares = [n for _, nm, n in turns if nm == name]
        assert sum(shares) == 25 and len(shares) == 10 and max(shares) - min(shares) <= 1
    assert len(list(timing._rotation(["a", "b"], 3, 10))) == 2 * 3  # fewer samples than rounds


def test_time_interleaved_host():
    """On the CPU: every implementation is timed in turns (the call log alternates between
    them), the times order as the work does, and one that raises mid-way is reported with
    its exception while the others still get their figures."""
    import time as _time

    from bench import timing
    log = []

    def work(name, seconds):
        def call():
            log.append(name)
            end = _time.perf_counter() + seconds
            while _time.perf_counter() < end:
                pass
        return call

    calls_made = {"n": 0}

    def flaky():
        calls_made["n"] += 1
        log.append("flaky")
        if calls_made["n"] > 4:
            raise RuntimeError("flaky failed")

    budget = timing.Budget(seconds=0.02, min_reps=10, max_reps=10, min_sample_s=0.0)
    out = timing.time_interleaved({"fast": [work("fast", 2e-4)], "slow": [work("slow", 1e-3)], "flaky": [flaky]},
                                  budget, "cpu", rounds=5)
    assert isinstance(out["flaky"], RuntimeError) and "flaky failed" in str(out["flaky"])
    fast, slow = out["fast"], out["slow"]
    assert fast.reps == slow.reps == 10 and fast.batch == slow.batch == 1
    assert 1.5e2 < fast.median_us < slow.median_us and slow.median_us > 9e2
    assert fast.host_us is None  # the host's issue time is recorded beside CUDA events only
    st = timing.summarize([3e-6, 1e-6, 2e-6], 4, [4e-6, 0.5e-6, 1e-6])
    assert (st.median_us, st.host_us, st.reps, st.batch) == (2.0, 1.0, 3, 4), st
    # the timed calls alternate: after round 0, fast and slow take 4 turns each in
    # rotating order (neighbouring turns of the same name run back to back: at least 5 runs)
    timed = [n for n in log[log.index("flaky", log.index("flaky") + 1):] if n != "flaky"]
    switches = sum(1 for a, b in zip(timed, timed[1:]) if a != b)
    assert switches >= 4, timed


def test_tune_times_variants_together():
    """bench.tune's measurement of one case on the CPU (the CUDA figures come the same way):
    every variant runs under its own switches (restored afterwards), on the same inputs,
    and gets its path, a time and its error against float64."""
    from bench import timing, tune
    case = C.make_case(C.FC_OP, 65, 64, torch.bfloat16, "cpu", norm="chunk")
    before = torch.ops.eagle3._fc_mma_max_tokens(-1)
    budget = timing.Budget(seconds=0.01, min_reps=3, max_reps=3, min_sample_s=0.0)
    results, failed = tune._time_variants(
        case, [("default", {}), ("pair", dict(fc_mma_max_tokens=0, fc_decode_max_tokens=0))], budget, 1 << 20)
    assert failed is None
    assert [r[0] for r in results] == ["default", "pair"]
    for name, path, us, err in results:
        assert path == "pair" and us > 0 and err < 1e-2, (name, path, us, err)
    assert torch.ops.eagle3._fc_mma_max_tokens(-1) == before


def test_tune_summary_names_each_case_fastest_variant():
    """bench.tune's closing table: per case (op, norm, T, H) the fastest variant and the first
    variant's and the pair's times over it; a case without the pair shows "-"."""
    from bench import tune
    row = lambda op, norm, T, variant, us: dict(op=op, norm=norm, T=T, H=4096, variant=variant,  # noqa: E731
                                               path=variant.split()[0], us=us)
    fc = "rms_norm_cat_linear"
    rows = [row(fc, "chunk", 8, "default", 50.0), row(fc, "chunk", 8, "mma f32", 40.0),
            row(fc, "chunk", 8, "norm_cat+cuBLAS", 44.0), row(fc, "shared", 8, "default", 30.0),
            row("fused_add_rms_norm", None, 1, "default", 2.0),
            row("fused_add_rms_norm", None, 1, "registers+w v1", 2.5)]
    lines = tune.summary(rows)
    assert lines[2] == "| rms_norm_cat_linear (chunk) | 8 | 4096 | mma f32 (mma) | 40.0 | default | 1.250 | 1.100 |"
    assert lines[3] == "| rms_norm_cat_linear (shared) | 8 | 4096 | default (default) | 30.0 | default | 1.000 | - |"
    assert lines[4] == "| fused_add_rms_norm | 1 | 4096 | default (default) | 2.0 | default | 1.000 | - |"
    assert len(lines) == 5
