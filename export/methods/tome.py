"""ToMe (tomesd's bipartite soft matching) as a plan method: one merged graph for every bucket.

The graph takes r as the length of its count input (``ToMeConfig.dynamic``, docs/design.md "a bucket is
a shape"), so every merged bucket references one file and the runtime opens one session (one TensorRT
engine with a profile per bucket). Where the plan also has unmerged buckets, option ``unmerged`` says what
they run: ``branch`` (default) joins the plain and the merged graph behind ``If(r == 0)``
(:func:`passes.branch.branch_on_zero`: still one graph, at the plain graph's speed); ``base`` runs
``base.onnx`` beside the merged graph (two sessions, the weights twice); ``merged`` the merged graph at
r = 0 (one graph, but the matching still runs: about 5 % slower than plain on DiT-XL/2, CPU).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from export.buckets import BucketSpec
from export.measure import feed_of, max_abs, tome_fidelity
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from passes.branch import branch_on_zero
from passes.errors import DitmergeError
from passes.flops import count_flops
from passes.onnxutil import get_model_meta
from passes.partition import draw_partition, num_dst, plan_bands
from passes.tome import (DEFAULT_LOCATIONS, DEFAULT_METRIC, R_COUNT, ToMeConfig, ToMePass, count_values,
    strip_bucket_meta)
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, max_ratio, merged_count


class ToMe(Method):
    name = "tome"
    # metric: what the matching compares, "sublayer" (the adaLN-modulated sublayer input) or "block" (the
    # block's input, as tomesd); benchmarks/deviations.py measures both
    # unmerged: what unmerged buckets run beside merged ones (see the module docstring)
    # match_every: one matching per run of k merged blocks (1: per block, as tomesd); its quality cost on the
    # bundled model is in the README
    defaults = {"locations": DEFAULT_LOCATIONS, "stride": (2, 2), "metric": DEFAULT_METRIC, "unmerged": "branch",
                "match_every": 1}
    UNMERGED = ("branch", "base", "merged")

    def config(self, ratio: float) -> ToMeConfig:
        return ToMeConfig(ratio=ratio, locations=tuple(self.options["locations"]),
                          stride=tuple(int(s) for s in self.options["stride"]), metric=str(self.options["metric"]),
                          match_every=self.options["match_every"], dynamic=True)

    def params(self) -> dict:
        return {"locations": list(self.options["locations"]), "stride": list(self.options["stride"]),
                "metric": self.options["metric"], "unmerged": self.options["unmerged"],
                **({"match_every": self.options["match_every"]} if self.options["match_every"] != 1 else {})}

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        for spec in specs:
            self.config(spec.ratio).validate(grid)
        if self.options["unmerged"] not in self.UNMERGED:
            raise DitmergeError(f"option unmerged={self.options['unmerged']!r}: choose from {', '.join(self.UNMERGED)}")
        rs = [self._r(grid, spec.ratio) for spec in specs]
        # merged and unmerged buckets in one plan: how the unmerged ones run (one graph unless unmerged=base)
        self._mixed = any(rs) and not all(rs)

    def _r(self, grid: tuple[int, int], ratio: float) -> int:
        cfg = self.config(ratio)
        n, bands = grid[0] * grid[1], self.bands(grid)
        return merged_count(ratio, n, n - num_dst(grid, cfg.stride)) // bands * bands

    def bands(self, grid: tuple[int, int]) -> int:
        cfg = self.config(0.0)
        return plan_bands(grid, cfg.stride, cfg.max_src_per_band)

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        return {**ToMePass(self.config(spec.ratio), bucket=index).stamp(), "ratio": spec.ratio, "bucket": index,
                "unmerged": self.options["unmerged"], "mixed": getattr(self, "_mixed", False)}

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        r = self._r(ctx.grid, spec.ratio)
        mode = self.options["unmerged"] if getattr(self, "_mixed", False) else "base"
        if r == 0 and mode == "base":
            return BucketGraphs({MAIN: None}, {"stride": list(self.options["stride"]), "bands": self.bands(ctx.grid)},
                                0, ctx.tokens)
        # the merged graph with r from shapes: the same for every ratio (built at any r > 0)
        res = ToMePass(self.config(spec.ratio if r else 0.5 * max_ratio(ctx.grid, self.config(0).stride)),
                       bucket=index)(ctx.base)
        meta = {**_tome_meta(res.model), "ratio": spec.ratio, "r": r}
        meta.pop("r_blocks", None)
        graph = strip_bucket_meta(res.model)  # equal for every bucket: the plan stores it once
        counts = count_values(meta)
        flops = count_flops(ctx.base) if r == 0 else count_flops(graph, counts)
        if mode == "branch":
            graph = branch_on_zero(ctx.base, graph, R_COUNT)
        return BucketGraphs({MAIN: graph}, meta, r, ctx.tokens - r, counts, flops)

    def extra_feed(self, ctx: BuildContext, meta: dict, variant: str, batch: int,
                   seed: int | None = None) -> dict[str, np.ndarray]:
        if not meta.get("sites"):  # the unmerged base graph
            return {}
        rng = None if seed is None else np.random.default_rng(seed)
        part, inv = draw_partition(ctx.grid, tuple(meta["stride"]), rng, meta.get("bands", 1))
        return {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        if not meta.get("r"):  # base.onnx, or the merged graph at r = 0: the eager model itself
            feed = {**feed_of(inputs), **self.extra_feed(ctx, meta, variant, 2, seed=0)}
            return max_abs(run(feed)["sample"], eager_forward(ctx.torch_model, inputs).numpy())
        return tome_fidelity(ctx.torch_model, SimpleNamespace(infer=run), inputs, meta, ctx.grid, seed=0)


def _tome_meta(model) -> dict:
    return json.loads(get_model_meta(model)["tome"])


METHOD = ToMe
__all__ = ["METHOD", "ToMe"]
