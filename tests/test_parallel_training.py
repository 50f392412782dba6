"""The Transformer on torch.distributed (transformer.parallel and the training CLI): data x context
parallel under DDP, FSDP2 (alone and with context parallelism), and tensor parallelism, each against one
process computing the same thing: losses, gradients (float64-free: the same fp32 math, summed in another
order), parameters after a step, logits. Spawned gloo groups on the CPU; the Triton kernels run through
the interpreter where the model's backend is "triton".
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import transformer_kernels as tk
from transformer import TransformerConfig, TransformerLM
from transformer import train
from transformer.parallel import apply_fsdp, apply_tensor_parallel, enable_context_parallel
from transformer.training import SequenceShard, loss_and_metrics, train_step_metrics

from helpers import rel_err, spawn_group

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ = 40, 16


def _config(backend: str) -> TransformerConfig:
    return TransformerConfig(vocab_size=VOCAB, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=0,
                             num_decoder_layers=2, dropout=0.0, max_len=64, backend=backend)


def _model(backend: str) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(_config(backend))


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, SEQ + 1), generator=g) for _ in range(n)]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_grads_match(model, ref, label, tol=2e-5):
    named = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g, r = _full(p.grad), named[name].grad
        err = (g - r).norm().item()
        # k_proj.bias's true gradient is 0 (softmax ignores a shift shared by a row's scores): only noise
        assert err <= tol * r.norm().item() + 1e-6, f"{label} {name}: |g - ref| {err:.2e}, |ref| {r.norm():.2e}"


def _reference_step(batches, backend, lr):
    """One process: mean over the dp replicas of each replica's mean loss; its gradients; SGD step."""
    ref = _model(backend)
    losses = [loss_and_metrics(ref, b)[0] for b in batches]
    torch.stack(losses).mean().backward()
    grads_model = ref
    stepped = _model(backend)
    stepped.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p, q in zip(stepped.parameters(), ref.parameters()):
            p -= lr * q.grad
    return [x.item() for x in losses], grads_model, stepped


def _train_case(rank, world, cp_size, strategy, fsdp, backend):
    """dp x cp ranks take one SGD step through train.py's own helpers; rank 0 compares with one process."""
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // cp_size
    mesh = init_device_mesh("cpu", (dp, cp_size), mesh_dim_names=("dp", "cp"))
    flat = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_cp",))
    d = train.Dist(rank, world, torch.device("cpu"), mesh, mesh.get_local_rank("dp"), cp_size, flat)
    model = _model(backend)
    if cp_size > 1:
        enable_context_parallel(model, (mesh, "cp"), strategy=strategy)
    if fsdp:
        apply_fsdp(model, flat)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = _batches(dp)
    batch, scale = batches[d.dp_rank], 1.0
    if cp_size > 1:
        batch = train._shard_lm_batch(model, batch)
        scale = train._context_parallel_loss_scale(batch, model, d)
    before = tk.launch_count("attention_bwd_dq")
    # Step through the real training step, with the gradients kept for the comparison.
    optimizer.step = lambda: None  # (stepped below, after the gradients are compared)
    metrics = train_step_metrics(wrapped, batch, optimizer, loss_scale=scale)
    if backend == "triton":
        assert tk.launch_count("attention_bwd_dq") > before
    losses = [None] * world
    dist.all_gather_object(losses, (d.dp_rank, metrics.loss_sum, metrics.tokens))
    label = f"dp {dp} x cp {cp_size} {strategy} {'fsdp' if fsdp else 'ddp'} {backend}"
    ref_losses, ref, stepped = _reference_step(batches, backend, lr)
    _assert_grads_match(model, ref, label)
    for r in range(dp):  # each replica's loss: the sum over its cp ranks' token sums
        sums = [s for (i, s, n) in losses if i == r]
        tokens = sum(n for (i, s, n) in losses if i == r)
        assert abs(sum(sums) / tokens - ref_losses[r]) < 1e-5 * abs(ref_losses[r]), label
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    for (name, p), q in zip(model.named_parameters(), stepped.parameters()):
        err = (_full(p.detach()) - q).norm().item()
        assert err <= 1e-6 * q.norm().item() + 1e-7, f"{label} {name} after the step: {err:.2e}"


def _train_cases(rank, world, cases):
    for case in cases:
        _train_case(rank, world, *case)


def test_data_x_context_parallel_ddp_matches_one_process(device):
    """4 ranks as dp 2 x cp 2 (ring, zigzag) under DDP, on the Triton kernels."""
    spawn_group(_train_cases, 4, [(2, "ring", False, "triton")])


def test_fsdp2_alone_and_with_context_parallel_match_one_process(device):
    """FSDP2 over 2 ranks as data parallel; then cp 2 with all-to-all attention under FSDP2."""
    spawn_group(_train_cases, 2, [(1, "ring", True, "torch"), (2, "all_to_all", True, "triton")])


def _tensor_parallel(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    tokens = _batches(1)[0]
    for backend in ("triton", "torch"):
        ref = _model(backend)
        model = apply_tensor_parallel(_model(backend), mesh)
        assert hasattr(model.layers[0].ffn.linear1.weight, "full_tensor")  # sharded
        before = tk.launch_count("ffn_matmul")
        logits = model(tokens)
        if backend == "triton":
            assert tk.launch_count("ffn_matmul") > before  # the fused FFN kernel ran on the shards
        ref_logits = ref(tokens)
        assert rel_err(logits, ref_logits) < 1e-5, backend
        logits.float().pow(2).mean().backward()
        ref_logits.float().pow(2).mean().backward()
        _assert_grads_match(model, ref, f"tensor parallel {backend}")
    with pytest.raises(ValueError, match="heads do not divide"):
        apply_tensor_parallel(TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=30, num_heads=3, d_ff=64,
                                                              num_decoder_layers=1, max_len=64)), mesh)


def test_tensor_parallel_matches_one_process(device):
    spawn_group(_tensor_parallel, 2)


def _hf_tensor_parallel(rank, world):
    """A tiny Llama with our kernels (transformer_kernels.hf.apply_kernels) under DTensor tensor parallelism
    (colwise q/k/v/gate/up, rowwise o/down): the logits and gradients of the unpatched, unsharded model."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config)
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(ref.state_dict())
    tk.hf.apply_kernels(model)
    plan = {}
    for i in range(config.num_hidden_layers):
        plan.update({f"model.layers.{i}.self_attn.{p}": ColwiseParallel() for p in ("q_proj", "k_proj", "v_proj")})
        plan.update({f"model.layers.{i}.mlp.{p}": ColwiseParallel() for p in ("gate_proj", "up_proj")})
        plan[f"model.layers.{i}.self_attn.o_proj"] = RowwiseParallel()
        plan[f"model.layers.{i}.mlp.down_proj"] = RowwiseParallel()
    parallelize_module(model, init_device_mesh("cpu", (world,)), plan)
    ids = _batches(1)[0][:, :8]
    before = {k: tk.launch_count(k) for k in ("attention_fwd", "layer_norm_fwd")}
    logits, ref_logits = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert all(tk.launch_count(k) > n for k, n in before.items()), "our attention and RMSNorm kernels ran"
    assert rel_err(logits, ref_logits) < 1e-5
    logits.pow(2).mean().backward()
    ref_logits.pow(2).mean().backward()
    _assert_grads_match(model, ref, "llama tensor parallel")


def test_patched_hf_model_under_tensor_parallelism(device):
    pytest.importorskip("transformers")
    spawn_group(_hf_tensor_parallel, 2)


def _cp_model_refusals(rank, world):
    model = _model("torch")
    enable_context_parallel(model)
    tokens = _batches(1)[0][:, :SEQ // world]
    with pytest.raises(ValueError, match="key padding"):
        model(tokens, key_padding_mask=torch.ones_like(tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match="strategy"):
        enable_context_parallel(model, strategy="tree")


def test_context_parallel_model_refuses_masks(device):
    spawn_group(_cp_model_refusals, 2)


# ----------------------------------------------------------------------------------------------
# The command line under torchrun
# ----------------------------------------------------------------------------------------------
CLI = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--dropout", "0", "--max-corpus-bytes", "200000",
       "--eval-every", "100", "--eval-batches", "2", "--no-progress", "--lr-scale", "0.01"]


def _env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT / 'kernels'}:{ROOT}"
    env.pop("TRITON_INTERPRET", None)  # the CLI's torch backend on the CPU
    return env


def _cli(out, *extra, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    result = subprocess.run([*launcher, "-m", "transformer.train", *CLI, "--out", str(out), *extra], cwd=ROOT,
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return metrics, state


def test_cli_context_parallel_and_fsdp_follow_one_process(tmp_path):
    """torchrun --context-parallel 2 (ring, DDP) and --context-parallel 2 --fsdp --cp-strategy all_to_all
    train on the batches one process trains on: the same losses each step (to fp32 rounding) and the same
    parameters (Adam amplifies rounding where a gradient is ~0: k_proj.bias, whose true gradient is 0,
    is left out; the rest within 1e-3 at this learning rate)."""
    one, one_state = _cli(tmp_path / "one")
    for name, extra in (("cp", ("--context-parallel", "2")),
                        ("cp_fsdp", ("--context-parallel", "2", "--fsdp", "--cp-strategy", "all_to_all"))):
        metrics, state = _cli(tmp_path / name, *extra, nproc=2)
        assert metrics["summary"]["context_parallel"] == 2
        assert metrics["distributed"]["replicas_identical"]
        for a, b in zip(metrics["train"], one["train"]):
            assert abs(a["loss"] - b["loss"]) < 1e-5 * b["loss"], (name, a["loss"], b["loss"])
        for key, ref in one_state.items():
            if not key.endswith("k_proj.bias"):
                assert (state[key] - ref).abs().max() < 1e-3, (name, key)


def test_cli_refuses_bad_context_parallel_settings(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--context-parallel", "2", "--seq-len", "10"])
    assert "chunks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--context-parallel", "2", "--model", "encoder_decoder"])
