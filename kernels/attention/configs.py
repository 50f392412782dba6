"""Launch configurations of the attention kernels: block sizes, warps, stages, and the key split of
decoding. Every shipped entry is checked for spills and tensor-core use by ``python -m kernels.static_check``."""

from __future__ import annotations

import torch
import triton

from .. import dispatch


def _config(block_d: int, dtype: torch.dtype, seqlen_q: int, heavy: bool) -> dict:
    """Forward block sizes and launch shape for a head_dim padded to ``block_d``.

    Half precision: 128 query rows per program feed the tensor cores; 64 keys per step bound the fp32
    score tile; head_dim 256 halves both so the accumulator stays in registers. ``heavy`` (dropout's
    Philox state, a loaded mask, ALiBi or soft-capping live beside the score tile) takes smaller or
    wider-spread tiles. Decoding (seqlen_q <= 16) uses 16-row blocks so no program computes on padding
    rows. True fp32 has no tensor-core path and Triton's FMA dot holds whole operand rows per thread,
    so its tiles are small. Every entry compiles without spills for sm_80 and sm_90a
    (``python -m kernels.static_check``). Interpreter: 32x32 blocks (16 rows when decoding), so small
    test shapes cross several blocks.
    """
    decode = seqlen_q <= 16
    if dispatch.INTERPRETER:
        return dict(BLOCK_M=16 if decode else 32, BLOCK_N=32, num_warps=4, num_stages=1)
    if decode:
        if dtype == torch.float32:
            return dict(BLOCK_M=16, BLOCK_N=32 if block_d <= 64 else 16, num_warps=4, num_stages=2)
        return dict(BLOCK_M=16, BLOCK_N=64 if block_d <= 128 else 32, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2) if block_d <= 64 else \
            dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if heavy else 4, num_stages=2 if heavy else 3)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2) if heavy else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if heavy else 4, num_stages=2)


def _bwd_configs(block_d: int, dtype: torch.dtype, heavy: bool) -> tuple[dict, dict]:
    """Backward blocks as ``(dK/dV kernel, dQ kernel)``. Each program holds two fp32 accumulators (one
    for dQ) and five operand tiles, so tiles are smaller than the forward's; same no-spill rule.

    The rows of every product are the program's own block: keys (BLOCK_N) in the dK/dV kernel, queries
    (BLOCK_M) in the dQ kernel. On sm_90a Triton emits warpgroup MMA (HGMMA) only when those rows are a
    multiple of 64 with whole warpgroups (4 warps), so that block is 64 or 128 and the streamed one
    small, as in FlashAttention-2's backward (Dao, 2023, Sec. 3.2) and the Triton fused-attention
    tutorial. ``python -m kernels.static_check`` reports the HGMMA count of each.
    """
    if dispatch.INTERPRETER:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
        return cfg, cfg
    if dtype == torch.float32:  # no tensor cores: the FMA dot wants small square tiles
        if heavy:
            cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        else:
            cfg = dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=2) if block_d <= 64 else \
                dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
        return cfg, cfg
    if block_d > 128:  # two 64x256 fp32 accumulators would spill: small square tiles, mma.sync
        cfg = dict(BLOCK_M=16 if heavy else 32, BLOCK_N=32, num_warps=8, num_stages=2)
        return cfg, cfg
    own, streamed = (64, 16) if heavy else (64, 32)  # heavy: Philox state, mask, ALiBi beside the tile
    # 4 warps only at head_dim 64: at 32 the split walk (see _walk) needs a stack frame on sm_80 with 4.
    warps = 4 if block_d == 64 and not heavy else 8
    stages = 1 if heavy and block_d > 64 else 2  # sm_80's cp.async pipeline costs the registers it lacks
    dkdv = dict(BLOCK_M=streamed, BLOCK_N=own, num_warps=warps, num_stages=stages)
    dq = dict(BLOCK_M=own, BLOCK_N=streamed, num_warps=warps, num_stages=stages)
    return dkdv, dq


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
