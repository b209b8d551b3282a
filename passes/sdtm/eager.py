"""Eager PyTorch twin of :mod:`passes.sdtm.graph`: the same window merge, counters and blending, op for op.

Ties break as in the graph: windows sort by score descending with the lower index first (TopK ==
stable sort).
"""

from __future__ import annotations

import dataclasses

import torch

from passes.sdtm.graph import COUNTER_EPS, WindowGeometry
from passes.tome.eager import unit


@dataclasses.dataclass
class TorchWindowMatch:
    k: int
    unm: torch.Tensor  # [B, N-4k] positions kept as single tokens
    win: torch.Tensor  # [B, k, 4] positions of the chosen windows
    row: torch.Tensor  # [B, N] row of the merged tensor each position reads
    independent: torch.Tensor  # [B, N] bool


def window_scores(x: torch.Tensor, counter: torch.Tensor, geo: WindowGeometry, a_s: float) -> torch.Tensor:
    """``[B, Nw]``: ||window mean of unit tokens||^2 + a_s * window mean of c / (mean c + eps)."""
    windows = torch.from_numpy(geo.windows())
    m = unit(x)
    mean = m[:, windows].mean(2)
    sim = mean.square().sum(-1)
    prio = counter / (counter.mean(1, keepdim=True) + COUNTER_EPS)
    return sim + prio[:, windows].mean(-1) * a_s


def window_match(x: torch.Tensor, counter: torch.Tensor, geo: WindowGeometry, a_s: float) -> TorchWindowMatch:
    b = x.shape[0]
    k = geo.k
    windows = torch.from_numpy(geo.windows())
    leftover = torch.from_numpy(geo.leftover())
    nl, u = len(leftover), geo.unmerged
    order = torch.sort(window_scores(x, counter, geo, a_s), dim=-1, descending=True, stable=True).indices
    rank = torch.sort(order, dim=-1, stable=True).indices
    chosen, rest = order[:, :k], order[:, k:]
    unm = torch.cat([leftover.expand(b, nl), windows[rest].reshape(b, -1)], 1)
    rank3 = rank[..., None]
    row_win = torch.where(rank3 < k, rank3 + u, rank3 * 4 + (nl - 4 * k + torch.arange(4)))
    row_layout = torch.cat([torch.arange(nl).expand(b, nl), row_win.reshape(b, -1)], 1)
    row = row_layout[:, torch.from_numpy(geo.layout_inverse())]
    return TorchWindowMatch(k, unm, windows[chosen], row, row < u)


def window_merge(x: torch.Tensor, mt: TorchWindowMatch) -> torch.Tensor:
    """[B, N, C] -> [B, N-3k, C]."""
    b, _, c = x.shape
    unm = x.gather(1, mt.unm[..., None].expand(-1, -1, c))
    win = x.gather(1, mt.win.reshape(b, -1)[..., None].expand(-1, -1, c)).view(b, mt.k, 4, c)
    return torch.cat([unm, win.mean(2)], 1)


def gather_unmerge(y: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """[B, N', C] -> [B, N, C]."""
    return y.gather(1, row[..., None].expand(-1, -1, y.shape[-1]))


def counter_update(counter: torch.Tensor, independent: torch.Tensor) -> torch.Tensor:
    return torch.where(independent, torch.zeros((), dtype=counter.dtype), counter + 1)


def blend(y: torch.Tensor, cache: torch.Tensor, independent: torch.Tensor, weight: float) -> torch.Tensor:
    merged = (~independent).to(y.dtype)[..., None]
    return y + (cache - y) * torch.tensor(1.0 - weight, dtype=y.dtype) * merged
