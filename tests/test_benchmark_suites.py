"""Smoke tests of the ``attention`` and ``kernels`` benchmark suites (quick CPU runs, in a subprocess
without TRITON_INTERPRET, as a user would run them): the reports exist and hold measured numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _run(suite: str, out: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", suite, "--quick", "--no-progress", "--out", str(out),
                           *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve())
    for name in ("report.md", "results.json", "results.csv"):
        assert (out / name).stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def test_attention_suite(tmp_path):
    results = _run("attention", tmp_path / "attention", "--trace")
    assert abs(results["flop_formula_check"]["ratio"] - 1) < 1e-9
    rows = results["rows"]
    measured = [r for r in rows if r["status"] == "measured"]
    assert {r["backend"] for r in measured} >= {"torch math", "naive eager"}
    assert all(r["forward"]["median_s"] > 0 and r["tflop_per_s_forward"] > 0 for r in measured)
    ours = [r for r in rows if r["backend"] == "ours (Triton)"]
    assert ours and all("no CUDA device" in r["status"] for r in ours)  # said plainly, not faked
    assert (tmp_path / "attention" / "attention_time.png").exists()
    trace = tmp_path / "attention" / results["traces"]["torch math"]  # a Chrome trace of one fwd+bwd
    assert "traceEvents" in json.loads(trace.read_text())
    # past one device: bytes counted at the communication calls equal the formula; memory measured
    cp = results["context_parallel"]
    assert cp["send_checks"] and all(c["counted_forward"] == c["formula_forward"] > 0 and
                                     c["counted_backward"] == c["formula_backward"] > 0 for c in cp["send_checks"])
    assert {"1|one device", "2|ring", "2|all_to_all"} <= set(cp["per_token"])
    assert all(v["bytes_per_token"] > 0 for v in cp["per_token"].values())
    fits = {(f["world"], f["strategy"], f["memory_gib"]): f["max_seqlen"] for f in cp["longest_fitting"]}
    assert fits[(8, "ring", 80.0)] > fits[(2, "ring", 80.0)]  # more ranks, longer sequences
    assert "Past one device" in (tmp_path / "attention" / "report.md").read_text()
    assert (tmp_path / "attention" / "context_parallel_memory.png").exists()


def test_kernels_suite(tmp_path):
    results = _run("kernels", tmp_path / "kernels")
    for section in ("layer_norm", "ffn", "attention", "training_step"):
        assert any(r["status"] == "measured" for r in results[section]), section
    fp8 = {r["peer"]: r["status"] for r in results["attention_fp8"]}
    assert fp8["torch SDPA bf16"] == "measured" and fp8["ours FP8 (e4m3)"].startswith("not timed")
    assert "FP8 (e4m3) against bf16" in (tmp_path / "kernels" / "report.md").read_text()
    ffn8 = {r["peer"]: r["status"] for r in results["ffn_fp8"]}
    assert ffn8["torch eager bf16"] == "measured" and ffn8["ours FP8, bf16 input"].startswith("not timed")
    assert "FFN forward for inference: FP8" in (tmp_path / "kernels" / "report.md").read_text()
    eager_ffn = [r for r in results["ffn"] if r["peer"] == "torch eager"]
    assert all(r["tflop_per_s"] > 0 and r["activation_bytes"] > 0 for r in eager_ffn)
    assert results["device_limits"]["copy_gb_per_s"] > 0 and results["device_limits"]["matmul_tflop_per_s"] > 0


def test_kernels_suite_sections_and_interrupt(tmp_path, monkeypatch):
    """``--sections`` picks and orders the sections; a SIGINT (as ``timeout -s INT`` sends when a lease's
    step runs out) ends the run with a report of the rows measured so far and exit status 130."""
    from benchmarks import __main__ as cli
    from benchmarks import kernels_suite

    measured = []

    def interrupted_ffn_fp8(*args):
        for row in real(*args):
            measured.append(row)
            yield row
            if len(measured) == 3:
                raise KeyboardInterrupt

    real = kernels_suite.ffn_fp8_rows
    monkeypatch.setattr(kernels_suite, "ffn_fp8_rows", interrupted_ffn_fp8)
    out = tmp_path / "k"
    assert cli.main(["kernels", "--quick", "--no-progress", "--device", "cpu", "--out", str(out),
                     "--sections", "layer_norm,ffn_fp8,attention"]) == 130
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] == "stopped by SIGINT in section ffn_fp8 after 3 of its rows"
    assert results["ffn_fp8"] == json.loads(json.dumps(measured)) and "attention" not in results
    assert any(r["status"] == "measured" for r in results["layer_norm"])
    report = (out / "report.md").read_text()
    assert "**Interrupted: stopped by SIGINT" in report and "## Attention, forward" not in report
    assert report.index("## LayerNorm") < report.index("## FFN forward for inference")


def test_attention_suite_interrupt(tmp_path, monkeypatch):
    from benchmarks import __main__ as cli
    from benchmarks import attention_cost

    calls = []

    def measure(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    real = attention_cost._measure
    monkeypatch.setattr(attention_cost, "_measure", measure)
    out = tmp_path / "a"
    assert cli.main(["attention", "--quick", "--no-progress", "--device", "cpu", "--out", str(out)]) == 130
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"].startswith("stopped by SIGINT after ")
    assert [r["status"] for r in results["rows"] if r["status"] == "measured"] == ["measured"]
    assert "**Interrupted" in (out / "report.md").read_text()


def test_tutorial_anchor_plumbing(tmp_path):
    """The Triton tutorial's FP8 forward is timed from a copy the user gives (none is shipped): it gets its
    own layout, (batch, heads, seqlen, head_dim) in e5m2 with V keys-contiguous, and its own scale. A
    stand-in module checks what it is handed; a tutorial that fails to import is reported, not raised."""
    import torch
    import torch.nn.functional as F

    from benchmarks.kernels_suite import load_tutorial, tutorial_fp8

    (tmp_path / "tutorial.py").write_text(
        "import torch\nimport torch.nn.functional as F\nseen = []\n"
        "def attention(q, k, v, causal, sm_scale):\n"
        "    seen.append((q.dtype, k.dtype, v.dtype, q.shape, q.is_contiguous(), v.stride(2), causal, sm_scale))\n"
        "    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,\n"
        "                                          scale=sm_scale).to(q.dtype)\n")
    tutorial = load_tutorial(str(tmp_path / "tutorial.py"))
    q, k, v = (torch.randn(2, 40, 3, 16) for _ in range(3))  # (batch, seqlen, heads, head_dim)
    out = tutorial_fp8(tutorial, q, k, v, True)()
    e5m2 = torch.float8_e5m2
    assert tutorial.seen == [(e5m2, e5m2, e5m2, (2, 3, 40, 16), True, 1, True, 16 ** -0.5)]
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).to(e5m2).float() for t in (q, k, v)), is_causal=True)
    assert out.dtype == e5m2 and torch.allclose(out.float(), ref, rtol=0.25, atol=0.05)
    assert load_tutorial(None).startswith("not timed: no tutorial given")
    (tmp_path / "broken.py").write_text("raise RuntimeError('needs a GPU')\n")
    assert load_tutorial(str(tmp_path / "broken.py")) == ("failed: the tutorial did not import: "
                                                          "RuntimeError: needs a GPU")
