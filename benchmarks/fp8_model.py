"""What FP8 feed-forward inference costs a trained model (issue 22, item 2): ``quantize_fp8`` in one call.

The model is this library's ``TransformerLM`` trained by ``python -m transformer.train`` (a byte-level
language model; the checkpoint is an argument, or the script trains one first). It is evaluated on
held-out validation windows of its corpus three ways:

* ``fp32``: float32 weights, the PyTorch path (the reference for every error below);
* ``bf16``: the model cast to bfloat16 on the kernels (``backend="triton"``);
* ``fp8``: the bf16 model after ``transformer_kernels.quantize_fp8``: every FFN's weights in e4m3 with
  per-output-channel scales, both FFN products on FP8 tensor cores with per-token activation scales.

Reported per variant: the validation cross-entropy (bits per byte), the logits' relative error
``||logits - logits_fp32|| / ||logits_fp32||``, and the share of positions whose top-1 prediction
matches fp32's. ``path`` says where the FFN ran (``triton``: the kernels, compiled on a GPU or under
``TRITON_INTERPRET=1``; ``torch``: the dequantized reference).

``python -m benchmarks.fp8_model [--checkpoint CKPT] [--batches N] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


def _train(out: Path, steps: int) -> Path:
    from transformer.train import main as train_main

    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_main(["--model", "lm", "--preset", "small", "--steps", str(steps), "--device", device, "--backend", "torch",
                "--out", str(out), "--no-progress", "--save-every", str(10 * steps)])
    return out / "checkpoint.pt"


def _windows(model, batches: int, batch_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    from transformer.data import LMBatcher, load_corpus

    corpus = load_corpus()
    return LMBatcher(corpus.val, batch_size, seq_len).fixed_batches(batches, seed)


def evaluate(model, windows, device) -> tuple[torch.Tensor, float]:
    """Logits (float32, stacked) and the mean next-byte cross-entropy in bits."""
    logits, losses = [], []
    with torch.inference_mode():
        for w in windows:
            w = w.to(device)
            out = model(w[:, :-1]).float()
            logits.append(out.cpu())
            losses.append(F.cross_entropy(out.flatten(0, 1), w[:, 1:].flatten()).item())
    return torch.cat(logits), sum(losses) / len(losses) / math.log(2)


def run(checkpoint: Path, *, batches: int = 2, batch_size: int = 4, seq_len: int = 128, seed: int = 0) -> dict:
    import transformer_kernels as tk
    from transformer.checkpoint import load_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference, saved = load_checkpoint(checkpoint, backend="torch")
    reference = reference.to(device).eval()
    windows = _windows(reference, batches, batch_size, seq_len, seed)
    rows = {}
    ref_logits, ref_bits = evaluate(reference, windows, device)
    rows["fp32"] = {"bits_per_byte": ref_bits, "logits_rel_error": 0.0, "top1_agreement": 1.0, "path": "torch"}

    model, _ = load_checkpoint(checkpoint, backend="triton")
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    for name in ("bf16", "fp8"):
        if name == "fp8":
            report = tk.quantize_fp8(model)
        logits, bits = evaluate(model, windows, device)
        rows[name] = {"bits_per_byte": bits,
                      "logits_rel_error": ((logits - ref_logits).norm() / ref_logits.norm()).item(),
                      "top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
                      "path": tk.last_path("ffn")}
    metrics = Path(checkpoint).with_name("metrics.json")  # transformer.train's record of the run, if beside it
    trained = json.loads(metrics.read_text()).get("args") if metrics.exists() else None
    return {"checkpoint": str(checkpoint), "trained_with": trained, "step": saved.get("step"), "config": saved["config"],
            "windows": f"{batches} x {batch_size} validation windows of {seq_len} bytes (seed {seed})",
            "quantized": report.quantized, "device": str(device), "torch": torch.__version__,
            "interpreter": tk.dispatch.INTERPRETER, "results": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fp8_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a transformer.train checkpoint (default: train one)")
    p.add_argument("--train-steps", type=int, default=800, help="steps when training one (default 800)")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or _train(Path(tmp), args.train_steps)
        result = run(checkpoint, batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len)
    for name, row in result["results"].items():
        print(f"{name:5s} {row['bits_per_byte']:.4f} bits/byte  logits rel. error {row['logits_rel_error']:.2e}  "
              f"top-1 agreement {row['top1_agreement']:.4f}  ({row['path']})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
