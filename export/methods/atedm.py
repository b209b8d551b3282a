"""AT-EDM (Wang et al., CVPR 2024) as a plan method: attention-driven pruning, one graph per bucket.

Each bucket prunes the residual stream after one block to its ``k`` most important tokens (G-WPR on
a strided subset of the block's own attention rows), runs the later blocks on them and refills the
pruned positions before the output layer (:mod:`passes.atedm`). ``--buckets`` gives the share of
tokens pruned per bucket (pass it: the CLI's default ``0.3,0.2,0.1`` is ToMe's, which prunes most early).

``refill=delta`` (default) gives a pruned position its own stream at the pruning point plus the update
the later blocks made to its most similar kept token; ``refill=copy`` is the paper's literal copy of
that token's features (see :mod:`passes.atedm.graph` for why a DiT needs the former).
``importance=static`` replaces G-WPR by a fixed dither pattern (an ablation).

DSAP (denoising-steps-aware pruning) makes the noisiest ``dsap_buckets`` buckets prune less: the
pruning point moves ``dsap_shift`` blocks deeper and the ratio is scaled by ``dsap_scale``. Source of the
default (shift one block, same ratio, first bucket): AT-EDM's DSAP keeps the first attention block of
each down stage and the last of each up stage unpruned in the early steps and prunes the other blocks
as in the later steps (docs/design.md, AT-EDM, [ATEDM-sum]; project-page overview figure: "prune less" for the
first tau steps). A DiT has one stage, so "leave a block unpruned" becomes "prune one block later".
The paper's tau is not stated in the sources; the first bucket (a third of the timesteps with the
default three buckets) stands in for it.
"""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import torch

from export.buckets import BucketSpec
from export.measure import feed_of, max_abs
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from passes.atedm import ATEDMConfig, ATEDMPass, bucket_values, count_blocks
from passes.atedm.graph import static_scores
from passes.atedm.twin import ATEDMTwin
from passes.errors import DitmergeError
from passes.onnxutil import get_model_meta


class ATEDM(Method):
    name = "atedm"
    unsupported = {
        "sd3": "G-WPR and pruning are built for self-attention over the image tokens; MMDiT joint attention "
               "(image and text in one sequence) is not handled",
        "flux": "G-WPR and pruning are built for self-attention over the image tokens; Flux's joint and "
                "single-stream attention hold image and text in one sequence",
    }
    # one ratio for every bucket: DSAP, not the ratios, makes the early buckets prune less
    default_buckets = "0.3,0.3,0.3"
    defaults: ClassVar[dict[str, object]] = {
        "prune_layer": 1, "stride": 4, "iterations": 5, "importance": "gwpr", "refill": "delta",
        "dsap": True, "dsap_buckets": 1, "dsap_shift": 1, "dsap_scale": 1.0}

    def early(self, index: int | str) -> bool:
        """Whether bucket ``index`` (noisiest first) is in DSAP's prune-less phase."""
        return bool(self.options["dsap"]) and isinstance(index, int) and index < int(self.options["dsap_buckets"])

    def config(self, spec: BucketSpec, index: int | str) -> ATEDMConfig:
        o = self.options
        layer, ratio = int(o["prune_layer"]), float(spec.ratio)
        if self.early(index):
            layer, ratio = layer + int(o["dsap_shift"]), ratio * float(o["dsap_scale"])
        return ATEDMConfig(ratio=ratio, prune_layer=layer, stride=int(o["stride"]), iterations=int(o["iterations"]),
                           importance=str(o["importance"]), refill=str(o["refill"]))

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        o = self.options
        if int(o["dsap_buckets"]) < 0 or int(o["dsap_shift"]) < 0 or not 0 <= float(o["dsap_scale"]) <= 1:
            raise DitmergeError(f"DSAP prunes less in early buckets: dsap_buckets >= 0, dsap_shift >= 0 and "
                                f"0 <= dsap_scale <= 1; got {o['dsap_buckets']}, {o['dsap_shift']}, {o['dsap_scale']}")
        for i, spec in enumerate(specs):
            self.config(spec, i).validate(grid)

    def prepare(self, ctx: BuildContext) -> None:
        o, blocks = self.options, count_blocks(ctx.base)
        layers = {int(o["prune_layer"])}
        if o["dsap"] and int(o["dsap_buckets"]):
            layers.add(int(o["prune_layer"]) + int(o["dsap_shift"]))
        for layer in sorted(layers):
            ATEDMConfig(0.5, prune_layer=layer).validate(ctx.grid, blocks)

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        return {**ATEDMPass(self.config(spec, index)).stamp(), "bucket": index, "ratio": self.config(spec, index).ratio}

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        cfg = self.config(spec, index)
        res = ATEDMPass(cfg)(ctx.base)
        if not res.modified:
            return BucketGraphs({MAIN: None}, {"prune_layer": cfg.prune_layer, "ratio": cfg.ratio}, 0, ctx.tokens)
        # one graph per pruning layer; the bucket's kept tokens are a count input
        values = bucket_values(cfg, ctx.grid)
        counts = values.pop("counts")
        meta = {**json.loads(get_model_meta(res.model)["atedm"]), **values, "dsap_early": self.early(index)}
        return BucketGraphs({MAIN: res.model}, meta, ctx.tokens - meta["kept"], meta["kept"], counts)

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        out = run(feed_of(inputs))["sample"]  # ``run`` feeds the bucket's counts (export.build_measure.shape_feed)
        if "kept" not in meta:
            return max_abs(out, eager_forward(ctx.torch_model, inputs).numpy())
        return max_abs(out, twin_forward(ctx.torch_model, meta, inputs, ctx.grid))


def twin_forward(model: torch.nn.Module, meta: dict, inputs: dict[str, torch.Tensor],
                 grid: tuple[int, int]) -> np.ndarray:
    """The eager twin's output for a bucket graph described by ``meta`` (its ``ditmerge.atedm`` metadata)."""
    static = torch.from_numpy(static_scores(grid)) if meta.get("importance") == "static" else None
    twin = ATEDMTwin(model, meta["prune_block"], meta["last_block"], meta["kept"], meta["stride"], meta["iterations"],
                     static, meta.get("refill", "delta"))
    with twin.installed():
        return eager_forward(model, inputs).numpy()


METHOD = ATEDM
__all__ = ["ATEDM", "METHOD", "twin_forward"]
