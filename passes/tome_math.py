"""Eager PyTorch twin of :mod:`passes.tome_graph`: the same ToMe math, op for op.

Ties break as in the graph: the best dst is the first maximum (ArgMax), src tokens sort by
similarity descending with the lower index first (TopK == stable sort).
"""

from __future__ import annotations

import dataclasses

import torch

from passes.tome_graph import NORM_EPS


@dataclasses.dataclass
class TorchMatch:
    r: int
    num_src: int
    unm: torch.Tensor  # [B, Na-r] token positions that stay
    mrg: torch.Tensor  # [B, r] token positions that merge
    dst: torch.Tensor  # [Nb] dst token positions
    assign: torch.Tensor  # [B, Nb, r]
    count: torch.Tensor  # [B, Nb, 1]
    row: torch.Tensor  # [B, N] row of the merged tensor each position reads


def match(x: torch.Tensor, partition: torch.Tensor, partition_inv: torch.Tensor, num_src: int, r: int) -> TorchMatch:
    b, n, _ = x.shape
    na, nb = num_src, n - num_src
    src_idx, dst_idx = partition[:na], partition[na:]
    m = x / x.square().sum(-1, keepdim=True).sqrt().clamp_min(NORM_EPS)
    scores = m[:, src_idx] @ m[:, dst_idx].transpose(1, 2)
    node_max = scores.amax(-1)
    node_idx = scores.argmax(-1)
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    rank = torch.sort(order, dim=-1, stable=True).indices
    unm_order, mrg_order = order[:, r:], order[:, :r]
    mrg_dst = node_idx.gather(1, mrg_order)
    assign = (mrg_dst[:, None, :] == torch.arange(nb, device=x.device)[None, :, None]).to(x.dtype)
    count = assign.sum(-1, keepdim=True) + 1
    row_src = torch.where(rank < r, node_idx + (na - r), rank - r)
    row_dst = torch.arange(na - r, na - r + nb, device=x.device).expand(b, nb)
    row = torch.cat([row_src, row_dst], 1)[:, partition_inv]
    return TorchMatch(r, na, src_idx[unm_order], src_idx[mrg_order], dst_idx, assign, count, row)


def merge(x: torch.Tensor, mt: TorchMatch) -> torch.Tensor:
    """[B, N, C] -> [B, N-r, C]."""
    take = lambda idx: x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    dst = x[:, mt.dst]
    dst = (dst + mt.assign @ take(mt.mrg)) / mt.count
    return torch.cat([take(mt.unm), dst], 1)


def unmerge(y: torch.Tensor, mt: TorchMatch) -> torch.Tensor:
    """[B, N-r, C] -> [B, N, C]."""
    return y.gather(1, mt.row[..., None].expand(-1, -1, y.shape[-1]))
