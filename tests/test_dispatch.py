"""The dispatch rule: CUDA -> Triton; CPU + interpreter -> Triton; CPU otherwise -> the PyTorch path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import transformer_kernels as tk

ROOT = Path(__file__).resolve().parents[1]

_CPU_SCRIPT = r"""
import json, torch, transformer_kernels
from transformer_kernels.attention import attention_reference
from transformer_kernels.ffn import ffn_reference
from transformer_kernels.layer_norm import layer_norm_reference
torch.manual_seed(0)
q, k, v = (torch.randn(2, 3, 11, 16, requires_grad=True) for _ in range(3))
out = transformer_kernels.scaled_dot_product_attention(q, k, v, is_causal=True)
out.sum().backward()
x, w, b = torch.randn(5, 24), torch.randn(24), torch.randn(24)
y = transformer_kernels.layer_norm(x, 24, w, b)
w1, b1, w2, b2 = torch.randn(40, 24), torch.randn(40), torch.randn(24, 40), torch.randn(24)
z = transformer_kernels.ffn(x, w1, b1, w2, b2, activation="gelu")
err = lambda a, r: ((a - r).norm() / r.norm()).item()
fq, fk, fv = (t.detach().transpose(1, 2) for t in (q, k, v))
flash = transformer_kernels.flash_attn_func(fq, fk, fv, causal=True, window_size=(4, -1), softcap=3.0)
flash_ref = attention_reference(q, k, v, causal=True, bottom_right=True, window=(4, -1), softcap=3.0).transpose(1, 2)
cu = torch.tensor([0, 5, 11], dtype=torch.int32)
packed = transformer_kernels.flash_attn_varlen_func(fq[0], fk[0], fv[0], cu, cu, 6, 6, causal=True)
packed_ref = torch.cat([transformer_kernels.flash_attn_func(fq[:, a:b], fk[:, a:b], fv[:, a:b], causal=True)[0]
                        for a, b in ((0, 5), (5, 11))])
cache = transformer_kernels.flash_attn_with_kvcache(fq[:, -1:], fk, fv, cache_seqlens=7, causal=True)
cache_ref = transformer_kernels.flash_attn_func(fq[:, -1:], fk[:, :7], fv[:, :7], causal=True)
print(json.dumps({
    "paths": {op: transformer_kernels.last_path(op) for op in ("attention", "layer_norm", "ffn")},
    "launches": transformer_kernels.launch_counts(),
    "interpreter": transformer_kernels.dispatch.INTERPRETER,
    "errors": [err(out, attention_reference(q, k, v, causal=True)), err(y, layer_norm_reference(x, 24, w, b)),
               err(z, ffn_reference(x, w1, b1, w2, b2, "gelu")), err(flash, flash_ref), err(packed, packed_ref),
               err(cache, cache_ref)],
    "grad_finite": bool(torch.isfinite(q.grad).all()),
}))
"""


def test_cpu_without_interpreter_takes_the_torch_path():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(ROOT / "kernels"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", _CPU_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["interpreter"] is False
    assert result["paths"] == {"attention": "torch", "layer_norm": "torch", "ffn": "torch"}
    assert result["launches"] == {}, "no Triton kernel may launch on the PyTorch path"
    assert max(result["errors"]) < 1e-5 and result["grad_finite"]


def test_interpreter_takes_the_triton_path(device):
    x = torch.randn(3, 8, device=device)
    before = tk.launch_count("layer_norm_fwd")
    tk.layer_norm(x, 8)
    assert tk.last_path("layer_norm") == "triton"
    assert tk.launch_count("layer_norm_fwd") == before + 1


def test_last_path_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown op"):
        tk.last_path("conv")
