"""The Transformer on torch.distributed's parallelisms: context parallelism (the sequence split over a
group, attention by :mod:`transformer_kernels.context_parallel`), tensor parallelism (DTensor's
``parallelize_module``: column-wise q/k/v projections and first FFN layer, row-wise output projection
and second FFN layer; Shoeybi et al., 2019, "Megatron-LM", Sec. 3), and fully sharded data parallelism
(FSDP2's ``fully_shard``, per layer then the root). ``python -m transformer.train`` combines them from
its flags (``--context-parallel``, ``--fsdp``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

from transformer_kernels import context_parallel as cp

from .layers import FeedForward, MultiHeadAttention
from .model import Transformer, TransformerLM


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """Where attention's sequence is split: ``group`` (a ProcessGroup, 1-D DeviceMesh or ``(mesh, dim)``),
    the ``strategy`` (``"ring"`` or ``"all_to_all"``) and the ``layout`` (``"zigzag"`` or ``"contiguous"``)."""

    group: object = None
    strategy: str = "ring"
    layout: str = "zigzag"

    @property
    def process_group(self):
        return cp.resolve_group(self.group)

    def attention(self, q, k, v, *, is_causal: bool):
        return cp.scaled_dot_product_attention(q, k, v, is_causal=is_causal, group=self.group,
                                               strategy=self.strategy, layout=self.layout)

    def positions(self, local_seqlen: int, device) -> torch.Tensor:
        """``(1, local_seqlen)``: the global positions of this rank's tokens."""
        pg = self.process_group
        world = dist.get_world_size(pg)
        return cp.positions(local_seqlen * world, dist.get_rank(pg), world, self.layout, device)[None]

    def shard(self, tensors, dim: int = 1):
        return cp.shard(tensors, dim, self.group, self.layout)

    def unshard(self, tensors, dim: int = 1):
        return cp.unshard(tensors, dim, self.group, self.layout)


def enable_context_parallel(model: nn.Module, group=None, *, strategy: str = "ring",
                            layout: str = "zigzag") -> ContextParallel:
    """Make every attention of ``model`` (our :class:`TransformerLM` / :class:`Transformer`) context
    parallel over ``group``: it then takes this rank's slice of each sequence (see
    :meth:`ContextParallel.shard`), and a language model gives its tokens their global positions.
    Key-padding masks are refused (a ValueError) under it. Returns the setting; ``disable_context_parallel``
    undoes it."""
    setting = ContextParallel(group, strategy, layout)
    setting.process_group  # noqa: B018 (raises without an initialized process group)
    if strategy not in cp.STRATEGIES or layout not in cp.LAYOUTS:
        raise ValueError(f"enable_context_parallel: strategy in {cp.STRATEGIES}, layout in {cp.LAYOUTS}; got "
                         f"{strategy!r}, {layout!r}")
    for module in model.modules():
        if isinstance(module, (MultiHeadAttention, TransformerLM, Transformer)):
            module.context_parallel = setting
    return setting


def disable_context_parallel(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (MultiHeadAttention, TransformerLM, Transformer)):
            module.context_parallel = None
    return model


def apply_tensor_parallel(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model``'s attention and FFN over a 1-D ``DeviceMesh`` (in place; returns it).

    Per attention: ``q_proj``/``k_proj``/``v_proj`` column-wise (each rank computes its heads, a plain
    local tensor), attention on those heads with our kernel (plain tensors: no DTensor reaches it),
    ``out_proj`` row-wise (outputs summed across ranks). Per FFN: ``linear1`` column-wise, ``linear2``
    row-wise, computed by :class:`~transformer.layers.FeedForward`'s explicit split on the fused kernel
    (triton backend) or by the two Linears (torch backend). Embedding and LayerNorms stay replicated.
    Raises ValueError when the heads or d_ff do not divide by the mesh size.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    size = mesh.size()
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            if module.num_heads % size:
                raise ValueError(f"apply_tensor_parallel: {module.num_heads} heads do not divide over {size} ranks")
            plan.update({f"{name}.q_proj": ColwiseParallel(), f"{name}.k_proj": ColwiseParallel(),
                         f"{name}.v_proj": ColwiseParallel(), f"{name}.out_proj": RowwiseParallel()})
        elif isinstance(module, FeedForward):
            if module.linear1.out_features % size:
                raise ValueError(f"apply_tensor_parallel: d_ff {module.linear1.out_features} does not divide over "
                                 f"{size} ranks")
            plan.update({f"{name}.linear1": ColwiseParallel(), f"{name}.linear2": RowwiseParallel()})
    return parallelize_module(model, mesh, plan)


def apply_fsdp(model: nn.Module, mesh=None, **kwargs) -> nn.Module:
    """FSDP2: ``fully_shard`` each encoder/decoder layer, then the whole model (the embedding and
    what is left), over ``mesh`` (default: every rank). ``kwargs`` go to ``fully_shard`` (e.g.
    ``mp_policy``). Our kernels see the gathered, plain parameters inside each layer's forward."""
    from torch.distributed.fsdp import fully_shard

    from .layers import DecoderLayer, EncoderLayer

    for module in model.modules():
        if isinstance(module, (EncoderLayer, DecoderLayer)):
            fully_shard(module, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def reshard(model: nn.Module) -> nn.Module:
    """Free FSDP2's gathered parameters (a no-grad forward, e.g. evaluation, leaves the root's
    gathered, with no backward to free them), so state dicts and digests see the sharded DTensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model
