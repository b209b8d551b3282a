"""Every inserted subgraph's math in fp16 and bf16 at 4096 tokens with activations near 1e3.

What runs: the eager twins (``passes/*/eager.py``, op for op the graphs' math, including the scaled
cosine norm and the divide-before-sum merge) on torch CPU tensors of the reduced dtype; AT-EDM's
importance in fp32, as the engine pins it (``PIN_FP32`` nodes). For each method: nothing overflows,
the index bookkeeping (ranks, maps, gathers) is an exact partition of the tokens, and every merge
choice that differs from fp32 has an fp32 score gap within the reduced dtype's rounding of the scores
(``tie_tol``: twice the largest score error measured in that run). Each test also shows the failure the
fix removes (unscaled norm: inf; float ranks: wrong above 2048).
"""

from __future__ import annotations

import logging

import pytest
import torch

from passes.partition import draw_partition
from passes.sdtm.graph import WindowGeometry
from passes.tome.eager import best_match, match, merge, unit, unmerge

logger = logging.getLogger(__name__)

GRID = (64, 64)  # 4096 tokens
N = GRID[0] * GRID[1]
C = 64
MAGNITUDE = 1e3
DTYPES = [torch.float16, torch.bfloat16]


def _x(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish tokens (neighbours alike, as in images) plus noise, scaled to ~1e3
    base = torch.randn(1, GRID[0] // 4, GRID[1] // 4, C, generator=g)
    base = base.repeat_interleave(4, 1).repeat_interleave(4, 2).reshape(1, N, C)
    return MAGNITUDE * (base + 0.5 * torch.randn(1, N, C, generator=g))


def test_unscaled_norm_overflows_fp16_and_the_scaled_one_does_not():
    x = _x().half()
    plain = x / x.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-6)
    assert not torch.isfinite(x.square().sum(-1)).all() and (plain == 0).all()  # the old norm: inf, then zeros
    m = unit(x)
    assert torch.isfinite(m).all()
    err = (m.float() - unit(x.float())).abs().max().item()
    assert err <= 2e-3, err  # fp16 rounding of unit vectors (eps 2^-11 ~ 4.9e-4, a few roundings)


def test_float_ranks_are_wrong_above_2048_and_integer_ranks_exact():
    """The old inverse permutation (sort of the float-cast order) breaks in fp16; the int64 one cannot."""
    order = torch.randperm(3072, generator=torch.Generator().manual_seed(0))
    exact = torch.empty_like(order)
    exact[order] = torch.arange(3072)
    via_fp16 = torch.sort(order.half().float(), stable=True).indices
    wrong = int((via_fp16 != exact).sum())
    assert wrong > 0  # 3072 ranks through fp16: some tokens would read other tokens' rows
    scattered = order.clone().scatter_(0, order, torch.arange(3072))  # the graph's ScatterElements
    assert torch.equal(scattered, exact)
    logger.info("float ranks through fp16: %d of 3072 wrong", wrong)


def _check_tome_partition(mt, n: int, r: int) -> None:
    """unm, mrg and dst are disjoint and cover every token; the unmerge map points each at its row."""
    unm, mrg, dst = mt.unm.reshape(-1), mt.mrg.reshape(-1), mt.dst.reshape(-1)
    assert torch.equal(torch.sort(torch.cat([unm, mrg, dst])).values, torch.arange(n))
    u = unm.numel()
    row = mt.row[0]
    assert torch.equal(row[unm], torch.arange(u))
    assert torch.equal(row[dst], u + torch.arange(dst.numel()))
    assert torch.equal(row[mrg], u + mt.mrg_dst.reshape(-1))
    assert mrg.numel() == r
    assert torch.equal(mt.count.reshape(-1), 1 + torch.bincount(mt.mrg_dst.reshape(-1), minlength=dst.numel()).to(mt.count.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_tome_in_reduced_precision(dtype):
    x32 = _x()
    part, inv = (torch.from_numpy(a) for a in draw_partition(GRID, rng=None))
    num_src, r = N - N // 4, N // 2  # 3072 src, 2048 merged
    x = x32.to(dtype)
    max32, idx32 = best_match(x32, part, num_src)
    maxlo, idxlo = best_match(x, part, num_src)
    assert torch.isfinite(maxlo).all()
    ref = match(x32, part, inv, num_src, r)
    mt = match(x, part, inv, num_src, r)
    _check_tome_partition(mt, N, r)

    # scores: rounding error of the reduced dtype, measured; a choice may flip only within it
    m32 = unit(x32)
    scores32 = m32[:, part[:num_src]] @ m32[:, part[num_src:]].transpose(-1, -2)
    mlo = unit(x)
    scoreslo = (mlo[:, part[:num_src]] @ mlo[:, part[num_src:]].transpose(-1, -2)).float()
    tie_tol = 2 * (scoreslo - scores32).abs().max().item()
    # best dst: where the choices differ, fp32 scores of the two dsts are within tie_tol
    diff_dst = (idxlo != idx32).reshape(-1).nonzero().reshape(-1)
    gaps = (scores32[0, diff_dst, idx32.reshape(-1)[diff_dst]] - scores32[0, diff_dst, idxlo.reshape(-1)[diff_dst]])
    assert (gaps.abs() <= tie_tol).all(), (gaps.abs().max(), tie_tol)
    # merged set: a src merged in one run and not the other sits within tie_tol of fp32's r-th score
    s32 = max32.reshape(-1)
    threshold = torch.sort(s32, descending=True).values[r - 1]
    flipped = set(mt.mrg.reshape(-1).tolist()) ^ set(ref.mrg.reshape(-1).tolist())
    pos_to_src = {int(p): i for i, p in enumerate(part[:num_src].tolist())}
    flip_gaps = torch.tensor([abs(float(s32[pos_to_src[p]] - threshold)) for p in flipped] or [0.0])
    assert (flip_gaps <= tie_tol).all(), (flip_gaps.max(), tie_tol)

    # merge and unmerge in the reduced dtype: finite, and where the choices agree, the mean of the same tokens
    y = merge(x, mt)
    assert torch.isfinite(y).all() and y.abs().max() <= x.abs().max() * 1.01
    back = unmerge(y, mt)
    assert torch.isfinite(back).all()
    agree = ~torch.isin(torch.arange(N), torch.tensor(sorted(flipped), dtype=torch.long))
    unm_rows = torch.isin(torch.arange(N), mt.unm.reshape(-1)) & agree
    assert torch.equal(back[0, unm_rows], x[0, unm_rows])  # unmerged tokens come back bit for bit
    logger.info("ToMe %s: %d of %d dst choices and %d of %d merge memberships differ from fp32 (ties within %.2e)",
                dtype, len(diff_dst), num_src, len(flipped), r, tie_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_sdtm_in_reduced_precision(dtype):
    from passes.sdtm.eager import counter_update, gather_unmerge, window_match, window_merge, window_scores

    geo = WindowGeometry(GRID, 256)
    x32 = _x(1)
    counter32 = torch.randint(0, 30, (1, N)).float()
    s32 = window_scores(x32, counter32, geo, 1.0)
    slo = window_scores(x32.to(dtype), counter32.to(dtype), geo, 1.0)
    assert torch.isfinite(slo).all()
    tie_tol = 2 * (slo.float() - s32).abs().max().item()
    ref = window_match(x32, counter32, geo, 1.0)
    mt = window_match(x32.to(dtype), counter32.to(dtype), geo, 1.0)
    # exact bookkeeping: chosen windows' tokens and the single tokens partition the grid; map rows are right
    win, unm = mt.win.reshape(-1), mt.unm.reshape(-1)
    assert torch.equal(torch.sort(torch.cat([win, unm])).values, torch.arange(N))
    row = mt.row[0]
    assert torch.equal(row[unm], torch.arange(unm.numel()))
    assert torch.equal(row[mt.win[0]], (unm.numel() + torch.arange(geo.k))[:, None].expand(-1, 4))
    # a window chosen in one run only sits within tie_tol of fp32's k-th score
    windows = torch.from_numpy(geo.windows())
    chosen = lambda m: {int(w) for w in (m.win[0, :, 0:1] == windows[:, 0]).nonzero()[:, 1]}  # noqa: E731
    flipped = chosen(mt) ^ chosen(ref)
    kth = torch.sort(s32.reshape(-1), descending=True).values[geo.k - 1]
    gaps = torch.tensor([abs(float(s32[0, w] - kth)) for w in flipped] or [0.0])
    assert (gaps <= tie_tol).all(), (gaps.max(), tie_tol)
    xm = window_merge(x32.to(dtype), mt)
    assert torch.isfinite(xm).all() and torch.isfinite(gather_unmerge(xm, mt.row)).all()
    c = counter_update(counter32.to(dtype), mt.independent)
    assert torch.equal(c.float(), counter_update(counter32, mt.independent))  # small integer counts: exact
    logger.info("SDTM %s: %d of %d chosen windows differ from fp32 (ties within %.2e)", dtype, len(flipped), geo.k,
                tie_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_atedm_in_reduced_precision(dtype):
    from passes.atedm.eager import importance, prune, refill, select

    g = torch.Generator().manual_seed(2)
    q32, k32 = MAGNITUDE * torch.randn(1, 2, N, 16, generator=g), MAGNITUDE * torch.randn(1, 2, N, 16, generator=g)
    if dtype == torch.float16:  # why the engine pins the importance to fp32: q k^T of such q, k overflows fp16
        assert not torch.isfinite(importance(q32.to(dtype), k32.to(dtype), 0.25, 64, 1)).all()
    scores = importance(q32, k32, 0.25, 64, 1)  # fp32, as the pinned engine layers compute it
    assert torch.isfinite(scores).all()
    kept = 3000
    x32 = _x(3)
    ref = select(x32, scores, kept)
    pr = select(x32.to(dtype), scores, kept)  # TopK on the fp32 scores (pinned), the rest in the reduced dtype
    assert torch.equal(pr.keep, ref.keep)
    # exact bookkeeping at 4096 positions: kept positions read their own slot
    slot_of = torch.empty(N, dtype=torch.long)
    slot_of[pr.keep[0]] = torch.arange(kept)
    assert torch.equal(pr.row[0, pr.keep[0]], torch.arange(kept))
    # refill choices of pruned positions differ only at ties of the fp32 similarity
    m32 = unit(x32)
    sim32 = m32 @ m32[0, ref.keep[0]].T  # [1, N, k]
    mlo = unit(x32.to(dtype))
    simlo = (mlo @ mlo[0, pr.keep[0]].T).float()
    tie_tol = 2 * (simlo - sim32).abs().max().item()
    pruned = torch.ones(N, dtype=torch.bool)
    pruned[ref.keep[0]] = False
    differ = (pr.row[0] != ref.row[0]) & pruned
    idx = differ.nonzero().reshape(-1)
    gaps = (sim32[0, idx, ref.row[0, idx]] - sim32[0, idx, pr.row[0, idx]]).abs()
    assert (gaps <= tie_tol).all()
    y = prune(x32.to(dtype), pr)
    out = refill(y, pr, x32.to(dtype))
    assert torch.isfinite(out).all()
    logger.info("AT-EDM %s: %d of %d refill sources differ from fp32 (ties within %.2e)", dtype, int(differ.sum()),
                N - kept, tie_tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_mod_index_map_in_reduced_precision(dtype):
    """MoD's combine map: one-hot Equal cast to the reduced dtype, ArgMax = the routed rank, exact at 4096."""
    g = torch.Generator().manual_seed(4)
    k = 3000
    idx = torch.randperm(N, generator=g)[:k][None]  # [1, k] routed positions
    onehot = (idx[:, :, None] == torch.arange(N)).to(dtype)  # [1, k, N]
    rank = onehot.argmax(1)
    hit = onehot.amax(1) > 0.5
    expect = torch.full((N,), -1)
    expect[idx[0]] = torch.arange(k)
    assert torch.equal(hit[0], expect >= 0) and torch.equal(rank[0][hit[0]], expect[expect >= 0])
