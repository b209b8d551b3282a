"""Eager twin of the AT-EDM pass: the same pruning as forward hooks on the diffusers model.

The pruning block's self-attention runs as usual; hooks on its ``to_q`` / ``to_k`` keep the q and k it
computes (what the graph reads at the fused ``Attention`` op). The block's output is scored and pruned,
the later blocks run on the kept tokens, and the last block's output is refilled to the full grid
before the model's output layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from passes.atedm import eager as atedm_math


class ATEDMTwin:
    """AT-EDM on a diffusers transformer.

    Args:
        model: the diffusers transformer.
        prune_block: module path of the pruning block (``transformer_blocks.1``).
        last_block: module path of the last block, whose output is refilled.
        kept: tokens kept after the pruning block.
        stride: every ``stride``-th query row enters the importance.
        iterations: WPR iterations.
        static: fixed scores ``[1, 1, N]`` instead of the attention's (the "static" ablation).
        refill: "delta" (the pruned token's own stream plus its best kept token's update) or "copy".
    """

    def __init__(self, model: torch.nn.Module, prune_block: str, last_block: str, kept: int, stride: int,
                 iterations: int, static: torch.Tensor | None = None, refill: str = "delta") -> None:
        self.model, self.prune_block, self.last_block = model, prune_block, last_block
        self.kept, self.stride, self.iterations, self.static = kept, stride, iterations, static
        self.refill = refill
        self.attn = model.get_submodule(f"{prune_block}.attn1")
        self._qk: dict[str, torch.Tensor] = {}
        self._prune: atedm_math.TorchPrune | None = None
        self._x: torch.Tensor | None = None
        self.last_keep: torch.Tensor | None = None  # kept positions of the latest call, for inspection

    @contextlib.contextmanager
    def installed(self) -> Iterator[ATEDMTwin]:
        handles = [self.model.register_forward_pre_hook(lambda *_: self._reset()),
                   self.attn.to_q.register_forward_hook(self._capture("q")),
                   self.attn.to_k.register_forward_hook(self._capture("k")),
                   self.model.get_submodule(self.prune_block).register_forward_hook(self._after_prune_block),
                   self.model.get_submodule(self.last_block).register_forward_hook(self._after_last_block)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._reset()

    def _reset(self) -> None:
        self._qk.clear()
        self._prune = self._x = None

    def _capture(self, which: str):
        def hook(_module, _args, output):
            b, n, _ = output.shape
            heads = self.attn.heads
            t = output.view(b, n, heads, -1).transpose(1, 2)  # [B, H, N, D], as diffusers' processors
            norm = getattr(self.attn, f"norm_{which}", None)
            self._qk[which] = norm(t) if norm is not None else t
        return hook

    def _after_prune_block(self, _module, _args, output):
        x = output[0] if isinstance(output, tuple) else output
        if self.static is not None:
            scores = self.static.to(x.dtype).expand(x.shape[0], 1, -1)
        else:
            scores = atedm_math.importance(self._qk["q"], self._qk["k"], self.attn.scale, self.stride,
                                           self.iterations)
        self._prune, self._x = atedm_math.select(x, scores, self.kept), x
        self.last_keep = self._prune.keep
        pruned = atedm_math.prune(x, self._prune)
        return (pruned, *output[1:]) if isinstance(output, tuple) else pruned

    def _after_last_block(self, _module, _args, output):
        if self._prune is None:
            raise RuntimeError(f"{self.last_block} ran before the pruning block {self.prune_block}")
        y = output[0] if isinstance(output, tuple) else output
        full = atedm_math.refill(y, self._prune, self._x if self.refill == "delta" else None)
        return (full, *output[1:]) if isinstance(output, tuple) else full
