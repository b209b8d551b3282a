"""SDTM's two merges as the released code defines them (``ICTMCG/SDTM`` ``TR_SDTM.py``; docs/design.md, SDTM).

- Structure stage, SSM: score each 2x2 window by the mean of its 16 pairwise cosine similarities (self
  pairs included) plus ``a_s`` times the window mean of ``c / (mean(c) + 1e-6)`` (the staleness counter);
  the ``k`` best windows collapse to the mean of their 4 tokens, unmerge copies the mean back.
- Detail stage, FIDM: in each 2x2 window the stalest token is dst; tomesd's bipartite merge of the
  ``r`` best src (:func:`tests.reference.tome.banded_matching`).
- The counter: 0 for a token left unmerged by a block's merge, +1 for every other token.
- Protected-step cache: at merged positions ``blend * computed + (1 - blend) * cached``.

Here a merge is written as groups: every token belongs to one group, the merged tensor holds the mean of
each group (``scatter_reduce(mean)``), unmerge reads each position's group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tests.reference.tome import _hidden, _with_hidden, banded_matching


def windows(grid: tuple[int, int]) -> torch.Tensor:
    """``[Nw, 4]`` token positions of the 2x2 windows, row-major."""
    h, w = grid
    out = [[2 * i * w + 2 * j, 2 * i * w + 2 * j + 1, (2 * i + 1) * w + 2 * j, (2 * i + 1) * w + 2 * j + 1]
           for i in range(h // 2) for j in range(w // 2)]
    return torch.tensor(out, dtype=torch.int64)


def window_scores(metric: torch.Tensor, counter: torch.Tensor, grid: tuple[int, int], a_s: float) -> torch.Tensor:
    """SSM's score ``[B, Nw]``: mean pairwise cosine similarity of the window + a_s * its mean staleness."""
    win = windows(grid)
    m = metric / metric.norm(dim=-1, keepdim=True)
    t = m[:, win]  # [B, Nw, 4, C]
    sim = (t @ t.transpose(-1, -2)).mean((-1, -2))
    prio = counter / (counter.mean(1, keepdim=True) + 1e-6)
    return sim + a_s * prio[:, win].mean(-1)


def group_merge(groups: torch.Tensor, num_groups: int):
    """Merge/unmerge for ``groups [B, N]`` (the group of each token): group means, and back by gather."""
    def merge(x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        out = torch.zeros(b, num_groups, c, dtype=x.dtype)
        return out.scatter_reduce(1, groups[..., None].expand(-1, -1, c), x, reduce="mean", include_self=False)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        return y.gather(1, groups[..., None].expand(-1, -1, y.shape[-1]))

    return merge, unmerge


def ssm(metric: torch.Tensor, counter: torch.Tensor, grid: tuple[int, int], k: int, a_s: float):
    """Structure-stage merge: (merge, unmerge, merged ``[B, N]`` bool: the token lies in a chosen window)."""
    b, n, _ = metric.shape
    win = windows(grid)
    chosen = window_scores(metric, counter, grid, a_s).argsort(-1, descending=True)[:, :k]  # [B, k]
    merged = torch.zeros(b, n, dtype=torch.bool)
    groups = torch.arange(n).repeat(b, 1)  # a token on its own is its own group ...
    for i in range(b):
        pos = win[chosen[i]]  # [k, 4]
        merged[i, pos.reshape(-1)] = True
        groups[i, pos] = n + torch.arange(k)[:, None]  # ... a chosen window is one group
    # renumber to 0..N-3k-1: the merged tensor's rows
    rows = torch.stack([torch.unique(g, return_inverse=True)[1] for g in groups])
    merge, unmerge = group_merge(rows, n - 3 * k)
    return merge, unmerge, merged


def stalest_dst(counter: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """FIDM's dst per window: the token with the highest counter (first on ties), ``[rows // 2, cols // 2]``."""
    h, w = grid
    return counter.reshape(-1)[windows(grid)].argmax(-1).reshape(h // 2, w // 2)


def fidm(metric: torch.Tensor, grid: tuple[int, int], r: int, rand_idx: torch.Tensor, bands: int = 1):
    """Detail-stage merge: tomesd's matching with the given dst; (merge, unmerge, merged ``[B, N]`` bool).

    merged = every dst and every src that merged (unmerged src are the "independent" tokens).
    """
    b, n, _ = metric.shape
    h, w = grid
    merge, unmerge = banded_matching(metric, w, h, 2, 2, r, rand_idx, bands)
    is_dst = torch.zeros(n, dtype=torch.bool)
    is_dst[windows(grid).gather(1, rand_idx.reshape(-1, 1)).reshape(-1)] = True
    probe = torch.randn(b, n, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    own = torch.isclose(unmerge(merge(probe)), probe, rtol=0, atol=1e-9).all(-1)  # a src left alone reads itself
    return merge, unmerge, is_dst | ~own


class SdtmHooks:
    """One SDTM bucket graph's computation as hooks on the diffusers model.

    Args:
        model: a diffusers transformer.
        meta: the graph's ``sdtm`` metadata, read only for *where*: merged sublayers, each block's
            metric sublayer (the attention input), merge kind, k / r, a_s, blend.
        counter: ``[B, N]`` staleness counters in; ``self.counter`` holds them after the forward.
        rand_idx: FIDM's dst per window (detail stage).
        caches: sublayer path -> ``[B, N, C]`` output cached at the last protected step.
    """

    def __init__(self, model: torch.nn.Module, meta: dict, counter: torch.Tensor, rand_idx: torch.Tensor | None = None,
                 caches: dict[str, torch.Tensor] | None = None) -> None:
        self.model, self.meta, self.counter0 = model, meta, counter
        self.rand_idx, self.caches = rand_idx, caches or {}
        self.counter = counter
        self._fns: dict[str, tuple] = {}

    def _match(self, block: str, x: torch.Tensor):
        if block not in self._fns:
            grid = tuple(self.meta["grid"])
            if self.meta["merge"] == "window":
                fns = ssm(x, self.counter, grid, self.meta["k"], self.meta["a_s"])
            else:
                fns = fidm(x, grid, self.meta["r"], self.rand_idx, self.meta.get("bands", 1))
            merged = fns[2]
            self.counter = torch.where(merged, self.counter + 1, torch.zeros_like(self.counter))
            self._fns[block] = fns
        return self._fns[block]

    @contextlib.contextmanager
    def installed(self) -> Iterator[SdtmHooks]:
        def start(*_):
            self._fns.clear()
            self.counter = self.counter0

        handles = [self.model.register_forward_pre_hook(start)]
        merged_sites = set(self.meta["sites"])
        metric_of = self.meta["metric_sites"]  # block -> its attention sublayer
        paths = list(dict.fromkeys([*metric_of.values(), *self.meta["sites"]]))
        for path in paths:
            block = path.rsplit(".", 1)[0]
            module = self.model.get_submodule(path)

            def pre(_m, args, kwargs, block=block, path=path):
                x = _hidden(args, kwargs)
                if metric_of.get(block) == path:
                    self._match(block, x)
                if path not in merged_sites:
                    return None
                return _with_hidden(args, kwargs, self._fns[block][0](x))

            def post(_m, _args, _kwargs, out, block=block, path=path):
                if path not in merged_sites:
                    return None
                y = out[0] if isinstance(out, tuple) else out
                _, unmerge, merged = self._fns[block]
                y = unmerge(y)
                if self.meta.get("blend") is not None:
                    wgt = self.meta["blend"]
                    y = torch.where(merged[..., None], wgt * y + (1 - wgt) * self.caches[path], y)
                return (y, *out[1:]) if isinstance(out, tuple) else y
            handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)]
        try:
            yield self
        finally:
            for hd in handles:
                hd.remove()
