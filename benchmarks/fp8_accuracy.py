"""FP8 attention's accuracy, measured against its contract (issue 22, item 3).

Every figure is an RMSE against float64 attention of the original, unquantized inputs:

* ``fp8``: ``flash_attn_func`` on e4m3 inputs quantized per (batch, head) with FlashAttention-3's
  descales (``transformer_kernels.attention.fp8.quantize``);
* ``floor``: float64 attention of the dequantized e4m3 inputs, what quantizing the inputs alone costs.
  The contract is ``fp8 <= 2 x floor``;
* ``bf16``: ``flash_attn_func`` on the same inputs in bfloat16, for the README's comparison.

``python -m benchmarks.fp8_accuracy [--out FILE.json]`` prints one row per case. The cases are random
normal inputs and inputs with every 21st channel 100x larger (outliers, as LLM activations have).
Shapes are small, so the interpreter runs them on a CPU (``TRITON_INTERPRET=1``); on a GPU the compiled
kernel runs them. The arithmetic is the same either way, since e4m3 products are exact and P is rounded
as the GPU rounds it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

CASES = {  # name: (batch, seqlen, heads, heads_k, head_dim, causal, outliers)
    "random causal d64": (2, 256, 4, 4, 64, True, False),
    "random causal gqa d128": (2, 256, 8, 2, 128, True, False),
    "outliers causal d64": (2, 256, 4, 4, 64, True, True),
    "outliers full d128": (2, 256, 4, 2, 128, False, True),
}


def _attention64(q, k, v, causal: bool):
    from transformer_kernels.attention import attention_reference

    group = q.shape[2] // k.shape[2]
    q4, k4, v4 = (t.double().transpose(1, 2) for t in (q, k, v))
    k4, v4 = (t.repeat_interleave(group, 1) for t in (k4, v4))
    return attention_reference(q4, k4, v4, causal=causal, bottom_right=True).transpose(1, 2)


def _rmse(a, b) -> float:
    return ((a.double() - b) ** 2).mean().sqrt().item()


def errors(q, k, v, *, causal: bool = False) -> dict:
    """RMSE of the FP8 kernel, of the quantization floor and of bf16 attention, against float64 attention
    of ``q``, ``k``, ``v`` (flash-attention's layout, float32); and fp8 / floor."""
    import transformer_kernels as tk
    from transformer_kernels.attention import fp8

    true = _attention64(q, k, v, causal)
    (qf, qd), (kf, kd), (vf, vd) = fp8.quantize(q, group=q.shape[2] // k.shape[2]), fp8.quantize(k), fp8.quantize(v)
    out = tk.flash_attn_func(qf, kf, vf, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)
    deq = [fp8.dequantize(t, d, heads_dim=-2) for t, d in ((qf, qd), (kf, kd), (vf, vd))]
    floor = _rmse(_attention64(*deq, causal), true)
    bf16 = tk.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal)
    got = _rmse(out, true)
    return {"fp8": got, "floor": floor, "bf16": _rmse(bf16, true), "fp8_over_floor": got / floor,
            "path": tk.last_path("attention")}


def inputs(batch, seqlen, heads, heads_k, head_dim, outliers: bool, device="cpu", seed=0):
    """Random normal q, k, v in flash-attention's layout; with ``outliers`` every 21st channel x100."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen, heads, head_dim, generator=g)
    k, v = (torch.randn(batch, seqlen, heads_k, head_dim, generator=g) for _ in range(2))
    if outliers:
        for t in (q, k, v):
            t[..., ::21] *= 100
    return tuple(t.to(device) for t in (q, k, v))


def run(device: str = "cpu") -> list[dict]:
    rows = []
    for name, (batch, seqlen, heads, heads_k, head_dim, causal, outliers) in CASES.items():
        q, k, v = inputs(batch, seqlen, heads, heads_k, head_dim, outliers, device)
        rows.append({"case": name, **errors(q, k, v, causal=causal)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fp8_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the rows as JSON to this file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = run(args.device)
    print("| case | fp8 RMSE | floor RMSE | fp8 / floor | bf16 RMSE | fp8 / bf16 | path |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['fp8']:.3e} | {r['floor']:.3e} | {r['fp8_over_floor']:.3f} | {r['bf16']:.3e} | "
              f"{r['fp8'] / r['bf16']:.1f} | {r['path']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0 if all(r["fp8_over_floor"] <= 2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
