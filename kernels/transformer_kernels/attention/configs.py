"""Launch configurations of the attention kernels: block sizes, warps, stages, and the key split of
decoding. Every shipped entry is checked for spills and tensor-core use by ``python -m transformer_kernels.static_check``."""

from __future__ import annotations

import json
import os

import torch
import triton

from .. import dispatch


def _pinned(kind: str) -> dict | None:
    """The config that ``KERNELS_ATTENTION_CONFIG`` pins for ``kind`` ("fwd", "dkdv" or "dq"), or None.

    The variable holds a JSON object such as ``{"fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8,
    "num_stages": 2}}``; each may add ``"TMA": true`` (tensor descriptors, used where the inputs
    qualify), the forward ``"PERSISTENT": true`` (see :func:`fwd_candidates`). A pin replaces the
    candidate lists for every call, decoding and the interpreter included: a GPU session compares
    candidates with it. Raises ``ValueError`` for a malformed value."""
    text = os.environ.get("KERNELS_ATTENTION_CONFIG")
    if not text:
        return None
    try:
        pins = json.loads(text)
        if not isinstance(pins, dict) or not set(pins) <= {"fwd", "dkdv", "dq"}:
            raise ValueError
        for pinned_kind, cfg in pins.items():
            if not isinstance(cfg, dict):
                raise ValueError
            flags = {"TMA": cfg.pop("TMA", False)}
            if pinned_kind == "fwd":
                flags["PERSISTENT"] = cfg.pop("PERSISTENT", False)
            if set(cfg) != set(_CONFIG_KEYS) or not all(type(cfg[k]) is int and cfg[k] > 0 for k in cfg) or \
                    not all(type(f) is bool for f in flags.values()):
                raise ValueError
            if any(cfg[k] & (cfg[k] - 1) for k in ("BLOCK_M", "BLOCK_N", "num_warps")) or \
                    min(cfg["BLOCK_M"], cfg["BLOCK_N"]) < 16:
                raise ValueError
            cfg.update(flags)
    except (ValueError, TypeError):
        raise ValueError(f"KERNELS_ATTENTION_CONFIG must be a JSON object mapping 'fwd', 'dkdv' or 'dq' to positive "
                         f"integer {', '.join(_CONFIG_KEYS)} (blocks and warps powers of two, blocks >= 16; each "
                         f"may add \"TMA\" and 'fwd' \"PERSISTENT\", true or false); got {text!r}") from None
    return pins.get(kind)


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def fwd_candidates(block_d: int, dtype: torch.dtype, seqlen_q: int, heavy: bool, arch: str = "sm_80",
                   varlen: bool = False) -> list[dict]:
    """The forward's launch candidates, the default (:func:`_config`) first; the device picks among them
    (:func:`transformer_kernels.autotune.choose`). ``TMA`` True loads K and V through tensor descriptors (sm_90a,
    inputs with a contiguous head_dim and 16-byte aligned strides; the launcher drops it otherwise): one
    TMA instruction per tile instead of per-thread addresses and masks, and fewer registers (static
    check: d128 546 -> 513 loop instructions, 645 -> 653 in the model; d256 254 -> 206 registers, which
    lets a 64x64 tile fit: 538 -> 685). ``PERSISTENT`` True: one program per SM walks the tiles, the
    longest causal rows first (FlashAttention-3's schedule). Their sign on a real GPU is for the device
    to tell, so they are candidates, not the default. Triton before 3.7 gets the default alone
    (:func:`transformer_kernels.dispatch.hopper_candidates`). sm_100a: the default (sm_80's tile), Hopper's
    tile where it compiles spill-free there (FP8 included), and from Triton 3.7 the default through TMA at
    head_dim > 64.
    A pin is the only candidate."""
    if (pin := _pinned("fwd")) is not None:
        return [pin]
    default = dict(_config(block_d, dtype, seqlen_q, heavy, arch), TMA=False, PERSISTENT=False)
    if arch == "sm_100a" and dtype != torch.float32 and not dispatch.INTERPRETER:
        # Blackwell: sm_80's tile by default, Hopper's where it compiles there spill-free (static check
        # --arch sm_100a: in half precision its 128x128 tile spills at head_dim 128, 139 instructions, and
        # so does the packed-batch kernel's at 64, 93; FP8's 8-bit operands fit: d128 242 registers, and
        # the model's 1255 -> 1488 serial TFLOP/s, benchmarks/NOTES.md)
        hopper = dict(_config(block_d, dtype, seqlen_q, heavy, "sm_90a"), TMA=False, PERSISTENT=False)
        fits = not varlen and (dtype == torch.float8_e4m3fn or block_d != 128)
        found = [default] + ([hopper] if hopper != default and fits else [])
        if dispatch.hopper_candidates() and block_d > 64:
            # the default through TMA descriptors: d128's loop 360 -> 338 instructions, d256's 427 -> 375,
            # spill-free; at head_dim 64 the 8-warp tile spills with them (6 instructions)
            found.append(dict(default, TMA=True))
        return found
    if dtype == torch.float8_e4m3fn and arch == "sm_90a" and seqlen_q > 16 and not dispatch.INTERPRETER:
        # FP8 prefill: V copied head_dim-major once per call (``V_T``; the launcher drops it for pages and
        # for a V that already is): Hopper's 8-bit MMA reads B only K-major, and transposing flash
        # layout's V tiles in the loop costs 97 of its 649 instructions at d=128 (static check: 552)
        return [default, dict(default, V_T=True)]
    if dispatch.INTERPRETER or arch != "sm_90a" or dtype in (torch.float32, torch.float8_e4m3fn):
        return [default]
    if not dispatch.hopper_candidates():
        return [default]
    candidates = [default, dict(default, TMA=True)]
    if seqlen_q > 16 and not heavy and block_d > 128:
        candidates.append(dict(default, BLOCK_N=64, TMA=True))
    if seqlen_q > 16 and block_d <= 128:  # decoding splits the keys instead; head_dim 256 spills
        candidates.append(dict(default, TMA=True, PERSISTENT=True))
    return candidates


def _config(block_d: int, dtype: torch.dtype, seqlen_q: int, heavy: bool, arch: str = "sm_80") -> dict:
    """Forward block sizes and launch shape for a head_dim padded to ``block_d`` on ``arch``
    (:func:`transformer_kernels.dispatch.target_arch`).

    Half precision: 128 query rows per program feed the tensor cores. On sm_90a a 128x128 score tile
    over 8 warps (each warpgroup owns 64 rows) halves the per-FLOP cost of the row statistics and the
    accumulator rescale against 64 keys per step (static check, benchmarks/NOTES.md); sm_80's 164 KB of
    shared memory and register file take 64 keys. head_dim 256 halves both so the accumulator stays in
    registers. ``heavy`` (dropout's Philox state, a loaded mask, ALiBi or soft-capping live beside the
    score tile) takes smaller or wider-spread tiles. Decoding (seqlen_q <= 16) uses 16-row blocks so no
    program computes on padding rows. True fp32 has no tensor-core path and Triton's FMA dot holds whole
    operand rows per thread, so its tiles are small. Every entry compiles without spills for its arch
    (``python -m transformer_kernels.static_check``). Interpreter: 32x32 blocks (16 rows when decoding), so small
    test shapes cross several blocks. ``KERNELS_ATTENTION_CONFIG`` overrides all of it (:func:`_pinned`).
    """
    if (pin := _pinned("fwd")) is not None:
        return pin
    decode = seqlen_q <= 16
    if dispatch.INTERPRETER:
        return dict(BLOCK_M=16 if decode else 32, BLOCK_N=32, num_warps=4, num_stages=1)
    if decode:
        if dtype == torch.float32:
            return dict(BLOCK_M=16, BLOCK_N=32 if block_d <= 64 else 16, num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=64 if block_d <= 128 else 32, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # with every modifier, 8 warps at head_dim 128 spill on sm_90a (static check)
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2) if block_d <= 64 else \
            dict(BLOCK_M=32, BLOCK_N=16, num_warps=4 if heavy else 8, num_stages=2)
    if arch == "sm_90a" and not heavy and block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2)
    if block_d <= 64:  # 4 warps x 32 rows spill on sm_80 in the packed-batch (varlen) kernel; 8 x 16 do not
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2 if heavy else 3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2) if heavy else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if heavy else 4, num_stages=2)


def bwd_candidates(block_d: int, dtype: torch.dtype, heavy: bool, arch: str = "sm_80",
                   varlen: bool = False) -> tuple[list[dict], list[dict]]:
    """The backward's candidates as ``(dK/dV kernel, dQ kernel)`` lists, each default first (:func:`_bwd_configs`);
    the device picks for each kernel on its own. On sm_90a: the default reading its streamed tiles (Q and
    dO, or K and V) through TMA tensor descriptors; at head_dim 128 the alternatives hold two
    stages over 16 streamed rows (dK/dV) and two warpgroups of 64 own rows (dQ); at head_dim 64, one
    warpgroup (static check: spill-free, executed == useful tensor FLOPs); the TMA ones only from Triton 3.7
    (:func:`transformer_kernels.dispatch.hopper_candidates`). On sm_100a: sm_80's tiles, Hopper's up to head_dim
    128, and from Triton 3.7 the defaults through TMA. A pin is the only candidate."""
    dkdv, dq = (dict(cfg, TMA=False) for cfg in _bwd_configs(block_d, dtype, heavy, arch))
    pins = _pinned("dkdv"), _pinned("dq")
    dkdv_list, dq_list = [dkdv], [dq]
    if arch == "sm_100a" and dtype != torch.float32 and not dispatch.INTERPRETER:
        if block_d <= 128:
            # Blackwell: sm_80's tiles by default, Hopper's as candidates (spill-free there, static check;
            # at head_dim 256 they are sm_80's but for the heavy dK/dV's two stages, which spill there)
            hopper_dkdv, hopper_dq = (dict(cfg, TMA=False) for cfg in _bwd_configs(block_d, dtype, heavy, "sm_90a"))
            dkdv_list += [hopper_dkdv] if hopper_dkdv != dkdv else []
            dq_list += [hopper_dq] if hopper_dq != dq else []
        if dispatch.hopper_candidates():  # the defaults' streamed tiles through TMA (fewer instructions)
            if not (varlen and block_d == 128):  # the packed-batch dK/dV spills with them there (8 instructions)
                dkdv_list.append(dict(dkdv, TMA=True))
            dq_list.append(dict(dq, TMA=True))
    if arch == "sm_90a" and dtype != torch.float32 and not dispatch.INTERPRETER:
        if dispatch.hopper_candidates():
            dkdv_list.append(dict(dkdv, TMA=True))  # Q and dO through descriptors
            dq_list.append(dict(dq, TMA=True))  # K and V
        if block_d == 128 and not heavy:
            dkdv_list.append(dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, TMA=False))
            dq_list.append(dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=1, TMA=False))
        elif block_d <= 64 and not heavy:
            dkdv_list.append(dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2, TMA=False))
            dq_list.append(dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, TMA=False))
    return [pins[0]] if pins[0] else dkdv_list, [pins[1]] if pins[1] else dq_list


def _bwd_configs(block_d: int, dtype: torch.dtype, heavy: bool, arch: str = "sm_80") -> tuple[dict, dict]:
    """Backward blocks as ``(dK/dV kernel, dQ kernel)`` on ``arch``. Each program holds two fp32
    accumulators (one for dQ) and five operand tiles, so tiles are smaller than the forward's; same
    no-spill rule, and ``KERNELS_ATTENTION_CONFIG`` overrides them the same way.

    The rows of every product are the program's own block: keys (BLOCK_N) in the dK/dV kernel, queries
    (BLOCK_M) in the dQ kernel, as in FlashAttention-2's backward (Dao, 2023, Sec. 3.2). Tensor cores
    split those rows among the warps: 16 per warp for mma.sync, 64 per warpgroup (4 warps) for Hopper's
    HGMMA. So the own block is at least 16 x num_warps rows on sm_80 and 64 x num_warps / 4 on sm_90a:
    with more warps, two warpgroups would both compute the whole score and dP tiles (the static check's
    executed vs useful FLOPs; issue 12 found 1.5x and 1.67x).
    """
    pins = _pinned("dkdv"), _pinned("dq")
    if dispatch.INTERPRETER:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return pins[0] or cfg, pins[1] or dict(cfg)
    dkdv, dq = _bwd_table(block_d, dtype, heavy, arch)
    return pins[0] or dkdv, pins[1] or dq


def _bwd_table(block_d: int, dtype: torch.dtype, heavy: bool, arch: str) -> tuple[dict, dict]:
    def pair(own_dkdv, streamed_dkdv, warps_dkdv, stages_dkdv, own_dq, streamed_dq, warps_dq, stages_dq):
        return (dict(BLOCK_M=streamed_dkdv, BLOCK_N=own_dkdv, num_warps=warps_dkdv, num_stages=stages_dkdv),
                dict(BLOCK_M=own_dq, BLOCK_N=streamed_dq, num_warps=warps_dq, num_stages=stages_dq))

    if dtype == torch.float32:  # no tensor cores: the FMA dot wants small square tiles
        if heavy:  # two stages at head_dim <= 64: one spills on sm_80 (dK/dV with the soft-cap's tanh, dQ
            # writing a learned mask's gradient); above 64 two dQ stages spill on sm_90a (static check)
            return pair(16, 16, 4, 2 if block_d <= 64 else 1, 16, 16, 4, 2 if block_d <= 64 else 1)
        if block_d <= 64:  # at head_dim 32 the dK/dV kernel's unmasked interior loads spill with 2 stages
            return pair(16, 32, 8, 1 if block_d <= 32 else 2, 32, 16, 8, 2)
        # At head_dim 256 two dK/dV stages spill on sm_80 once P is normalized by the row sums (static check).
        return pair(16, 16, 4, 2 if block_d <= 128 else 1, 16, 16, 4, 2)
    if block_d > 128:
        # Two fp32 accumulators of own x 256 cost 16 x own / warps registers per thread: 16 own rows
        # over 4 warps (mma.sync; the warps split head_dim, so no product is computed twice). With every
        # modifier the dK/dV kernel needs 8 warps over 32 keys (known 2.5x tensor work, no spills).
        # (One stage on sm_100a: two spill there, static check --arch sm_100a.)
        dkdv = (32, 16, 8, 1 if arch == "sm_100a" else 2) if heavy else (16, 32, 4, 2)
        return pair(*dkdv, 16, 32, 4, 2)
    if arch == "sm_90a":
        if heavy:  # Philox state, mask, ALiBi beside the tile: one warpgroup, 16 streamed rows
            return pair(64, 16, 4, 1, 64, 16, 4, 1)
        if block_d <= 64:
            return pair(128, 32, 8, 2, 128, 32, 4, 2)
        # head_dim 128: one warpgroup over 64 keys holds two 64x128 fp32 accumulators; 2 stages spill it.
        return pair(64, 32, 4, 1, 64, 64, 4, 2)
    if heavy:  # 4 warps x 16 rows; at head_dim 128 the registers take 8 (known 1.5x / 1.67x tensor work)
        warps, stages = (8, 1) if block_d > 64 else (4, 2)
        return pair(64, 16, warps, stages, 64, 16, warps, stages)
    if block_d <= 64:  # 4 warps x 16 rows; at head_dim 32 the split walk needs a stack frame with 4 warps
        return pair(64, 32, 4, 2, 64, 32, 4, 2) if block_d == 64 else pair(128, 32, 8, 2, 128, 32, 8, 2)
    return pair(128, 32, 8, 2, 64, 32, 4, 2)


# The row sums dO.O are memory-bound; 64 rows x 8 warps stays spill-free up to fp32 head_dim 256.
_DELTA_BLOCK_M = 64
_MAX_SPLITS = 64


def _num_splits(requested: int, programs: int, seqlen_k: int, block_n: int, device: torch.device) -> int:
    """How many slices the keys are cut into (flash-decoding). ``requested`` > 0 is honoured (capped
    at one key block per slice); 0 picks enough slices to give every SM about two programs when the
    query blocks alone cannot, keeping at least four key blocks per slice."""
    key_blocks = triton.cdiv(max(seqlen_k, 1), block_n)
    if requested > 0:
        return max(1, min(requested, key_blocks, _MAX_SPLITS))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), key_blocks // 4, _MAX_SPLITS))
