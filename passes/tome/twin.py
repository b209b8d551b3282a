"""Eager twins: the same merge math as forward hooks on the diffusers model.

The tests compare a bucket graph with its twin on the same inputs and partition; ``export`` uses the
twin to measure method fidelity. Sites are named by module path (``transformer_blocks.3.attn1``),
the names the ONNX pass records in the graph, so twin and graph merge at the same places.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from passes.tome import eager as tome_math


def _image_arg(args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
    if args:
        return args[0], lambda v: ((v, *args[1:]), kwargs)
    return kwargs["hidden_states"], lambda v: (args, {**kwargs, "hidden_states": v})


class ToMeTwin:
    """ToMe on the given sites of a diffusers transformer, matching once per block.

    Args:
        model: the diffusers transformer.
        sites: module paths to merge around, in execution order within each block.
        num_src: number of src tokens of the partition.
        r: tokens merged away; or block path -> its r (per-block calibration).
        bands: horizontal bands of the grid, each matched on its own.
        metric: "sublayer" (match on the first merged sublayer's input) or "block" (on the block's input).
        metric_blocks: with metric "block", the blocks that match on their input (None: every block);
            the others match on their sublayer input, as the pass does where a block has no single input.
        match_every: one matching serves this many consecutive blocks (the first one's), as the pass's option.
    """

    def __init__(self, model: torch.nn.Module, sites: list[str], num_src: int, r: int | dict[str, int],
                 bands: int = 1, metric: str = "sublayer", metric_blocks: list[str] | None = None,
                 match_every: int = 1) -> None:
        self.model, self.sites, self.num_src, self.r, self.bands = model, sites, num_src, r, bands
        blocks = list(dict.fromkeys(p.rsplit(".", 1)[0] for p in sites))
        self.leader = {b: blocks[i // match_every * match_every] for i, b in enumerate(blocks)}
        self.metric_blocks = set(blocks if metric_blocks is None else metric_blocks) if metric == "block" else set()
        self._block_x: dict[str, torch.Tensor] = {}
        self.partition: torch.Tensor | None = None
        self.partition_inv: torch.Tensor | None = None
        self._matches: dict[str, tome_math.TorchMatch] = {}

    @classmethod
    def from_meta(cls, model: torch.nn.Module, meta: dict) -> ToMeTwin:
        """The twin of a merged graph from its ToMe metadata (sites, r or r per block, bands, metric)."""
        return cls(model, meta["sites"], meta["num_src"], meta.get("r_blocks") or meta["r"], meta.get("bands", 1),
                   meta.get("metric", "sublayer"), meta.get("metric_blocks"), meta.get("match_every", 1))

    def set_partition(self, partition: torch.Tensor, partition_inv: torch.Tensor) -> None:
        self.partition, self.partition_inv = torch.as_tensor(partition), torch.as_tensor(partition_inv)

    @contextlib.contextmanager
    def installed(self) -> Iterator[ToMeTwin]:
        handles = [self.model.register_forward_pre_hook(lambda *_: self._matches.clear())]
        for block in self.metric_blocks:
            handles.append(self.model.get_submodule(block).register_forward_pre_hook(self._capture(block),
                                                                                     with_kwargs=True))
        for path in self.sites:
            module = self.model.get_submodule(path)
            block = self.leader[path.rsplit(".", 1)[0]]  # the block whose matching this site uses
            handles.append(module.register_forward_pre_hook(self._pre(block), with_kwargs=True))
            handles.append(module.register_forward_hook(self._post(block), with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._matches.clear()
            self._block_x.clear()

    def _capture(self, block: str):
        def hook(_module, args, kwargs):
            self._block_x[block] = _image_arg(args, kwargs)[0]
        return hook

    def _pre(self, block: str):
        def hook(_module, args, kwargs):
            x, rebuild = _image_arg(args, kwargs)
            if block not in self._matches:
                self._matches[block] = self._match(block, self._block_x[block] if block in self.metric_blocks else x)
            return rebuild(tome_math.merge(x, self._matches[block]))
        return hook

    def _match(self, block: str, x: torch.Tensor) -> tome_math.TorchMatch:
        """The matching of ``block`` for input ``x`` (subclasses may reuse cached indices)."""
        if self.partition is None:
            raise RuntimeError("ToMeTwin.set_partition() was not called")
        r = self.r[block] if isinstance(self.r, dict) else self.r
        return tome_math.match(x, self.partition, self.partition_inv, self.num_src, r, self.bands)

    def _post(self, block: str):
        def hook(_module, _args, _kwargs, output):
            mt = self._matches[block]
            if isinstance(output, tuple):
                return (tome_math.unmerge(output[0], mt), *output[1:])
            return tome_math.unmerge(output, mt)
        return hook
