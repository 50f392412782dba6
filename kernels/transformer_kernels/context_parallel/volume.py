"""What one context-parallel attention call sends, counted from the code in :mod:`.ring` and
:mod:`.all_to_all` (not measured): bytes each rank sends per call, forward and backward."""

from __future__ import annotations


def communication_volume(strategy: str, *, batch: int, seqlen: int, num_heads: int, head_dim: int, world: int,
                         num_heads_k: int | None = None, head_dim_v: int | None = None,
                         element_bytes: int = 2) -> dict:
    """Bytes one rank sends in one attention call over ``seqlen`` global tokens split over ``world`` ranks.

    Ring: the forward passes each K/V block on ``world - 1`` times; the backward passes them on again and
    passes each block's float32 dK/dV accumulator ``world`` times (the last hop takes it home). All-to-all:
    each exchange keeps ``1 / world`` of a rank's tensor and sends the rest: q, k, v in and out plus the
    float32 logsumexp out in the forward; dO in and dq, dk, dv out in the backward (k/v heads repeated up
    to ``world`` when there are fewer). ``element_bytes``: 2 for fp16/bf16, 4 for fp32.

    Returns a dict: ``forward_bytes``, ``backward_bytes``, ``total_bytes``, ``steps`` (communication
    calls in the forward, one after another: ``world - 1`` ring hops, or 5 all-to-alls for q, k, v, the
    output and the logsumexp) and the arguments.
    """
    if strategy not in ("ring", "all_to_all"):
        raise ValueError(f"communication_volume: strategy must be 'ring' or 'all_to_all', got {strategy!r}")
    if world < 1 or seqlen % world:
        raise ValueError(f"communication_volume: seqlen {seqlen} must divide by world {world}")
    hk = num_heads if num_heads_k is None else num_heads_k
    dv = head_dim if head_dim_v is None else head_dim_v
    local = batch * (seqlen // world)  # tokens per rank
    e = element_bytes
    if strategy == "ring":
        kv = local * hk * (head_dim + dv)
        forward = (world - 1) * kv * e
        backward = (world - 1) * kv * e + world * kv * 4
        steps = world - 1
    else:
        hk = max(hk, world)  # fewer key/value heads than ranks are repeated
        part = (world - 1) / world
        forward = part * (local * (num_heads * head_dim + hk * (head_dim + dv) + num_heads * dv) * e
                          + local * num_heads * 4)
        backward = part * local * (num_heads * dv + num_heads * head_dim + hk * (head_dim + dv)) * e
        steps = 5
    return dict(strategy=strategy, batch=batch, seqlen=seqlen, num_heads=num_heads, num_heads_k=num_heads_k or num_heads,
                head_dim=head_dim, head_dim_v=dv, world=world, element_bytes=e, forward_bytes=int(forward),
                backward_bytes=int(backward), total_bytes=int(forward + backward), steps=steps)
