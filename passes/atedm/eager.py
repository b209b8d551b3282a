"""Eager PyTorch twin of :mod:`passes.atedm.graph`: the same AT-EDM math, op for op.

Ties break as in the graph: TopK keeps the lower index first among equal scores (a stable descending
sort), ArgMax takes the first maximum.
"""

from __future__ import annotations

import dataclasses

import torch

from passes.atedm.graph import NORM_EPS
from passes.tome.eager import unit


@dataclasses.dataclass
class TorchPrune:
    keep: torch.Tensor  # [B, k] kept token positions, by descending score
    row: torch.Tensor  # [B, N] row of the kept stream each position reads


def importance(q: torch.Tensor, k: torch.Tensor, scale: float, stride: int, iterations: int) -> torch.Tensor:
    """G-WPR scores ``[B, 1, N]`` from ``q, k [B, H, N, D]`` on every ``stride``-th query row."""
    n = q.shape[2]
    rows = torch.arange(0, n, stride, device=q.device)
    probs = ((q[:, :, rows] @ k.transpose(-1, -2)) * scale).softmax(-1)  # [B, H, S, N]
    attn = probs.mean(1)  # [B, S, N]
    s = torch.full((1, 1, n), 1.0 / n, dtype=q.dtype, device=q.device)
    for _ in range(iterations):
        v = s[:, :, rows] @ attn
        s = v / v.sum(-1, keepdim=True)
    return s


def select(x: torch.Tensor, scores: torch.Tensor, kept: int) -> TorchPrune:
    """Top-``kept`` tokens by score and, per position, the kept row it is refilled from."""
    n = x.shape[1]
    keep = torch.sort(scores.squeeze(1), dim=-1, descending=True, stable=True).indices[:, :kept]
    onehot = keep[:, :, None] == torch.arange(n, device=x.device)  # [B, k, N]
    is_kept = onehot.any(1)
    slot = onehot.to(x.dtype).argmax(1)
    m = unit(x, NORM_EPS)
    mk = m.gather(1, keep[..., None].expand(-1, -1, m.shape[-1]))
    best = (m @ mk.transpose(-1, -2)).argmax(-1)  # [B, N]
    return TorchPrune(keep, torch.where(is_kept, slot, best))


def prune(x: torch.Tensor, pr: TorchPrune) -> torch.Tensor:
    """[B, N, C] -> [B, k, C]."""
    return x.gather(1, pr.keep[..., None].expand(-1, -1, x.shape[-1]))


def refill(y: torch.Tensor, pr: TorchPrune, x: torch.Tensor | None = None) -> torch.Tensor:
    """[B, k, C] -> [B, N, C]; with ``x`` (the stream at the pruning point) the "delta" refill."""
    if x is not None:
        return x + (y - prune(x, pr)).gather(1, pr.row[..., None].expand(-1, -1, y.shape[-1]))
    return y.gather(1, pr.row[..., None].expand(-1, -1, y.shape[-1]))
