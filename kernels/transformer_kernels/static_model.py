"""What one steady-state loop iteration costs, read from a kernel's SASS: the model behind the static check.

Without a GPU the compiled code is the evidence of speed. For a cubin this module finds the innermost
loops (backward branches in the SASS), picks the steady-state one (for the matmul-bearing kernels the
tensor-core loop with the fewest instructions: with the split walk, the interior blocks), and counts
per warp and iteration: instructions, tensor-core instructions by shape, ``MUFU`` (exp2, rcp, ...),
``FMUL``/``FFMA``, warpgroup waits and global loads.

A crude throughput model turns the counts into time per CTA-iteration on one SM, in clocks:

* ``t_tensor`` = executed tensor-core FLOPs / the SM's dense rate (HGMMA and QGMMA issued per warpgroup,
  QGMMA's 8-bit products at twice the rate; HMMA per warp);
* ``t_issue`` = loop instructions x warps / 4 (four schedulers, one instruction per clock each);
* ``t_mufu`` = MUFU instructions x 32 lanes x warps / 16 (the SM's 16 special-function lanes per clock).

``serial`` assumes nothing overlaps the MMAs and the rest: useful / (t_tensor + max(t_issue, t_mufu));
``overlap`` assumes perfect overlap: useful / max(the three); both scaled by clock x SMs into TFLOP/s.
"Useful" is what the algorithm needs (e.g. forward attention 2 x BLOCK_M x BLOCK_N x (d + d_v) per key
block); "executed" is what the tensor cores run, and more of it than useful is waste (tiles computed
twice by two warpgroups). The model ignores memory stalls, occupancy (one CTA per SM), prologue and
epilogue and the causal diagonal's edge blocks: it ranks loop bodies, it does not predict a timing.
The clock and SM counts are H100 SXM's and A100 SXM's published figures; FA3 (Shah et al., 2024,
Sec. 3) frames Hopper attention the same way (exp throughput against tensor-core throughput).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Machine:
    name: str
    sms: int
    ghz: float
    hgmma_flops_per_clock: int  # dense fp16/bf16 warpgroup MMA per SM (0: none)
    hmma_flops_per_clock: int   # dense fp16/bf16 mma.sync per SM
    mufu_per_clock: int = 16
    issue_per_clock: int = 4
    tcgen05_flops_per_clock: int = 0  # dense fp16/bf16 tcgen05 MMA per SM (Blackwell)


# H100 SXM: 989 dense fp16 TFLOP/s = 132 SMs x 1.83 GHz x 4096. mma.sync on Hopper is assumed to run at
# half the warpgroup rate (it cannot keep the tensor cores fed; an assumption, not a measurement).
# A100 SXM: 312 TFLOP/s = 108 x 1.41 GHz x 2048.
# B200 (HGX, 1000 W): 2.25 dense fp16 PFLOP/s over 148 SMs at tcgen05's 8192 FLOP per clock and SM
# (twice Hopper's) gives 1.86 GHz (a derived clock, not a published one). mma.sync on Blackwell is assumed
# at half of tcgen05's rate, as on Hopper (an assumption, not a measurement).
MACHINES = {
    "sm_90a": Machine("H100 SXM", 132, 1.83, 4096, 2048),
    "sm_80": Machine("A100 SXM", 108, 1.41, 0, 2048),
    "sm_100a": Machine("B200", 148, 1.86, 0, 4096, tcgen05_flops_per_clock=8192),
}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH = re.compile(r"0x([0-9a-f]+)")
# warpgroup MMA: HGMMA (fp16, bf16, tf32) and QGMMA (e4m3 / e5m2 operands, twice the fp16 rate)
_HGMMA = re.compile(r"[HQ]GMMA\.(\d+)x(\d+)x(\d+)\.F32(?:\.(\w+))?")
_HMMA = re.compile(r"HMMA\.(16)(8)(\d+)\.F32(?:\.(\w+))?")  # m16n8k16, m16n8k8
_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


@dataclass
class Instr:
    addr: int
    opcode: str
    operands: str


def parse_sass(sass: str) -> list[Instr]:
    """The instructions of a ``cuobjdump -sass`` listing (one function), in address order."""
    return [Instr(int(m.group(1), 16), m.group(2), m.group(3)) for m in _LINE.finditer(sass)]


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """``(first, last)`` instruction indices of every loop: a branch back to an earlier address. The branch
    may be uniform (``BRA.U``, which Blackwell's ptxas emits for loops whose trip count every thread shares).
    A span holding an ``EXIT`` is no loop: ptxas places the retry paths of mbarrier waits after the kernel's
    last ``EXIT``, and their branches back into the body would otherwise read as loops around it."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    exits = [i for i, ins in enumerate(instrs) if ins.opcode == "EXIT"]
    found = []
    for i, ins in enumerate(instrs):
        if ins.opcode.split(".")[0] == "BRA":
            target = _BRANCH.search(ins.operands)
            if target and int(target.group(1), 16) < ins.addr and int(target.group(1), 16) in index:
                first = index[int(target.group(1), 16)]
                if not any(first <= e <= i for e in exits):
                    found.append((first, i))
    return found


def innermost(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def mma_flops(opcode: str) -> tuple[int, bool]:
    """FLOPs of one tensor-core instruction as counted in a warp's stream, and whether it is a warpgroup
    (HGMMA: one m x n x k product per warpgroup) or per-warp (HMMA) instruction. tf32 counts double,
    as its rate is half of fp16's."""
    if m := _HGMMA.match(opcode):
        flops = 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        return flops * (2 if m.group(4) == "TF32" else 1), True
    if m := _HMMA.match(opcode):
        flops = 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        return flops * (2 if m.group(4) == "TF32" else 1), False
    return 0, False


def mma_rate(opcode: str) -> float:
    """An instruction's tensor-core rate relative to fp16's: 2 for 8-bit operands (QGMMA; H100's dense FP8
    is twice its fp16 figure), else 1 (tf32's half rate is already in :func:`mma_flops`)."""
    return 2.0 if opcode.startswith("QGMMA") else 1.0


def _load_bytes(ins: Instr) -> int:
    """Bytes one lane moves with a global load or store (vector width from the opcode)."""
    for width, nbytes in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in ins.opcode:
            return nbytes
    return 4


@dataclass
class LoopStats:
    instructions: int = 0
    hgmma: Counter = field(default_factory=Counter)  # warpgroup MMA (HGMMA, QGMMA): opcode -> count
    hmma: Counter = field(default_factory=Counter)
    tcgen05: int = 0  # Blackwell's tensor-core MMAs (UTCHMMA, UTCQMMA, ...): shapes in descriptors
    # the loop's tcgen05 products (M, N, K, operand bits), read from Triton's TTGIR by attach_tcgen05
    tcgen05_products: list = field(default_factory=list)
    mufu: int = 0
    fmul: int = 0
    ffma: int = 0
    waits: int = 0
    loads: int = 0
    global_bytes_per_lane: int = 0

    def executed_flops(self, num_warps: int) -> tuple[float, float]:
        """(warpgroup, per-warp) tensor-core FLOPs one CTA executes per iteration."""
        wg = sum(mma_flops(op)[0] * n for op, n in self.hgmma.items()) * num_warps / 4
        warp = sum(mma_flops(op)[0] * n for op, n in self.hmma.items()) * num_warps
        # tcgen05: one thread issues each MMA for the whole CTA tile
        return wg + sum(2 * m * n * k for m, n, k, _ in self.tcgen05_products), warp

    def tensor_clocks(self, num_warps: int, machine: "Machine") -> float:
        """Clocks one CTA-iteration keeps the SM's tensor cores busy, each instruction at its own rate."""
        wg_rate = machine.hgmma_flops_per_clock or machine.hmma_flops_per_clock
        wg = sum(mma_flops(op)[0] * n / mma_rate(op) for op, n in self.hgmma.items()) * num_warps / 4
        warp = sum(mma_flops(op)[0] * n for op, n in self.hmma.items()) * num_warps
        tc = sum(2 * m * n * k / (2.0 if bits == 8 else 1.0) for m, n, k, bits in self.tcgen05_products)
        return wg / wg_rate + warp / machine.hmma_flops_per_clock + (
            tc / machine.tcgen05_flops_per_clock if tc else 0.0)

    def shapes(self) -> str:
        """e.g. ``4*m64n128k16 8*m64n64k16``: count and shape of each tensor-core instruction."""
        out = []
        for op, n in sorted((self.hgmma + self.hmma).items()):
            if m := _HGMMA.match(op) or _HMMA.match(op):
                out.append(f"{n}*m{m.group(1)}n{m.group(2)}k{m.group(3)}")
        for shape, n in sorted(Counter(f"tc m{m}n{n}k{k}" for m, n, k, _ in self.tcgen05_products).items()):
            out.append(f"{n}*{shape}")
        return " ".join(out)


# tcgen05 (Blackwell) keeps an MMA's shape in its instruction descriptor, not in the SASS opcode. Triton's
# TTGIR names each product, ``ttng.tc_gen5_mma`` with its A (M x K) and B (K x N) memdesc types; one
# instruction covers up to 128 x 256 and K = 32 bytes (16 for 16-bit operands, 32 for 8-bit, 8 for tf32).
_TC_GEN5 = re.compile(r"ttng\.tc_gen5_mma\b.*?:\s*!ttg\.memdesc<(\d+)x(\d+)x(\w+?),.*?!ttg\.memdesc<(\d+)x(\d+)x(\w+?),")
_TC_BITS = {"bf16": 16, "f16": 16, "f32": 32}


def tcgen05_loops(ttgir: str) -> list[list[tuple[int, int, int, int]]]:
    """The (M, N, K, operand bits) of each ``tc_gen5_mma`` in ``ttgir``, grouped by the innermost
    ``scf.for`` that holds it (products outside every loop are left out)."""
    stack, loops = [], []
    for line in ttgir.splitlines():
        text = line.strip()
        if text.startswith("}"):
            closed = stack.pop() if stack else None
            if closed:
                loops.append(closed)
        if m := _TC_GEN5.search(text):
            bits = 8 if m.group(3).startswith("f8") else _TC_BITS.get(m.group(3), 16)
            loop = next((s for s in reversed(stack) if s is not None), None)
            if loop is not None:
                loop.append((int(m.group(1)), int(m.group(5)), int(m.group(2)), bits))
        if text.endswith("{"):
            stack.append([] if "scf.for" in text else None)
    return loops


def tcgen05_instructions(m: int, n: int, k: int, bits: int) -> int:
    """tcgen05 MMA instructions one product of this shape issues (one CTA, ``cta_group::1``)."""
    k_step = {8: 32, 16: 16, 32: 8}[bits]
    return -(-m // 128) * -(-n // 256) * -(-k // k_step)


def attach_tcgen05(stats: "LoopStats", ttgir: str) -> None:
    """Give ``stats`` (a steady loop's counts) the shapes of its tcgen05 products: the TTGIR loop whose
    products issue exactly as many MMA instructions as the SASS loop holds. None matches: left empty
    (the loop then counts no executed FLOPs, which the static check reports)."""
    for loop in tcgen05_loops(ttgir):
        if sum(tcgen05_instructions(*p) for p in loop) == stats.tcgen05:
            stats.tcgen05_products = list(loop)
            return


def region_stats(instrs: list[Instr]) -> LoopStats:
    st = LoopStats(instructions=len(instrs))
    for ins in instrs:
        op = ins.opcode
        if op.startswith(("HGMMA", "QGMMA")):
            st.hgmma[op] += 1
        elif op.startswith("HMMA"):
            st.hmma[op] += 1
        elif op.startswith("UTC") and op.split(".")[0].endswith("MMA"):
            st.tcgen05 += 1
        elif op.startswith("MUFU"):
            st.mufu += 1
        elif op.startswith("FMUL"):
            st.fmul += 1
        elif op.startswith("FFMA"):
            st.ffma += 1
        elif op.startswith("WARPGROUP.DEPBAR"):
            st.waits += 1
        if op.split(".")[0] in _LOADS:
            st.loads += 1
        if op.split(".")[0] in ("LDG", "STG", "LDGSTS"):
            st.global_bytes_per_lane += _load_bytes(ins)
    return st


def steady_loop(instrs: list[Instr]) -> tuple[LoopStats, bool]:
    """Counts of the steady-state loop, and whether the kernel has a loop at all (else: the whole kernel).

    Among innermost loops, those with tensor-core instructions win; of them the one with the fewest
    instructions (the split walk's interior loop, which skips the positional mask). Where no innermost
    loop holds MMAs (Blackwell's mbarrier waits nest spin loops in the MMA loop), the smallest loop of
    any depth that does. Without MMA loops, the largest innermost loop (a multi-pass kernel's row sweep)."""
    every = loops(instrs)
    spans = innermost(every)
    if not spans:
        return region_stats(instrs), False
    stats = [region_stats(instrs[a:b + 1]) for a, b in spans]
    mma = [s for s in stats if s.hgmma or s.hmma or s.tcgen05]
    if not mma:
        # tcgen05 kernels spin on mbarriers (try-wait loops) inside their MMA loop, which is then not
        # innermost: take the smallest loop of any depth that holds MMAs
        mma = [s for s in (region_stats(instrs[a:b + 1]) for a, b in every) if s.hgmma or s.hmma or s.tcgen05]
    if mma:
        return min(mma, key=lambda s: s.instructions), True
    return max(stats, key=lambda s: s.instructions), True


@dataclass
class Cost:
    """Clocks per CTA-iteration on one SM, and the two throughput figures in TFLOP/s."""
    t_tensor: float
    t_issue: float
    t_mufu: float
    serial_tflops: float
    overlap_tflops: float


def cost(stats: LoopStats, num_warps: int, useful_flops: float, arch: str) -> Cost:
    if arch not in MACHINES:
        return Cost(0.0, 0.0, 0.0, 0.0, 0.0)
    machine = MACHINES[arch]
    t_tensor = stats.tensor_clocks(num_warps, machine)
    t_issue = stats.instructions * num_warps / machine.issue_per_clock
    t_mufu = stats.mufu * 32 * num_warps / machine.mufu_per_clock
    per_second = machine.ghz * 1e9 * machine.sms / 1e12
    serial = useful_flops / (t_tensor + max(t_issue, t_mufu)) * per_second if useful_flops else 0.0
    overlap = useful_flops / max(t_tensor, t_issue, t_mufu) * per_second if useful_flops else 0.0
    return Cost(t_tensor, t_issue, t_mufu, serial, overlap)


def useful_flops(kernel: str, kwargs: dict) -> float:
    """FLOPs one CTA-iteration of ``kernel``'s steady loop needs by the algorithm (0: not a matmul kernel).

    Attention forward: S = Q K^T and O += P V over a BLOCK_M x BLOCK_N tile; dK/dV: S^T, dP^T, dV, dK;
    dQ: S, dP, dQ (FlashAttention-2, Alg. 2); the FFN matmul: one BLOCK_M x BLOCK_N x BLOCK_K step, two
    when the gate's product shares the loop."""
    g = kwargs.get
    if kernel == "_matmul_kernel":
        return 2 * g("BLOCK_M") * g("BLOCK_N") * g("BLOCK_K") * (2 if g("SECOND") == "dual_b" else 1)
    tile = 2 * (g("BLOCK_M") or 0) * (g("BLOCK_N") or 0)
    d, dv = g("BLOCK_D") or 0, g("BLOCK_DV") or 0
    return {"_attn_fwd_kernel": tile * (d + dv), "_attn_bwd_dkdv_kernel": tile * (2 * d + 2 * dv),
            "_attn_bwd_dq_kernel": tile * (2 * d + dv)}.get(kernel, 0.0)


def backward_tflops(head_dim: int, head_dim_v: int, dkdv_tflops: float, dq_tflops: float) -> float:
    """The attention backward's figure as the benchmarks count it: 2.5x the forward's FLOPs over the
    time of the dK/dV and dQ kernels together. Per unit of score tile the forward needs d + d_v, the
    dK/dV kernel 2d + 2d_v and the dQ kernel 2d + d_v (FLOPs / 2), each at its own kernel's rate."""
    if not (dkdv_tflops and dq_tflops):
        return 0.0
    fwd = head_dim + head_dim_v
    return 2.5 / ((2 * head_dim + 2 * head_dim_v) / fwd / dkdv_tflops + (2 * head_dim + head_dim_v) / fwd / dq_tflops)
