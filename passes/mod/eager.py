"""DiffRatio-MoD (DiffCR) routing in PyTorch: the fine-tuning model and the eager twin of :mod:`passes.mod.graph`.

Per transformer block a router ``s = sigmoid(Linear(C -> 1)(x))`` scores every token; the ``k`` best
tokens run the whole block (attention among themselves, MLP, adaLN conditioning), the others bypass
it. Routed tokens take ``x + s * (block(x_r) - x_r)``: the block's update scaled by the router score,
so the router gets gradients through the otherwise discrete selection.

"Ratio" here is DiffCR's *compression* ratio: the share of tokens that skip the block. ``k`` is
``ceil((1 - ratio) * N)``. Ratios are learnable per (timestep region, layer); in training the block runs
at the two neighbouring 10 % bins and the outputs are interpolated by proximity (a straight-through
capacity, DiffCR §3.3); at export each ratio snaps to its nearest bin, so ``k`` is a constant per layer
per region. Op for op the same math as the graph; keep the two in step.

Deviations from the paper, and why:
- The router has a bias, initialized positive (``s`` about 0.95): the paper's router has none, and its
  ``s`` near 0.5 at the start halves every block update of the pretrained model; with the bias the
  fine-tuning starts close to the pretrained function.
- The score scales the whole block update (the paper's pseudo-code scales the MLP branch): one combine
  per block keeps the graph to one gather/combine pair per block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

BIN = 0.1  # DiffCR's ratio bins are 10 % apart


def capacity(ratio: float, tokens: int) -> int:
    """Tokens that run the block at compression ``ratio``: ceil((1 - ratio) * N), at least 1."""
    return max(1, math.ceil(round((1.0 - ratio) * tokens, 6)))


def snap(ratio: float, max_ratio: float, bin_width: float = BIN) -> float:
    """The nearest bin of a learned ratio, within [0, max_ratio]."""
    top = math.floor(round(max_ratio / bin_width, 6)) * bin_width
    return round(min(max(round(ratio / bin_width) * bin_width, 0.0), top), 6)


def neighbours(ratio: torch.Tensor, max_ratio: float, bin_width: float = BIN) -> list[tuple[float, torch.Tensor]]:
    """The two bins around ``ratio`` and their interpolation weights (differentiable in ``ratio``).

    22 % -> [(0.2, 0.8), (0.3, 0.2)]; a ratio on a bin (or at the top bin) gives one entry of weight 1.
    """
    value = float(ratio.detach())
    lo = math.floor(round(value / bin_width, 6)) * bin_width
    w = (ratio - lo) / bin_width
    if lo + bin_width > max_ratio + 1e-9 or float(w.detach()) <= 0:
        return [(round(lo, 6), torch.ones_like(ratio))]
    return [(round(lo, 6), 1 - w), (round(lo + bin_width, 6), w)]


def region_bounds(region: int, regions: int, num_train_timesteps: int) -> tuple[int, int]:
    """Timesteps [t_lo, t_hi] of ``region`` (0: the cleanest); region i holds i*T/R <= t < (i+1)*T/R."""
    t_lo = math.ceil(region * num_train_timesteps / regions)
    t_hi = math.ceil((region + 1) * num_train_timesteps / regions) - 1
    return t_lo, t_hi


def region_of(t: float, regions: int, num_train_timesteps: int) -> int:
    return min(regions - 1, max(0, math.floor(t * regions / num_train_timesteps)))


def route(block_forward, x: torch.Tensor, scores: torch.Tensor, k: int, args: tuple, kwargs: dict) -> torch.Tensor:
    """One block at capacity ``k``: TopK by score, the block on the routed tokens, scaled update, the rest bypass.

    ``x [B, N, C]``, ``scores [B, N]``; the graph builds the same values (:func:`passes.mod.graph.build_route`).
    """
    b, n, c = x.shape
    if k >= n:  # every token runs the block (no selection, no gather: attention is order-free)
        return x + scores[..., None] * (block_forward(x, *args, **kwargs) - x)
    s_r, idx = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    gather = idx[..., None].expand(b, k, c)
    x_r = x.gather(1, gather)
    delta = s_r[..., None] * (block_forward(x_r, *args, **kwargs) - x_r)
    return x + torch.zeros_like(x).scatter(1, gather, delta)


class MoDRouting(torch.nn.Module):
    """Routers and learnable compression ratios of a diffusers DiT, installed by patching block forwards.

    Args:
        channels: the blocks' hidden size.
        layers: number of transformer blocks.
        regions: timestep regions, each with its own ratio per layer.
        num_train_timesteps: the timestep range the regions split.
        max_ratio: the largest compression ratio (DiffCR's pseudo-code keeps at least 30 %: 0.7).
        init_bias: router bias at the start (sigmoid(3) = 0.95; see the module notes).
        init_ratio: compression ratio at the start (DiffCR's "zero initialization": 0).
    """

    def __init__(self, channels: int, layers: int, regions: int = 10, num_train_timesteps: int = 1000,
                 max_ratio: float = 0.7, init_bias: float = 3.0, init_ratio: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.routers = torch.nn.ModuleList(torch.nn.Linear(channels, 1) for _ in range(layers))
        with torch.no_grad():
            for r in self.routers:
                r.weight.copy_(torch.randn(r.weight.shape, generator=gen) * channels**-0.5)
                r.bias.fill_(init_bias)
        self.ratios = torch.nn.Parameter(torch.full((regions, layers), float(init_ratio)))
        self.regions, self.layers, self.num_train_timesteps = regions, layers, num_train_timesteps
        self.max_ratio = max_ratio
        self.fixed: list[int] | None = None  # per-layer k: the eager twin of one bucket graph
        self.region: int | None = None  # training: the region of the current batch (all samples share it)

    def clamp_(self) -> None:
        """Keep the ratios in [0, max_ratio] (projected after each optimizer step, so none gets stuck)."""
        with torch.no_grad():
            self.ratios.clamp_(0.0, self.max_ratio)

    def mean_ratio(self) -> torch.Tensor:
        """The expected compression over uniform timesteps: the mean over every region and layer."""
        return self.ratios.mean()

    def snapped(self) -> list[list[float]]:
        return [[snap(float(v), self.max_ratio) for v in row] for row in self.ratios.detach()]

    def capacities(self, region: int, tokens: int) -> list[int]:
        return [capacity(r, tokens) for r in self.snapped()[region]]

    def _plan(self, layer: int, x: torch.Tensor, timestep) -> list[tuple[int, torch.Tensor | None]]:
        n = x.shape[1]
        if self.fixed is not None:
            return [(self.fixed[layer], None)]
        region = self.region
        if region is None:
            t = torch.as_tensor(timestep).reshape(-1)
            regions = {region_of(float(v), self.regions, self.num_train_timesteps) for v in t}
            if len(regions) != 1:
                raise ValueError(f"timesteps {t.tolist()} of one call fall in different regions")
            region = regions.pop()
        if not self.training:
            return [(self.capacities(region, n)[layer], None)]
        return [(capacity(r, n), w) for r, w in neighbours(self.ratios[region, layer], self.max_ratio)]

    @contextlib.contextmanager
    def installed(self, model: torch.nn.Module) -> Iterator[MoDRouting]:
        """Route every transformer block of ``model`` while the context is open."""
        blocks = list(model.transformer_blocks)
        if len(blocks) != self.layers:
            raise ValueError(f"the routing has {self.layers} layers, the model {len(blocks)} blocks")
        for i, block in enumerate(blocks):
            block.forward = self._routed(i, block.forward)
        try:
            yield self
        finally:
            for block in blocks:
                del block.forward  # back to the class's forward

    def _routed(self, layer: int, forward):
        router = self.routers[layer]

        def routed_forward(hidden_states, *args, **kwargs):
            x = hidden_states
            scores = torch.sigmoid(router(x)).squeeze(-1)
            out = None
            for k, w in self._plan(layer, x, kwargs.get("timestep")):
                y = route(forward, x, scores, k, args, kwargs)
                out = y if w is None else (w * y if out is None else out + w * y)
            return out
        return routed_forward

    def router_tensors(self) -> dict[str, torch.Tensor]:
        return {f"router.{i}.{name}": p.detach().clone().contiguous()
                for i, r in enumerate(self.routers) for name, p in r.named_parameters()}

    def load_router_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, r in enumerate(self.routers):
                r.weight.copy_(tensors[f"router.{i}.weight"])
                r.bias.copy_(tensors[f"router.{i}.bias"])
