"""AT-EDM's G-WPR pruning and refill (docs/design.md, AT-EDM), as hooks on a diffusers DiT.

- Importance: the pruning block's self-attention map ``A = mean_h softmax(q k^T * scale)`` ``[B, N, N]``
  is the weighted adjacency of the token graph; weighted PageRank from ``s = 1/N``,
  ``s_j <- sum_i s_i A_ij``, normalised, ``iterations`` times (ZeroTPrune's ``get_importance``: 5).
  Our graphs read only every ``stride``-th query row; here that is the same power iteration on the
  N x N matrix whose other rows are zero (stride 1 is the paper's full map).
- Pruning: the ``kept`` tokens of highest score leave the pruning block; the later blocks run on them.
- Refill before the output layer: each pruned position copies the kept token most similar to it (cosine
  on the stream at the pruning point), kept positions keep their own (``refill="copy"``, the paper's);
  ``refill="delta"`` is our documented deviation: the pruned position's own stream plus that kept
  token's update over the later blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def attention_map(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-mean self-attention probabilities ``[B, N, N]`` of a diffusers ``Attention`` on input ``x``."""
    b, n, _ = x.shape
    h = attn.heads
    q = attn.to_q(x).view(b, n, h, -1).transpose(1, 2)
    k = attn.to_k(x).view(b, n, h, -1).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1)


def gwpr(amap: torch.Tensor, stride: int = 1, iterations: int = 5) -> torch.Tensor:
    """Weighted PageRank scores ``[B, N]`` of the attention graph, only every ``stride``-th query voting."""
    b, n, _ = amap.shape
    voting = torch.zeros(n, dtype=torch.bool)
    voting[::stride] = True
    m = torch.where(voting[None, :, None], amap, torch.zeros((), dtype=amap.dtype))
    s = torch.full((b, n), 1.0 / n, dtype=amap.dtype)
    for _ in range(iterations):
        s = torch.einsum("bi,bij->bj", s, m)
        s = s / s.sum(-1, keepdim=True)
    return s


def nearest_kept(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, N]``: for each position the kept token it refills from (itself when kept)."""
    m = torch.nn.functional.normalize(x, dim=-1)
    sim = m @ m.gather(1, keep[..., None].expand(-1, -1, x.shape[-1])).transpose(-1, -2)  # [B, N, k]
    src = keep.gather(1, sim.argmax(-1))
    mine = torch.zeros_like(src, dtype=torch.bool).scatter(1, keep, True)
    return torch.where(mine, torch.arange(x.shape[1]).expand_as(src), src)


class ATEDMHooks:
    """Prune after ``prune_block`` by G-WPR of its self-attention, refill after ``last_block``."""

    def __init__(self, model: torch.nn.Module, prune_block: str, last_block: str, kept: int, stride: int = 1,
                 iterations: int = 5, refill: str = "copy") -> None:
        self.model, self.prune_block, self.last_block = model, prune_block, last_block
        self.kept, self.stride, self.iterations, self.refill = kept, stride, iterations, refill
        self.attn = model.get_submodule(f"{prune_block}.attn1")

    @contextlib.contextmanager
    def installed(self) -> Iterator[ATEDMHooks]:
        state: dict = {}

        def attn_in(_m, args, kwargs):
            state["map"] = attention_map(self.attn, args[0] if args else kwargs["hidden_states"])

        def after_prune(_m, _args, out):
            x = out[0] if isinstance(out, tuple) else out
            scores = gwpr(state["map"], self.stride, self.iterations)
            keep = scores.topk(self.kept, dim=-1).indices
            state.update(x=x, keep=keep, src=nearest_kept(x, keep))
            pruned = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            return (pruned, *out[1:]) if isinstance(out, tuple) else pruned

        def after_last(_m, _args, out):
            y = out[0] if isinstance(out, tuple) else out
            x, keep, src = state["x"], state["keep"], state["src"]
            c = x.shape[-1]
            full = x.clone() if self.refill == "delta" else torch.zeros_like(x)
            # the final features (copy) or the update (delta) of each kept token, at its own position
            own = y - x.gather(1, keep[..., None].expand(-1, -1, c)) if self.refill == "delta" else y
            at_pos = torch.zeros_like(x).scatter(1, keep[..., None].expand(-1, -1, c), own)
            full = full + at_pos.gather(1, src[..., None].expand(-1, -1, c))
            return (full, *out[1:]) if isinstance(out, tuple) else full

        handles = [self.attn.register_forward_pre_hook(attn_in, with_kwargs=True),
                   self.model.get_submodule(self.prune_block).register_forward_hook(after_prune),
                   self.model.get_submodule(self.last_block).register_forward_hook(after_last)]
        try:
            yield self
        finally:
            for hd in handles:
                hd.remove()
