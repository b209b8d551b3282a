"""DiffRatio-MoD's token routing (DiffCR, docs/design.md, MoD), as patched block forwards of a diffusers DiT.

Per block a router ``s = sigmoid(x w + b)`` scores every token; the ``k`` best run the whole block, the
others bypass it (identity) and are scattered back. Routed tokens take ``x + s * (block(x_r) - x_r)``:
the router score scales the block's update. (The paper's pseudo-code scales the MLP branch only; the
whole update is our documented deviation, ``passes/mod/eager.py``, and what is compared here.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def routed(forward, x: torch.Tensor, w: torch.Tensor, bias: float, k: int, args: tuple, kwargs: dict,
           scale: bool = True) -> torch.Tensor:
    """One block at capacity ``k``: top-k by router score, the block on those, scatter back."""
    s = torch.sigmoid(x @ w.reshape(-1, 1) + bias).squeeze(-1)  # [B, N]
    n = x.shape[1]
    if k >= n:
        y = forward(x, *args, **kwargs)
        return x + (s[..., None] if scale else 1.0) * (y - x)
    idx = torch.argsort(s, dim=1, descending=True)[:, :k]
    c = x.shape[-1]
    x_r = torch.stack([x[i, idx[i]] for i in range(x.shape[0])])
    y_r = forward(x_r, *args, **kwargs)
    s_r = torch.stack([s[i, idx[i]] for i in range(x.shape[0])])[..., None]
    out = x.clone()
    out.scatter_(1, idx[..., None].expand(-1, -1, c), x_r + (s_r if scale else 1.0) * (y_r - x_r))
    return out


@contextlib.contextmanager
def mod_routing(model: torch.nn.Module, capacities: list[int], weights: list[torch.Tensor], biases: list[float],
                scale: bool = True) -> Iterator[None]:
    """Route every ``transformer_blocks`` block of ``model`` while open."""
    blocks = list(model.transformer_blocks)
    for block, k, w, b in zip(blocks, capacities, weights, biases):
        fwd = block.forward

        def patched(hidden_states, *args, fwd=fwd, k=k, w=w, b=b, **kwargs):
            return routed(fwd, hidden_states, w, b, k, args, kwargs, scale)
        block.forward = patched
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
