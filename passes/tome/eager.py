"""Eager PyTorch twin of :mod:`passes.tome.graph`: the same ToMe math, op for op.

Ties break as in the graph: the best dst is the first maximum (ArgMax), src tokens sort by
similarity descending with the lower index first (TopK == stable sort). Every tensor has a band axis K.
"""

from __future__ import annotations

import dataclasses

import torch

from passes.tome.graph import NORM_EPS


@dataclasses.dataclass
class TorchMatch:
    r: int
    num_src: int
    unm: torch.Tensor  # [B, Na-r] token positions that stay
    mrg: torch.Tensor  # [B, K, r/K] token positions that merge
    dst: torch.Tensor  # [K, Nb/K] dst token positions
    assign: torch.Tensor  # [B, K, Nb/K, r/K]
    count: torch.Tensor  # [B, K, Nb/K, 1]
    row: torch.Tensor  # [B, N] row of the merged tensor each position reads
    mrg_dst: torch.Tensor | None = None  # [B, K, r/K] dst (index within its band) of each merged src

    def indices(self) -> dict[str, torch.Tensor]:
        """The index tensors of :class:`passes.tome.graph.MatchIndices`, by name."""
        return {"unm": self.unm, "mrg": self.mrg, "mrg_dst": self.mrg_dst, "dst": self.dst, "row": self.row}


def unit(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``x / ||x||`` as :func:`passes.graphbuild.unit_rows`: scaled by the row's max magnitude first (fp16-safe)."""
    xs = x / x.abs().amax(-1, keepdim=True).clamp_min(eps)
    return xs / xs.square().sum(-1, keepdim=True).sqrt().clamp_min(eps)


def best_match(x: torch.Tensor, partition: torch.Tensor, num_src: int, bands: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each src token's best cosine similarity to a dst of its band and that dst's index: ``[B, K, Na]`` each."""
    n = x.shape[1]
    k = bands
    na, nb = num_src // k, (n - num_src) // k
    per_band = partition.view(k, na + nb)
    src_idx, dst_idx = per_band[:, :na], per_band[:, na:]
    m = unit(x)
    scores = m[:, src_idx] @ m[:, dst_idx].transpose(-1, -2)  # [B, K, Na, Nb]
    return scores.amax(-1), scores.argmax(-1)


def match(x: torch.Tensor, partition: torch.Tensor, partition_inv: torch.Tensor, num_src: int, r: int,
          bands: int = 1) -> TorchMatch:
    order, node_idx = order_of(x, partition, num_src, bands)
    return match_from_order(order, node_idx, partition, partition_inv, num_src, r, bands, x.dtype)


def order_of(x: torch.Tensor, partition: torch.Tensor, num_src: int, bands: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """src sorted by best similarity (descending, stable) and each src's best dst: ``[B, K, Na]`` each."""
    node_max, node_idx = best_match(x, partition, num_src, bands)
    return torch.sort(node_max, dim=-1, descending=True, stable=True).indices, node_idx


def match_from_order(order: torch.Tensor, node_idx: torch.Tensor, partition: torch.Tensor, partition_inv: torch.Tensor,
                     num_src: int, r: int, bands: int = 1, dtype: torch.dtype = torch.float32) -> TorchMatch:
    """The matching that merges the first r of ``order`` (per band) into their ``node_idx``."""
    b, k = order.shape[0], bands
    n = partition.shape[0]
    na, nb, rb = num_src // k, (n - num_src) // k, r // k
    unm_total = k * (na - rb)
    per_band = partition.view(k, na + nb)
    src_idx, dst_idx = per_band[:, :na], per_band[:, na:]
    rank = torch.sort(order, dim=-1, stable=True).indices
    unm_order, mrg_order = order[..., rb:], order[..., :rb]
    mrg_dst = node_idx.gather(-1, mrg_order)
    src_b = src_idx.expand(b, k, na)
    band = torch.arange(k, device=order.device).view(1, k, 1)
    row_src = torch.where(rank < rb, node_idx + unm_total + band * nb, rank + band * (na - rb) - rb)
    row_dst = (unm_total + band * nb + torch.arange(nb, device=order.device).view(1, 1, nb)).expand(b, k, nb)
    row = torch.cat([row_src, row_dst], -1).reshape(b, n)[:, partition_inv]
    return from_indices(src_b.gather(-1, unm_order).reshape(b, unm_total), src_b.gather(-1, mrg_order), mrg_dst,
                        dst_idx, row, num_src, dtype)


def from_indices(unm: torch.Tensor, mrg: torch.Tensor, mrg_dst: torch.Tensor, dst: torch.Tensor, row: torch.Tensor,
                 num_src: int, dtype: torch.dtype = torch.float32) -> TorchMatch:
    """A matching rebuilt from its index tensors (CA-ToMe's cache): one-hot assignment and counts."""
    nb = dst.shape[-1]
    assign = (mrg_dst[:, :, None, :] == torch.arange(nb, device=mrg_dst.device)[:, None]).to(dtype)
    count = assign.sum(-1, keepdim=True) + 1
    return TorchMatch(mrg.shape[1] * mrg.shape[2], num_src, unm, mrg, dst, assign, count, row, mrg_dst)


def merge(x: torch.Tensor, mt: TorchMatch) -> torch.Tensor:
    """[B, N, C] -> [B, N-r, C]."""
    b, _, c = x.shape
    unm = x.gather(1, mt.unm[..., None].expand(-1, -1, c))
    mrg = x.gather(1, mt.mrg.reshape(b, -1)[..., None].expand(-1, -1, c)).view(*mt.mrg.shape, c)
    dst = x[:, mt.dst]  # [B, K, Nb/K, C]
    dst = dst / mt.count + (mt.assign / mt.count) @ mrg
    return torch.cat([unm, dst.reshape(b, -1, c)], 1)


def unmerge(y: torch.Tensor, mt: TorchMatch) -> torch.Tensor:
    """[B, N-r, C] -> [B, N, C]."""
    return y.gather(1, mt.row[..., None].expand(-1, -1, y.shape[-1]))
