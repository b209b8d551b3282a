"""DiffRatio-MoD (DiffCR) as a plan method: trained routers, one routed graph for every timestep region.

The model must come from ``python -m export.train_mod``: its folder holds the fine-tuned weights, the
routers (``mod_routers.safetensors``) and the learned ratios (``mod_ratios.json``). The ratios, snapped
to their 10 % bins, give a constant capacity per layer per timestep region; adjacent regions with the
same capacities share one bucket. ``--buckets`` does not apply: the buckets are the trained regions.
The capacity of every block some bucket routes is a count input (``ditmerge_count_mod_k_<i>``), so all
buckets share one graph file and feed their own capacities.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from export.buckets import BucketSpec
from export.measure import feed_of, max_abs
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from passes.errors import DitmergeError
from passes.mod import ModConfig, ModPass, bucket_values
from passes.mod.eager import MoDRouting, capacity, snap
from passes.trt_limits import TOPK_MAX_K

logger = logging.getLogger(__name__)


class MoD(Method):
    name = "mod"
    unsupported = dict.fromkeys(
        ("pixart", "sd3", "flux"), "routers are fine-tuned by export.train_mod, which trains class-conditional DiTs only")

    def __init__(self, options: dict[str, object] | None = None) -> None:
        super().__init__(options)
        self.routing: MoDRouting | None = None
        self.record: dict = {}
        self.ratios: dict[tuple[int, int], list[float]] = {}  # bucket (t_lo, t_hi) -> snapped ratio per layer
        self.routers_sha = ""

    def bucket_specs(self, buckets: str, num_train_timesteps: int, model: str, family=None,
                     grid: tuple[int, int] | None = None) -> list[BucketSpec]:
        from export.train_mod import ROUTERS_FILE, load_routing, model_folder

        self.routing, self.record = load_routing(model)
        self.routers_sha = hashlib.sha256((model_folder(model) / ROUTERS_FILE).read_bytes()).hexdigest()
        if self.record["num_train_timesteps"] != num_train_timesteps:
            raise DitmergeError(f"the routers were trained over {self.record['num_train_timesteps']} timesteps, the "
                                f"plan covers {num_train_timesteps}")
        groups: list[dict] = []
        for region in sorted(self.record["regions"], key=lambda r: r["t_lo"]):
            if groups and groups[-1]["snapped"] == region["snapped"]:
                groups[-1]["t_hi"] = region["t_hi"]
            else:
                groups.append(dict(region))
        self.ratios = {(g["t_lo"], g["t_hi"]): list(g["snapped"]) for g in groups}
        logger.info("mod: %d timestep regions -> %d buckets (the buckets spec %r does not apply)",
                    len(self.record["regions"]), len(groups), buckets)
        return [BucketSpec(g["t_lo"], g["t_hi"], round(float(np.mean(g["snapped"])), 4)) for g in reversed(groups)]

    def params(self) -> dict:
        keep = ("target", "lambda", "finetune", "steps", "max_ratio", "bin", "base_model")
        return {**{k: self.record.get(k) for k in keep}, "regions": len(self.record.get("regions", [])),
                "routers_sha256": self.routers_sha}

    def layer_ratios(self, spec: BucketSpec) -> list[float]:
        """The bucket's snapped ratio per layer; a spec that is no trained region (a sweep) routes every layer at its ratio."""
        if (spec.t_lo, spec.t_hi) in self.ratios:
            return self.ratios[(spec.t_lo, spec.t_hi)]
        return [snap(spec.ratio, self.routing.max_ratio)] * self.routing.layers

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        if self.routing is None:
            raise DitmergeError("the mod method reads its buckets from the trained routers; call bucket_specs first")
        for spec in specs:
            if not 0 <= spec.ratio <= self.routing.max_ratio:
                raise DitmergeError(f"mod ratio {spec.ratio} is outside [0, {self.routing.max_ratio}] (the largest "
                                    "compression the routers were trained for)")

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        return {"method": self.name, "index": index, "t": [spec.t_lo, spec.t_hi], "ratios": self.layer_ratios(spec),
                "routers": self.routers_sha}

    def capacities(self, spec: BucketSpec, tokens: int) -> list[int]:
        return [capacity(r, tokens) for r in self.layer_ratios(spec)]

    def dynamic_blocks(self, caps: list[int], tokens: int) -> tuple[int, ...]:
        """Blocks whose capacity is a count input: every block some bucket of the plan routes (k < N), so all
        buckets share one graph. Past TensorRT's TopK limit a block at k = N cannot be a TopK over all
        tokens: then only this bucket's routed blocks, and buckets share a graph where those agree."""
        mine = {i for i, k in enumerate(caps) if k < tokens}
        if tokens > TOPK_MAX_K:
            return tuple(sorted(mine))
        plan = {i for ratios in self.ratios.values() for i, r in enumerate(ratios) if capacity(r, tokens) < tokens}
        return tuple(sorted(mine | plan))

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        caps = self.capacities(spec, ctx.tokens)
        routers = self.routing.routers
        dynamic = self.dynamic_blocks(caps, ctx.tokens)
        cfg = ModConfig(tuple(caps), tuple(r.weight.detach().numpy().reshape(-1).copy() for r in routers),
                        tuple(float(r.bias.detach()) for r in routers), dynamic)
        res = ModPass(cfg)(ctx.base)
        values = bucket_values(caps, dynamic)
        counts = values.pop("counts")
        meta = {"ratios": self.layer_ratios(spec), **values}
        return BucketGraphs({MAIN: res.model}, meta, ctx.tokens - min(caps), min(caps), counts)

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        """The bucket graph against the eager routed model at the bucket's capacities."""
        out = run(feed_of(inputs))["sample"]  # ``run`` feeds the bucket's counts (export.build_measure.shape_feed)
        self.routing.fixed = list(meta["capacities"])
        try:
            with self.routing.installed(ctx.torch_model):
                ref = eager_forward(ctx.torch_model, inputs).numpy()
        finally:
            self.routing.fixed = None
        return max_abs(out, ref)


METHOD = MoD
__all__ = ["METHOD", "MoD"]
