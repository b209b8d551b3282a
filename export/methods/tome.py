"""ToMe (tomesd's bipartite soft matching) as a plan method: one merged graph per bucket."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from export.buckets import BucketSpec
from export.measure import feed_of, max_abs, tome_fidelity
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from passes.onnxutil import get_model_meta
from passes.partition import draw_partition, plan_bands
from passes.tome import DEFAULT_LOCATIONS, DEFAULT_METRIC, PARTITION_INPUT, PARTITION_INV_INPUT, ToMeConfig, ToMePass


class ToMe(Method):
    name = "tome"
    # metric: what the matching compares, "sublayer" (the adaLN-modulated sublayer input) or "block" (the
    # block's input, as tomesd); benchmarks/deviations.py measures both
    defaults = {"locations": DEFAULT_LOCATIONS, "stride": (2, 2), "metric": DEFAULT_METRIC}

    def config(self, ratio: float) -> ToMeConfig:
        return ToMeConfig(ratio=ratio, locations=tuple(self.options["locations"]),
                          stride=tuple(int(s) for s in self.options["stride"]), metric=str(self.options["metric"]))

    def params(self) -> dict:
        return {"locations": list(self.options["locations"]), "stride": list(self.options["stride"]),
                "metric": self.options["metric"]}

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        for spec in specs:
            self.config(spec.ratio).validate(grid)

    def bands(self, grid: tuple[int, int]) -> int:
        cfg = self.config(0.0)
        return plan_bands(grid, cfg.stride, cfg.max_src_per_band)

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        return ToMePass(self.config(spec.ratio), bucket=index).stamp()

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        res = ToMePass(self.config(spec.ratio), bucket=index)(ctx.base)
        if not res.modified:
            return BucketGraphs({MAIN: None}, {"stride": list(self.options["stride"]), "bands": self.bands(ctx.grid)},
                                0, ctx.tokens)
        meta = _tome_meta(res.model)
        return BucketGraphs({MAIN: res.model}, meta, meta["r"], ctx.tokens - meta["r"])

    def extra_feed(self, ctx: BuildContext, meta: dict, variant: str, batch: int,
                   seed: int | None = None) -> dict[str, np.ndarray]:
        if not meta.get("r"):
            return {}
        rng = None if seed is None else np.random.default_rng(seed)
        part, inv = draw_partition(ctx.grid, tuple(meta["stride"]), rng, meta.get("bands", 1))
        return {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        if not meta.get("r"):
            return max_abs(run(feed_of(inputs))["sample"], eager_forward(ctx.torch_model, inputs).numpy())
        return tome_fidelity(ctx.torch_model, SimpleNamespace(infer=run), inputs, meta, ctx.grid, seed=0)


def _tome_meta(model) -> dict:
    return json.loads(get_model_meta(model)["tome"])


METHOD = ToMe
__all__ = ["METHOD", "ToMe"]
