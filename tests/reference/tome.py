"""ToMe as tomesd defines it (``tomesd/merge.py``, ``bipartite_soft_matching_random2d``; docs/design.md, 'The merge subgraph').

Written from tomesd's semantics: dst is one token per ``sy x sx`` cell (``rand_idx`` picks which), the
src tokens are the rest; cosine similarity of src to dst, each src keeps its best dst, the ``r`` src with
the highest best similarity merge into their dst by ``scatter_reduce(mean)`` (the dst itself counts), the
merged tensor is ``[unmerged src | dst]`` and unmerge copies a dst's value back to its merged src.
Banded matching (grids past TensorRT's TopK limit) is tomesd on each horizontal band of the grid with
``r / bands`` each. The hooks apply it as tomesd's ``ToMeBlock`` does: one matching per block, from the
block's input (``metric="block"``) or from the sublayer's own input (``metric="sublayer"``), merge the
sublayer input, unmerge its output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


def bipartite_soft_matching_random2d(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                                     rand_idx: torch.Tensor, mode: str = "mean") -> tuple[Fn, Fn]:
    """tomesd's matching of ``metric [B, N, C]`` on an ``h x w`` grid; ``rand_idx [h//sy, w//sx]`` in ``0..sy*sx-1``.

    ``mode`` is the scatter reduction (tomesd: "mean"; "sum" exists to show a test can tell them apart).
    """
    b, n, _ = metric.shape
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    hsy, wsx = h // sy, w // sx
    # -1 marks the dst of each cell, 0 the src; a stable argsort puts every dst first, then every src
    buf = torch.zeros(hsy, wsx, sy * sx, dtype=torch.int64)
    buf.scatter_(2, rand_idx.reshape(hsy, wsx, 1).to(torch.int64), -torch.ones(hsy, wsx, 1, dtype=torch.int64))
    buf = buf.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    full = torch.zeros(h, w, dtype=torch.int64)  # rows / columns past the last whole cell are src
    full[:hsy * sy, :wsx * sx] = buf
    order = torch.argsort(full.reshape(1, -1, 1), dim=1, stable=True)
    num_dst = hsy * wsx
    a_idx, b_idx = order[:, num_dst:, :], order[:, :num_dst, :]  # src, dst positions

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[-1]
        return x.gather(1, a_idx.expand(b, n - num_dst, c)), x.gather(1, b_idx.expand(b, num_dst, c))

    m = metric / metric.norm(dim=-1, keepdim=True)
    a, bb = split(m)
    scores = a @ bb.transpose(-1, -2)
    r = min(a.shape[1], r)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:, :], edge_idx[:, :r, :]
    dst_idx = node_idx[..., None].gather(1, src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        nb, t1, c = src.shape
        unm = src.gather(1, unm_idx.expand(nb, t1 - r, c))
        src = src.gather(1, src_idx.expand(nb, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(nb, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[:, :unm_len], x[:, unm_len:]
        c = x.shape[-1]
        src = dst.gather(1, dst_idx.expand(b, r, c))
        out = torch.zeros(b, n, c, dtype=x.dtype)
        out.scatter_(1, b_idx.expand(b, num_dst, c), dst)
        out.scatter_(1, a_idx.expand(b, -1, 1).gather(1, unm_idx).expand(b, unm_len, c), unm)
        out.scatter_(1, a_idx.expand(b, -1, 1).gather(1, src_idx).expand(b, r, c), src)
        return out

    return merge, unmerge


def banded_matching(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int, rand_idx: torch.Tensor,
                    bands: int = 1, mode: str = "mean") -> tuple[Fn, Fn]:
    """tomesd on each of ``bands`` horizontal bands of the grid (``h / bands`` rows, ``r / bands`` merged each)."""
    if bands == 1:
        return bipartite_soft_matching_random2d(metric, w, h, sx, sy, r, rand_idx, mode)
    bh, per = h // bands, (h // bands) * w
    cells = bh // sy
    fns = [bipartite_soft_matching_random2d(metric[:, k * per:(k + 1) * per], w, bh, sx, sy, r // bands,
                                            rand_idx[k * cells:(k + 1) * cells], mode) for k in range(bands)]
    kept = per - r // bands

    def merge(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x[:, k * per:(k + 1) * per]) for k, (m, _) in enumerate(fns)], 1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([u(x[:, k * kept:(k + 1) * kept]) for k, (_, u) in enumerate(fns)], 1)

    return merge, unmerge


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


class ToMeHooks:
    """tomesd's block patch as forward hooks: per block one matching, merge around each listed sublayer.

    Args:
        model: a diffusers transformer.
        sublayers: module paths to merge around (``transformer_blocks.0.attn1``), in execution order per block.
        grid: the token grid (rows, cols).
        r: tokens merged away per block, or block path -> r.
        rand_idx: dst per cell, ``[rows // 2, cols // 2]``.
        metric: "block" (the block's input, tomesd) or "sublayer" (the first merged sublayer's input).
        bands: horizontal bands, each its own bipartite problem.
        cache: CA-ToMe's cached matching: block -> (merge, unmerge); filled when ``record`` is set,
            reused instead of matching otherwise.
        threshold: CA-ToMe's adaptive r: each block merges :func:`threshold_count` tokens of this call
            (``r`` is then ignored; ``self.used_r`` records them).
    """

    def __init__(self, model: torch.nn.Module, sublayers: list[str], grid: tuple[int, int], r: int | dict[str, int],
                 rand_idx: torch.Tensor | None, metric: str = "block", bands: int = 1, mode: str = "mean",
                 cache: dict[str, tuple[Fn, Fn]] | None = None, record: bool = False,
                 threshold: float | None = None) -> None:
        self.model, self.sublayers, self.grid, self.r = model, sublayers, grid, r
        self.rand_idx, self.metric, self.bands, self.mode = rand_idx, metric, bands, mode
        self.cache, self.record, self.threshold = cache, record, threshold
        self.used_r: dict[str, int] = {}
        self._block_x: dict[str, torch.Tensor] = {}
        self._fns: dict[str, tuple[Fn, Fn]] = {}

    def _fns_for(self, block: str, x: torch.Tensor) -> tuple[Fn, Fn]:
        if block not in self._fns:
            if self.cache is not None and not self.record:
                self._fns[block] = self.cache[block]
            else:
                h, w = self.grid
                r = self.r[block] if isinstance(self.r, dict) else self.r
                metric = self._block_x[block] if self.metric == "block" else x
                if self.threshold is not None:
                    r = threshold_count(metric, self.grid, self.rand_idx, self.threshold)
                self.used_r[block] = r
                self._fns[block] = banded_matching(metric, w, h, 2, 2, r, self.rand_idx, self.bands, self.mode)
                if self.cache is not None:
                    self.cache[block] = self._fns[block]
        return self._fns[block]

    @contextlib.contextmanager
    def installed(self) -> Iterator[ToMeHooks]:
        def start(*_):
            self._fns.clear()
            self._block_x.clear()

        handles = [self.model.register_forward_pre_hook(start)]
        blocks = list(dict.fromkeys(p.rsplit(".", 1)[0] for p in self.sublayers))
        for block in blocks:
            def keep(_m, args, kwargs, block=block):
                self._block_x[block] = _hidden(args, kwargs)
            handles.append(self.model.get_submodule(block).register_forward_pre_hook(keep, with_kwargs=True))
        for path in self.sublayers:
            block = path.rsplit(".", 1)[0]
            module = self.model.get_submodule(path)

            def pre(_m, args, kwargs, block=block):
                x = _hidden(args, kwargs)
                return _with_hidden(args, kwargs, self._fns_for(block, x)[0](x))

            def post(_m, _args, _kwargs, out, block=block):
                un = self._fns[block][1]
                return (un(out[0]), *out[1:]) if isinstance(out, tuple) else un(out)
            handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)]
        try:
            yield self
        finally:
            for hd in handles:
                hd.remove()


def threshold_count(metric: torch.Tensor, grid: tuple[int, int], rand_idx: torch.Tensor, threshold: float) -> int:
    """CA-ToMe's adaptive r (``ca_tome/merge.py``): the most src tokens, over the batch, whose best cosine
    similarity to a dst reaches ``threshold``."""
    h, w = grid
    hsy, wsx = h // 2, w // 2
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    cy, cx = torch.meshgrid(torch.arange(hsy), torch.arange(wsx), indexing="ij")
    is_dst[cy * 2 + rand_idx // 2, cx * 2 + rand_idx % 2] = True
    is_dst = is_dst.reshape(-1)
    m = metric / metric.norm(dim=-1, keepdim=True)
    best = (m[:, ~is_dst] @ m[:, is_dst].transpose(-1, -2)).max(-1).values
    return int((best >= threshold).sum(-1).max())
