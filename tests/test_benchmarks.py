"""Smoke tests of the benchmark suite (``python -m benchmarks``) and of the equivalents it counts on.

No timing assertions (DESIGN.md, "Tests"): the end-to-end test checks that the report is written and
that the counted quantities have the growth Table 1 of Vaswani et al. (2017) states.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.graph import longest_chain
from benchmarks.layers import Recurrent, SeparableConvolution, UnrolledRecurrence, local_attention

REPO = Path(__file__).resolve().parent.parent


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_unrolled_recurrence_matches_module(kind):
    torch.manual_seed(0)
    module = Recurrent(kind, 16).double()
    unrolled = UnrolledRecurrence(module)
    x = torch.randn(3, 24, 16, dtype=torch.float64)
    ref = module(x)
    assert _rel_err(unrolled(x), ref) < 1e-12
    # The iterated map moves information one position per application: exact after n applications.
    iterates = list(itertools.islice(unrolled.iterations(x), x.shape[1]))
    assert _rel_err(iterates[-1], ref) < 1e-12
    assert _rel_err(iterates[-2], ref) > 1e-12
    # Step by step, with the input projected per position: the same outputs.
    assert _rel_err(torch.stack(list(unrolled.stepwise(x)), dim=1), ref) < 1e-12


def test_separable_convolution_is_depthwise_then_pointwise():
    torch.manual_seed(0)
    layer = SeparableConvolution(6, 3).double()
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    dw, pw = layer.depthwise, layer.pointwise
    ref = F.conv1d(F.conv1d(x.transpose(1, 2), dw.weight, dw.bias, padding=1, groups=6), pw.weight, pw.bias)
    assert _rel_err(layer(x), ref.transpose(1, 2)) < 1e-12


def test_local_attention_matches_banded_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 40, 8, dtype=torch.float64)
    window = 16
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    band = (j >= i - window // 2) & (j <= i + window - 1 - window // 2)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    assert _rel_err(local_attention(q, k, v, window), ref) < 1e-12


def test_longest_chain_counts_dependent_ops():
    x = torch.randn(4, requires_grad=True)
    y = x
    for _ in range(5):
        y = torch.tanh(y)
    assert longest_chain(y + x.exp()) == 6  # five tanh, then the add; the exp runs beside them


def test_cli_rejects_unknown_suite():
    from benchmarks.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["no-such-suite"])


def _run_quick(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest sets it for the kernels
    return subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-progress", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _series(rows, layer, value):
    return [r[value] for r in rows if r["layer"] == layer]


def _check_report(out: Path, done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out.resolve())
    for name in ("report.md", "results.json", "results.csv", "flops.csv", "crossover.csv", "throughput.png",
                 "flops.png", "table1.png", "crossover.png"):
        assert (out / name).is_file(), name
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    for key in ("config", "environment", "table1_rows", "flops", "sequential_ops", "max_path_length", "timing"):
        assert key in results, key
    env = results["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["date_utc"] and "commit" in env["git"]
    report = (out / "report.md").read_text()
    assert "## Table 1: stated vs measured" in report and "O(n²·d)" in report
    return results


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "report"
    results = _check_report(out, _run_quick(out, "--device", "cpu"))

    fits = results["flops"]["fits"]
    assert abs(fits["attention_core"]["exponent_n"] - 2) < 0.05  # the n^2 term of self-attention
    assert abs(fits["attention_core"]["exponent_d"] - 1) < 0.05
    for key in ("rnn", "lstm", "gru", "conv"):
        assert abs(fits[key]["exponent_n"] - 1) < 0.05 and abs(fits[key]["exponent_d"] - 2) < 0.05
    assert abs(fits["separable"]["exponent_n"] - 1) < 0.05 and 1 < fits["separable"]["exponent_d"] < 2
    assert 1 < fits["attention"]["exponent_n"] < 2  # projections n d^2 plus attention n^2 d

    seq = results["sequential_ops"]["rows"]
    rnn = _series(seq, "rnn_unrolled", "sequential_ops")
    assert all(a < b for a, b in zip(rnn, rnn[1:]))
    assert len(set(_series(seq, "attention", "sequential_ops"))) == 1
    assert len(set(_series(seq, "conv", "sequential_ops"))) == 1

    paths = results["max_path_length"]["rows"]
    assert set(_series(paths, "attention", "layers")) == {1}
    assert _series(paths, "rnn", "layers") == _series(paths, "rnn", "n")
    conv = _series(paths, "conv", "layers")
    assert all(a < b for a, b in zip(conv, conv[1:]))

    # Counted FLOPs: attention core 4n²d against RNN 4nd², the layer (+8nd² projections) against LSTM
    # 16nd² and GRU 12nd²: attention costs more from n = d + 1, 2d + 1 and d + 1 on.
    expected = {("attention_core", "rnn"): 1, ("attention", "lstm"): 2, ("attention", "gru"): 1}
    flop_n_star = {(c["attention"], c["recurrent"], c["d_model"]): c["n_star"] for c in results["crossover"]["by_flops"]}
    for d in results["config"]["crossover_d"]:
        for (att, rec), ratio in expected.items():
            assert flop_n_star[att, rec, d] == ratio * d + 1, (att, rec, d)
    assert results["crossover"]["by_time"], "time crossover computed from the grid"

    timing = results["timing"]["rows"]
    measured = [r for r in timing if r["status"] == "measured"]
    for mode in ("forward", "forward+backward"):
        for layer in ("attention", "rnn", "lstm", "gru", "conv", "separable"):
            assert any(r["mode"] == mode and r["layer"] == layer for r in measured), (mode, layer)
    assert {r["batch"] for r in measured} >= set(results["config"]["batch_sweep"])
    assert measured and all(r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["repeats"] >= 3 for r in measured)
    triton = [r for r in timing if "Triton" in r["implementation"]]
    assert triton and all(r["status"] == "not timed" and "no CUDA device" in r["reason"] for r in triton)

    # `report DIR` re-renders the Markdown, CSV and plots from results.json alone.
    first = (out / "report.md").read_text()
    for name in ("report.md", "results.csv", "crossover.png"):
        (out / name).unlink()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "report", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "report.md").read_text() == first and (out / "crossover.png").is_file()


@pytest.mark.gpu
def test_quick_run_times_triton_on_cuda(tmp_path):
    out = tmp_path / "report"
    results = _check_report(out, _run_quick(out, "--device", "cuda"))
    triton = [r for r in results["timing"]["rows"] if "Triton" in r["implementation"]]
    assert triton and all(r["status"] == "measured" and r["path_ran"] == "triton" for r in triton)
