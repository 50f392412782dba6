"""Sequential operations counted from the autograd graph (Table 1, "Sequential Operations").

With unlimited parallel hardware a computation takes as many steps as its longest chain of
dependent operations. PyTorch records every differentiable op of a forward pass as a node of the
autograd graph, linked to the nodes that produced its inputs, so the longest path through that
graph, in nodes, counts the operations that must run one after another. The walk is iterative:
an unrolled recurrence over 1024 positions is thousands of nodes deep.
"""

from __future__ import annotations

import torch


def _children(node) -> list:
    return [child for child, _ in node.next_functions if child is not None]


def longest_chain(output: torch.Tensor) -> int:
    """Number of autograd nodes on the longest path from a leaf to ``output.grad_fn``.

    Leaf accumulators (``AccumulateGrad``, one per input or parameter) are not operations of the
    forward pass and count 0. Raises ``ValueError`` if ``output`` has no autograd history.
    """
    root = output.grad_fn
    if root is None:
        raise ValueError("longest_chain: output has no grad_fn; run the forward with grad enabled "
                         "and an input or parameter that requires grad")
    depth: dict = {}
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if node in depth:
            continue
        children = _children(node)
        if children_done:
            own = 0 if type(node).__name__ == "AccumulateGrad" else 1
            depth[node] = own + max((depth[c] for c in children), default=0)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if c not in depth)
    return depth[root]


def sequential_ops(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Longest dependency chain of one forward pass of ``layer`` on ``x`` (grad enabled)."""
    with torch.enable_grad():
        return longest_chain(layer(x.detach().requires_grad_(True)))
