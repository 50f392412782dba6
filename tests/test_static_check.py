"""GPU health from a CPU (kernels/transformer_kernels/static_check.py): shipped configs compile for sm_80 and sm_90a without
register spills, the matmul-bearing kernels use tensor-core instructions in half precision, and the
steady-state loops (kernels/transformer_kernels/static_model.py) waste no tensor-core work and keep Hopper's MMAs async.

The default suite checks the representative subset ``static_check.QUICK_CASES`` (every kernel, both
archs); ``STATIC_CHECK_FULL=1`` checks every shipped config, as ``python -m transformer_kernels.static_check`` does.
Compiles are cached on a hash of the kernel source, so a warm run takes seconds. No wall-clock limit:
on a machine whose cores are shared the cold compile is slow, never wrong."""
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("STATIC_CHECK_FULL") == "1"
ATTENTION = {"_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(ROOT / "kernels"), str(ROOT)]), "TRITON_DEFAULT_FP_FUSION": "1"}
    cmd = [sys.executable, "-m", "transformer_kernels.static_check", "--json"] + ([] if FULL else ["--quick"])
    # xdist may put these tests on several workers: one compiles, the others wait and read its cache.
    lock = tmp_path_factory.getbasetemp().parent / "static_check.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_every_checked_config_compiles_spill_free_with_tensor_cores(reports):
    reports, proc = reports
    bad = [r for r in reports if not r["ok"]]
    assert not bad, "unhealthy configs:\n" + "\n".join(json.dumps(r) for r in bad)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["kernel"] for r in reports} == ATTENTION | {
        "_attn_combine_kernel", "_attn_bwd_delta_kernel", "_dropout_mask_kernel", "_norm_fwd_kernel",
        "_norm_bwd_stats_kernel", "_norm_bwd_kernel", "_matmul_kernel", "_ffn_elementwise_kernel",
        "_rotate_half_kernel", "_quantize_rows_kernel"}
    assert {r["arch"] for r in reports} == {"sm_80", "sm_90a"}
    half = [r for r in reports if r["needs_mma"]]
    assert half and all(r["mma_instructions"] > 0 for r in half)


def test_hopper_runs_warpgroup_mma_asynchronously(reports):
    """HGMMA wherever a program owns 64+ rows: every half-precision attention product except decoding
    (16-row blocks) and head_dim 256's backward (small tiles against spills), and every FFN matmul."""
    reports, _ = reports
    half = [r for r in reports if r["needs_mma"] and r["arch"] == "sm_90a"]
    hopper = [r for r in half if r["kernel"] in ATTENTION and "decode" not in r["case"]
              and not (r["kernel"] != "_attn_fwd_kernel" and "d=256" in r["case"])]
    assert hopper and not [(r["kernel"], r["case"]) for r in hopper if r["wgmma_instructions"] == 0]
    assert all(r["wgmma_instructions"] > 0 for r in half if r["kernel"] == "_matmul_kernel")
    # A warpgroup wait per HGMMA serializes them (a runtime branch in the backward's loop did; the split
    # walk's compile-time loops keep them batched). Known exception: every score modifier at once.
    serialized = [(r["kernel"], r["case"], r["wgmma_instructions"], r["wgmma_waits"]) for r in hopper
                  if 2 * r["wgmma_waits"] > r["wgmma_instructions"] and "all-modifiers" not in r["case"]]
    assert not serialized, serialized


def test_tensor_cores_execute_only_useful_work(reports):
    """Executed tensor-core FLOPs per loop iteration equal what the algorithm needs, for every attention
    and FFN product on tensor cores: no tile is computed twice by two warpgroups (issue 12: 8 warps on a
    64-row backward block ran the score and dP products twice)."""
    reports, _ = reports
    mma = [r for r in reports if r["useful_flops"] and r["executed_flops"]]
    assert {r["kernel"] for r in mma} >= ATTENTION | {"_matmul_kernel"}
    assert any(r["heavy"] for r in mma)  # score modifiers at head_dim 64 are held to it too

    def known(r):  # registers force 8 warps on 64-row blocks: modifiers at head_dim 256, or 128 on sm_80
        return r["heavy"] and (r["head_dim"] >= 256 or (r["arch"] == "sm_80" and r["head_dim"] >= 128))

    wasted = [(r["case"], r["kernel"], r["arch"], r["executed_flops"] / r["useful_flops"]) for r in mma
              if r["executed_flops"] != r["useful_flops"] and not known(r)]
    assert not wasted, wasted


def test_the_model_reads_the_loop(reports):
    """The steady loop of the main target: one HGMMA shape per product, exp on MUFU, a positive figure."""
    reports, _ = reports
    fwd = next(r for r in reports if r["kernel"] == "_attn_fwd_kernel" and r["arch"] == "sm_90a"
               and r["case"] == "attention bfloat16 d=128 causal")
    assert fwd["has_loop"] and fwd["loop_instructions"] > 0 and "m64n" in fwd["mma_shapes"]
    rows = fwd["useful_flops"] / (2 * 2 * 128)  # BLOCK_M x BLOCK_N of the tile
    assert fwd["mufu"] >= rows / (32 * fwd["num_warps"])  # one exp2 per score, spread over the threads
    assert 0 < fwd["serial_tflops"] <= fwd["overlap_tflops"]


def test_fp8_forward_runs_8bit_warpgroup_mma(reports):
    """Issue 22, item 5: the FP8 forward's loop is QGMMA (k = 32, e4m3 operands) on sm_90a, both products,
    executed == useful tensor FLOPs (test_tensor_cores_execute_only_useful_work), no spills."""
    reports, _ = reports
    (fp8,) = [r for r in reports if r["case"] == "attention float8_e4m3fn d=128 causal" and r["kernel"] == "_attn_fwd_kernel"]
    assert fp8["arch"] == "sm_90a" and fp8["ok"]
    assert "k32" in fp8["mma_shapes"] and "k16" not in fp8["mma_shapes"]
    assert fp8["executed_flops"] == fp8["useful_flops"] > 0


def test_fp8_ffn_runs_8bit_warpgroup_mma(reports):
    """Issue 22, item 2: both FP8 FFN products (the first quantizing its bf16 input as it loads it, the second
    quantizing h) run QGMMA on sm_90a, executed == useful, no spills."""
    reports, _ = reports
    rows = [r for r in reports if r["case"] == "ffn fp8 swiglu input=bfloat16" and r["kernel"] == "_matmul_kernel"]
    assert len(rows) == 2 and all(r["arch"] == "sm_90a" and r["ok"] for r in rows)
    assert all("k32" in r["mma_shapes"] and r["executed_flops"] == r["useful_flops"] > 0 for r in rows)


def test_the_model_counts_blackwell_and_fp8_mma():
    """QGMMA counts as warpgroup MMA at twice HGMMA's rate; Blackwell's tcgen05 MMAs are counted, their
    shapes (in descriptors, not opcodes) read from the TTGIR loop that issues as many of them."""
    sys.path.insert(0, str(ROOT / "kernels"))
    from transformer_kernels import static_model as m

    sass = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(
        ["QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ",
         "UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], tmem[UR10], idesc[UR12], UPT", "UTCBAR [UR4], URZ"]))
    st = m.region_stats(m.parse_sass(sass))
    assert sum(st.hgmma.values()) == 2 and st.tcgen05 == 1
    assert m.mma_flops("QGMMA.64x128x32.F32.E4M3.E4M3") == (2 * 64 * 128 * 32, True)
    qg = m.LoopStats(hgmma={"QGMMA.64x128x32.F32.E4M3.E4M3": 1})
    hg = m.LoopStats(hgmma={"HGMMA.64x128x32.F32.BF16": 1})
    assert qg.tensor_clocks(4, m.MACHINES["sm_90a"]) * 2 == hg.tensor_clocks(4, m.MACHINES["sm_90a"])
    # tcgen05's shapes come from the TTGIR: the loop whose products issue as many MMAs as the SASS loop
    ttgir = "\n".join([
        "tt.func @k() {",
        "  ttng.tc_gen5_mma %a, %b, %c : !ttg.memdesc<128x64xbf16, #s>, !ttg.memdesc<64x256xbf16, #s>, !x",
        "  %r = scf.for %i = %c0 to %n step %c1 iter_args() -> () {",
        "    ttng.tc_gen5_mma %q, %k, %s : !ttg.memdesc<128x128xf8E4M3FN, #s>, !ttg.memdesc<128x64xf8E4M3FN, #s>, !x",
        "    scf.if %p {",
        "      ttng.tc_gen5_mma %p, %v, %o : !ttg.memdesc<128x64xf8E4M3FN, #t>, !ttg.memdesc<64x128xf8E4M3FN, #s>, !x",
        "    }",
        "  }",
        "}"])
    assert m.tcgen05_loops(ttgir) == [[(128, 64, 128, 8), (128, 128, 64, 8)]]
    st = m.LoopStats(tcgen05=6)  # 128/32 + 64/32 instructions
    m.attach_tcgen05(st, ttgir)
    assert st.executed_flops(4)[0] == 2 * 128 * 64 * 128 + 2 * 128 * 128 * 64
    bf16 = m.LoopStats(tcgen05_products=[(128, 64, 128, 16), (128, 128, 64, 16)])
    assert bf16.tensor_clocks(4, m.MACHINES["sm_100a"]) == 2 * st.tensor_clocks(4, m.MACHINES["sm_100a"]) > 0
    miss = m.LoopStats(tcgen05=5)
    m.attach_tcgen05(miss, ttgir)
    assert miss.tcgen05_products == []
    # an mbarrier spin loop nested in the MMA loop: the MMA loop (not innermost) is the steady one
    nested = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(
        ["UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], tmem[UR10], idesc[UR12], UPT",
         "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2", "@!P0 BRA 0x10", "IADD3 R4, R4, 0x1, RZ", "BRA 0x0",
         "EXIT"]))
    steady, has_loop = m.steady_loop(m.parse_sass(nested))
    assert has_loop and steady.tcgen05 == 1 and steady.instructions == 5
    # Blackwell's ptxas closes a loop whose trip count every thread shares with a uniform branch
    uniform = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(
        ["MOV R2, RZ", "HMMA.16816.F32.BF16 R4, R8, R12, R4", "UIADD3 UR4, UPT, UPT, UR4, 0x1, URZ",
         "BRA.U !UP0, 0x10", "EXIT"]))
    steady, has_loop = m.steady_loop(m.parse_sass(uniform))
    assert has_loop and sum(steady.hmma.values()) == 1 and steady.instructions == 3
    # an mbarrier wait's retry path sits after the last EXIT and branches back into the body: no loop
    stub = "\n".join(f"        /*{16 * i:04x}*/                   {op} ;" for i, op in enumerate(
        ["UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], tmem[UR10], idesc[UR12], UPT",
         "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2", "@!P0 BRA 0x60", "IADD3 R4, R4, 0x1, RZ",
         "BRA.U !UP0, 0x0", "EXIT", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2", "@!P0 BRA 0x60", "BRA 0x10"]))
    assert m.loops(m.parse_sass(stub)) == [(0, 4), (6, 7)]
