"""Suite ``kernels``: each fused kernel against PyTorch eager and ``torch.compile`` in the same run.

* LayerNorm forward + backward over hidden sizes and row counts, in GB/s (bytes: x and y forward; x,
  dy and dx backward) and as a share of the copy bandwidth this run measured;
* the FFN forward + backward over d_model (d_ff = 4 d_model), in TFLOP/s (12 tokens d_model d_ff) and as
  a share of the measured matmul rate, with the activation memory each keeps for its backward; ours
  both with fused Triton products and on cuBLAS with one fused elementwise kernel;
* attention forward + backward at the paper-scale shapes of the GPU targets, in TFLOP/s;
* inference forwards in FP8 (e4m3) against bf16: attention (and the Triton tutorial's FP8 forward, given
  a copy of it) and the FFN, prefill and decode;
* a training step of the paper's base Transformer (forward, loss, backward, Adam) in tokens/s.

Our kernels are timed on CUDA only (on a CPU they would run in Triton's interpreter); the CPU run
times the PyTorch peers at small sizes, which keeps the suite itself tested. ``--sections`` picks
and orders the sections; a SIGINT ends the run with a report of what was measured.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import transformer_kernels as tk

from .attention_cost import attention_flops
from .measure import device_limits, is_oom, time_fn

SECTIONS = ("layer_norm", "ffn", "attention", "attention_fp8", "ffn_fp8", "training_step")
NOT_ON_CPU = "not timed: no CUDA device (on a CPU the kernels run in Triton's interpreter)"


@dataclass(frozen=True)
class Config:
    layer_norm_rows: tuple[int, ...] = (1024, 4096, 16384)
    layer_norm_widths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    ffn_widths: tuple[int, ...] = (1024, 2048, 4096)
    ffn_tokens: int = 8192
    ffn_activations: tuple[str, ...] = ("relu", "gelu_tanh", "swiglu")
    attention_shapes: tuple[tuple[int, int, int, int, bool], ...] = (  # batch, heads, seqlen, head_dim, causal
        (2, 16, 8192, 128, True), (2, 32, 8192, 64, False), (1, 16, 131072, 128, True))
    step_batch: tuple[int, int] = (32, 256)  # sentences x tokens per training step
    dtype: str = "bfloat16"
    compile_peers: bool = True
    sections: tuple[str, ...] = SECTIONS  # which to run, in this order
    tutorial_attention: str | None = None  # a copy of Triton's python/tutorials/06-fused-attention.py

    @classmethod
    def for_device(cls, device: str, quick: bool = False, **overrides) -> "Config":
        if device == "cuda":
            base = dict(layer_norm_rows=(4096,), layer_norm_widths=(4096,), ffn_widths=(1024,),
                        attention_shapes=((2, 16, 2048, 128, True),)) if quick else {}
        else:
            base = dict(layer_norm_rows=(256,), layer_norm_widths=(512, 2048), ffn_widths=(128,), ffn_tokens=256,
                        ffn_activations=("relu", "swiglu"), attention_shapes=((1, 4, 256, 64, True),),
                        step_batch=(4, 32), dtype="float32", compile_peers=not quick)
            if quick:
                base.update(layer_norm_widths=(512,))
        return cls(**{**base, **overrides})


def _timed(label, fn, device, **info) -> dict:
    """{peer, status, time} for one peer; failures and out-of-memory are reported, not raised."""
    row = dict(peer=label, **info)
    if fn is None:
        return {**row, "status": NOT_ON_CPU}
    try:
        row.update(time=time_fn(fn, device), status="measured")
    except Exception as error:  # noqa: BLE001
        row["status"] = "out of memory" if is_oom(error) else f"failed: {type(error).__name__}: {error}"[:200]
    return row


def _compiled(fn, cfg: Config):
    return torch.compile(fn) if cfg.compile_peers else None


# --------------------------------------------------------------------------------------------------
def layer_norm_rows(cfg: Config, device: str, dtype, limits: dict) -> Iterator[dict]:
    for m in cfg.layer_norm_rows:
        for n in cfg.layer_norm_widths:
            x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
            w, b = torch.ones(n, device=device, dtype=dtype, requires_grad=True), torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn_like(x)

            def step(norm):
                return lambda: norm(x, (n,), w, b).backward(dy)

            nbytes = 5 * m * n * x.element_size()
            peers = {"ours (Triton)": step(tk.layer_norm) if device == "cuda" else None,
                     "torch eager": step(F.layer_norm)}
            compiled = _compiled(F.layer_norm, cfg)
            if compiled is not None:
                peers["torch.compile"] = step(compiled)
            for label, fn in peers.items():
                row = _timed(label, fn, device, rows=m, width=n, bytes=nbytes)
                if row["status"] == "measured":
                    row["gb_per_s"] = nbytes / row["time"]["median_s"] / 1e9
                    row["pct_of_copy_bandwidth"] = 100 * row["gb_per_s"] / limits["copy_gb_per_s"]
                yield row


# --------------------------------------------------------------------------------------------------
def _eager_ffn(activation):
    act = {"relu": F.relu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "silu": F.silu}

    def run(x, w1, b1, w2, b2, wg):
        if activation == "swiglu":
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, w1, b1), w2, b2)
        return F.linear(act[activation](F.linear(x, w1, b1)), w2, b2)

    return run


def _saved_bytes(fn, exclude) -> int:
    """Bytes of the tensors autograd keeps for the backward, not counting the inputs and weights."""
    known = {t.data_ptr() for t in exclude if t is not None}
    total = []

    def pack(t):
        if t.data_ptr() not in known:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def ffn_rows(cfg: Config, device: str, dtype, limits: dict) -> Iterator[dict]:
    for d_model in cfg.ffn_widths:
        d_ff, tokens = 4 * d_model, cfg.ffn_tokens
        for activation in cfg.ffn_activations:
            gated = activation == "swiglu"
            make = lambda *s: (torch.randn(*s, device=device, dtype=dtype) / s[-1] ** 0.5).requires_grad_()  # noqa: E731
            x, w1, w2 = make(tokens, d_model), make(d_ff, d_model), make(d_model, d_ff)
            b1, b2 = make(d_ff), make(d_model)
            wg = make(d_ff, d_model) if gated else None
            dy = torch.randn(tokens, d_model, device=device, dtype=dtype)
            flops = (3 if gated else 2) * 2 * tokens * d_model * d_ff * 3  # forward + backward (2x forward)

            def ours(gemm):
                return lambda: tk.ffn(x, w1, b1, w2, b2, activation, weight_gate=wg, gemm=gemm)

            eager = _eager_ffn(activation)
            variants = {"ours (fused Triton GEMMs)": ours("triton") if device == "cuda" else None,
                        "ours (cuBLAS + fused elementwise)": ours("torch") if device == "cuda" else None,
                        "ours, recompute": (lambda: tk.ffn(x, w1, b1, w2, b2, activation, weight_gate=wg,
                                                                recompute=True)) if device == "cuda" else None,
                        "torch eager": lambda: eager(x, w1, b1, w2, b2, wg)}
            compiled = _compiled(eager, cfg)
            if compiled is not None:
                variants["torch.compile"] = lambda: compiled(x, w1, b1, w2, b2, wg)
            for label, forward in variants.items():
                step = None if forward is None else (lambda forward=forward: forward().backward(dy))
                row = _timed(label, step, device, d_model=d_model, d_ff=d_ff, tokens=tokens, activation=activation,
                             flops=flops)
                if row["status"] == "measured":
                    row["tflop_per_s"] = flops / row["time"]["median_s"] / 1e12
                    row["pct_of_matmul_peak"] = 100 * row["tflop_per_s"] / limits["matmul_tflop_per_s"]
                    row["activation_bytes"] = _saved_bytes(forward, (x, w1, b1, w2, b2, wg))
                yield row


# --------------------------------------------------------------------------------------------------
def attention_rows(cfg: Config, device: str, dtype, limits: dict) -> Iterator[dict]:
    for batch, heads, seqlen, head_dim, causal in cfg.attention_shapes:
        q, k, v = (torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        flops = 3.5 * attention_flops(batch, heads, seqlen, head_dim, causal)  # forward + 2.5x backward
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        variants = {"ours (Triton)": (lambda q, k, v: tk.scaled_dot_product_attention(q, k, v, is_causal=causal))
                    if device == "cuda" else None,
                    "torch SDPA (default backend)": sdpa}
        compiled = _compiled(sdpa, cfg)
        if compiled is not None:
            variants["torch.compile(SDPA)"] = compiled
        for label, fn in variants.items():
            step = None if fn is None else (lambda fn=fn: fn(q, k, v).backward(dout))
            row = _timed(label, step, device, batch=batch, heads=heads, seqlen=seqlen, head_dim=head_dim,
                         causal=causal, flops=flops)
            if row["status"] == "measured":
                row["tflop_per_s"] = flops / row["time"]["median_s"] / 1e12
                row["pct_of_matmul_peak"] = 100 * row["tflop_per_s"] / limits["matmul_tflop_per_s"]
            yield row
        del q, k, v, dout


def _inference_row(label, fn, device, limits: dict, **info) -> dict:
    """One FP8-section row: ``fn`` timed under no_grad, with TFLOP/s; a missing ``fn`` on a GPU means
    the GPU has no FP8 tensor cores."""
    with torch.no_grad():
        row = _timed(label, fn, device, **info)
    if fn is None and device == "cuda":
        row["status"] = "not timed: no FP8 tensor cores (compute capability < 8.9)"
    if row["status"] == "measured":
        row["tflop_per_s"] = info["flops"] / row["time"]["median_s"] / 1e12
        row["pct_of_matmul_peak"] = 100 * row["tflop_per_s"] / limits["matmul_tflop_per_s"]
    return row


def load_tutorial(path: str | None):
    """The Triton fused-attention tutorial, imported from a copy of ``python/tutorials/06-fused-attention.py``
    of the Triton release that is installed (the repository ships none of its code): the anchor that issue
    22 times our FP8 forward against. Returns the module, or a string saying why there is none."""
    if path is None:
        return ("not timed: no tutorial given (--tutorial-attention PATH: a copy of Triton's "
                "python/tutorials/06-fused-attention.py, of the installed release)")
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location("triton_tutorial_fused_attention", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.attention  # noqa: B018 - the entry point every release of the tutorial defines
    except Exception as error:  # noqa: BLE001 - a tutorial that does not import is reported, the rest timed
        return f"failed: the tutorial did not import: {type(error).__name__}: {error}"[:200]
    return module


def tutorial_fp8(tutorial, q, k, v, causal: bool):
    """A call of the tutorial's FP8 forward as its own benchmark makes it: (batch, heads, seqlen, head_dim)
    tensors in ``float8_e5m2`` (the tutorial's FP8 type), V stored with the keys contiguous (Hopper's 8-bit
    MMA reads its B operand K-major only), output in e5m2. ``q``, ``k``, ``v``: (batch, seqlen, heads,
    head_dim), as our functions take them."""
    e5m2 = torch.float8_e5m2
    qt, kt = (t.transpose(1, 2).contiguous().to(e5m2) for t in (q, k))
    vt = v.permute(0, 2, 3, 1).contiguous().transpose(2, 3).to(e5m2)  # .to keeps the keys-contiguous strides
    scale = q.shape[-1] ** -0.5
    return lambda: tutorial.attention(qt, kt, vt, causal, scale)


def attention_fp8_rows(cfg: Config, device: str, limits: dict) -> Iterator[dict]:
    """Inference forward at the same shapes: our FP8 (e4m3, FlashAttention-3's descales) against our bf16,
    torch SDPA in bf16 and the Triton tutorial's FP8 forward (issue 22). Needs FP8 tensor cores (compute
    capability 8.9+)."""
    from transformer_kernels.attention import fp8

    fp8_ok = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    tutorial = load_tutorial(cfg.tutorial_attention) if fp8_ok else None
    for batch, heads, seqlen, head_dim, causal in cfg.attention_shapes:
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        (qf, qd), (kf, kd), (vf, vd) = (fp8.quantize(t) for t in (q, k, v))
        flops = attention_flops(batch, heads, seqlen, head_dim, causal)
        info = dict(batch=batch, heads=heads, seqlen=seqlen, head_dim=head_dim, causal=causal, flops=flops)
        variants = {
            "ours FP8 (e4m3)": (lambda: tk.flash_attn_func(qf, kf, vf, causal=causal, q_descale=qd, k_descale=kd,
                                                          v_descale=vd)) if fp8_ok else None,
            "ours bf16": (lambda: tk.flash_attn_func(q, k, v, causal=causal)) if device == "cuda" else None,
            "torch SDPA bf16": lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                                      is_causal=causal),
        }
        for label, fn in variants.items():
            yield _inference_row(label, fn, device, limits, **info)
        label = "Triton tutorial FP8 (e5m2, V keys-contiguous)"
        if isinstance(tutorial, str):
            yield dict(peer=label, **info, status=tutorial)
        else:
            fn = None if tutorial is None else tutorial_fp8(tutorial, q, k, v, causal)
            yield _inference_row(label, fn, device, limits, **info)
        del q, k, v, qf, kf, vf


def ffn_fp8_rows(cfg: Config, device: str, limits: dict) -> Iterator[dict]:
    """Inference forward of the FFN at the suite's widths, prefill (``ffn_tokens``) and decode (16 tokens):
    our FP8 (e4m3 weights per output channel; the input in bf16, or already e4m3 per token as
    ``norm_fp8`` hands it over) against our bf16 and torch's own FP8 route (per-token quantization by
    torch ops, ``torch._scaled_mm`` row-wise) and bf16 eager (issue 22). Needs compute capability 8.9+."""
    from transformer_kernels import ffn_fp8

    fp8_ok = device == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    for d_model in cfg.ffn_widths:
        d_ff = 4 * d_model
        for tokens in (cfg.ffn_tokens, 16):
            for activation in ("gelu_tanh", "swiglu"):
                gated = activation == "swiglu"
                make = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16) / s[-1] ** 0.5  # noqa: E731
                x, w1, w2, wg = make(tokens, d_model), make(d_ff, d_model), make(d_model, d_ff), make(d_ff, d_model)
                (q1, s1), (q2, s2), (qg, sg) = (ffn_fp8.quantize_rows(w) for w in (w1, w2, wg))
                xq, sx = ffn_fp8.quantize_rows(x)
                gate = dict(weight_gate=qg, weight_gate_scale=sg) if gated else {}
                flops = (3 if gated else 2) * 2 * tokens * d_model * d_ff
                eager = _eager_ffn(activation)
                act = {"gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "swiglu": F.silu}[activation]

                def scaled_mm():  # torch's FP8 route, quantizing x and h per token with torch ops
                    def mm(a, w, sw):
                        aq, sa = ffn_fp8.quantize_rows(a)
                        return torch._scaled_mm(aq, w.t(), scale_a=sa[:, None], scale_b=sw[None, :],
                                                out_dtype=torch.bfloat16)
                    h = act(mm(x, qg, sg)) * mm(x, q1, s1) if gated else act(mm(x, q1, s1))
                    return mm(h, q2, s2)

                variants = {
                    "ours FP8, bf16 input": (lambda: tk.ffn(x, q1, None, q2, None, activation, weight1_scale=s1,
                                                           weight2_scale=s2, **gate)) if fp8_ok else None,
                    "ours FP8, e4m3 input (norm_fp8)": (lambda: tk.ffn(xq, q1, None, q2, None, activation,
                                                                      weight1_scale=s1, weight2_scale=s2,
                                                                      input_scale=sx, **gate)) if fp8_ok else None,
                    "torch._scaled_mm FP8 (row-wise)": scaled_mm if fp8_ok else None,
                    "ours bf16": (lambda: tk.ffn(x, w1, None, w2, None, activation, weight_gate=wg if gated else None))
                    if device == "cuda" else None,
                    "torch eager bf16": lambda: eager(x, w1, None, w2, None, wg),
                }
                for label, fn in variants.items():
                    yield _inference_row(label, fn, device, limits, d_model=d_model, d_ff=d_ff, tokens=tokens,
                                         activation=activation, flops=flops)


# --------------------------------------------------------------------------------------------------
def training_step_rows(cfg: Config, device: str, dtype) -> Iterator[dict]:
    """Tokens/s of one optimizer step of the paper's base model (Vaswani et al., 2017, Table 3)."""
    from transformer import Transformer, from_preset
    from transformer.training import train_step

    sentences, length = cfg.step_batch
    for label in ("ours (backend=triton)", "torch eager (backend=torch)", "torch.compile (backend=torch)"):
        if label.startswith("ours") and device != "cuda":
            yield dict(peer=label, status=NOT_ON_CPU)
            continue
        if label.startswith("torch.compile") and not cfg.compile_peers:
            continue
        backend = "triton" if label.startswith("ours") else "torch"
        config = from_preset("base", vocab_size=32000, backend=backend, max_len=max(length, 64),
                             **({} if device == "cuda" else dict(d_model=128, num_heads=4, d_ff=512)))
        model = Transformer(config).to(device=device, dtype=dtype)
        if label.startswith("torch.compile"):
            model = torch.compile(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
        src = torch.randint(0, 32000, (sentences, length), device=device)
        tgt = torch.randint(0, 32000, (sentences, length + 1), device=device)
        row = _timed(label, lambda: train_step(model, (src, tgt), optimizer, label_smoothing=0.1), device,
                     sentences=sentences, length=length, d_model=config.d_model)
        if row["status"] == "measured":
            row["tokens_per_s"] = 2 * sentences * length / row["time"]["median_s"]
        yield row
        del model, optimizer


def run(cfg: Config, device: str, progress: bool = True) -> dict:
    """Every section of ``cfg.sections``, in that order. A SIGINT (``timeout -s INT``, Ctrl-C) ends the run
    early with what was measured so far and ``interrupted`` saying where: a lease that runs out still
    leaves its measurements."""
    dtype = getattr(torch, cfg.dtype)
    limits = device_limits(device, dtype)
    sections = {"layer_norm": lambda: layer_norm_rows(cfg, device, dtype, limits),
                "ffn": lambda: ffn_rows(cfg, device, dtype, limits),
                "attention": lambda: attention_rows(cfg, device, dtype, limits),
                "attention_fp8": lambda: attention_fp8_rows(cfg, device, limits),
                "ffn_fp8": lambda: ffn_fp8_rows(cfg, device, limits),
                "training_step": lambda: training_step_rows(cfg, device, dtype)}
    results = {"suite": "kernels", "config": {**asdict(cfg), "device": device}, "device_limits": limits}
    name, rows = None, []
    try:
        for name in tqdm(cfg.sections, desc="kernels", disable=not progress, unit="section"):
            rows = results[name] = []
            for row in sections[name]():
                rows.append(row)
    except KeyboardInterrupt:
        results["interrupted"] = f"stopped by SIGINT in section {name} after {len(rows)} of its rows"
    return results
