"""CA-ToMe (cached adaptive token merging, docs/design.md, 'The other methods' graphs') as a plan method.

Per bucket two graphs (:mod:`passes.catome`): ``match`` (ToMe, plus each block's matching as outputs)
and ``main``, the *apply* variant (merges with cached indices fed as inputs; no similarity). The runtime
policy (:mod:`runtime.policies.catome`) runs ``match`` at the checkpoint steps and ``main`` in between.
Both are branches of one graph (:func:`passes.branch.branch_variants`); in a mixed plan (some buckets
calibrate to r = 0) that graph has a third branch, ``plain`` (the unmerged graph), which the unmerged
buckets' main step runs (their ``method_meta.branch``): one graph per plan, no ``base.onnx`` session
(option ``unmerged=base``: those buckets run ``base.onnx`` beside it, faster but the weights twice).

Buckets: ``--buckets`` gives only the timestep ranges (``"0,0,0"`` or the default spec: three equal
spans); its ratios are ignored. Each bucket's ``r`` comes from threshold calibration in :meth:`prepare`
(:mod:`export.catome_calib`): the eager model denoises ``calib_samples`` seeded samples in
``calib_steps`` steps of its pipeline's sampler (DDIM, DPM-Solver, SD3's or Flux's flow matching), each
step counts per merge point the src tokens whose best match reaches ``threshold``, and ``r`` is
``statistic`` (default: the mean, as the paper's fixed-bucket recipe) of the bucket's counts. The calibrated ratio ``r / N`` replaces the spec's ratio in the plan.

``r_per_block=True`` calibrates one r per block and bucket from that block's counts alone (closer to the
paper, whose count is per call and block) instead of one r pooled over all blocks; ``metric`` is what the
matching and the counts compare (:class:`passes.tome.ToMeConfig`; the paper, as tomesd, uses the block
input). ``benchmarks/deviations.py`` measures both against the pooled, sublayer-metric defaults.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from export.buckets import BucketSpec, parse_buckets
from export.catome_calib import block_summary, check_statistic, count_trajectories, derive_r
from export.measure import feed_of, max_abs
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward, example_inputs
from passes.branch import branch_variants
from passes.catome import CACHED_NAMES, INDEX_PREFIX, PARTITION_NAMES, CaToMePass, as_cache_feed, index_name
from passes.catome.twin import CaToMeTwin, from_feed, to_feed
from passes.errors import DitmergeError
from passes.flops import count_flops
from passes.onnxutil import get_model_meta
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition, num_dst, plan_bands
from passes.tome import DEFAULT_LOCATIONS, ToMeConfig, count_values, merge_sites, strip_bucket_meta

from passes.catome.variants import MATCH, PAPER_SCHEDULE, PAPER_SCHEDULE_STEPS  # one definition for build, run time and graph

logger = logging.getLogger(__name__)

PLAIN = "plain"  # the unmerged graph, a branch of a mixed plan's one graph (no bucket variant of its own)


class CaToMe(Method):
    name = "catome"
    one_graph = True  # the variants are branches of one graph (passes/branch.py): the weights once
    defaults: dict[str, object] = {  # noqa: RUF012 (read-only, as Method.defaults)
        "threshold": 0.7,  # the paper's recommended T
        "statistic": "mean",  # over the bucket's counts: mean, median, max, min or pNN
        "calib_samples": 8,
        "calib_steps": 25,
        "calib_guidance": 4.0,
        "calib_seed": 0,
        "schedule": PAPER_SCHEDULE,
        "schedule_steps": PAPER_SCHEDULE_STEPS,
        "cache": True,  # False: match at every step (CA-ToMe without the cache)
        "locations": DEFAULT_LOCATIONS,  # the paper merges self-attention only
        "stride": (2, 2),
        # r per block from its own counts (the paper counts per block and call); False: one r pooled over all
        # blocks. Per block gave PSNR 19.1 dB, FID 644 against pooled 17.6 dB, FID 734 at the same mean r on
        # the bundled model (benchmarks/results/deviations.json).
        "r_per_block": True,
        # "sublayer" or "block" (the paper's, as tomesd's). At T = 0.7 the block input's counts are 2-3x the
        # sublayer input's (r 161-188 of 256 on the bundled model) and quality falls (15.8 dB, FID 1069), so
        # the threshold would need recalibrating for it; the sublayer input keeps the paper's T meaningful here.
        "metric": "sublayer",
        # what buckets calibrated to r = 0 run in a plan that also merges: "branch", the plain branch of the one
        # graph (the weights once: 1.82 GB against 2.69 GB with base.onnx beside it, DiT-XL/2 8 blocks, but
        # 1.17x base.onnx's latency on onnxruntime CPU, benchmarks in the docs); "base": base.onnx beside it
        "unmerged": "branch",
    }

    def __init__(self, options: dict[str, object] | None = None) -> None:
        super().__init__(options)
        self.specs: list[BucketSpec] = []
        self.source = ""
        self.calibration: dict[int, dict] = {}
        self.checkpoint_timesteps: list[float] = []
        self._feeds: dict[tuple, dict[str, np.ndarray]] = {}
        self._mixed = False  # merged and unmerged buckets: the unmerged ones run the one graph's plain branch
        self._merged: list[int] = []
        self._built: dict[tuple, tuple] = {}
        self._blocks: dict[int | str, list[str]] = {}

    def config(self, r: int, r_blocks: dict[str, int] | None = None) -> ToMeConfig:
        return ToMeConfig(ratio=0.0, locations=tuple(self.options["locations"]),
                          stride=tuple(int(s) for s in self.options["stride"]), r=r, r_blocks=r_blocks,
                          metric=str(self.options["metric"]), dynamic=True)

    def params(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}
        if self.checkpoint_timesteps:
            out["checkpoint_timesteps"] = self.checkpoint_timesteps
        return out

    def _checkpoints(self, num_train_timesteps: int, family=None, grid: tuple[int, int] | None = None) -> list[float]:
        """The schedule's steps as the timesteps the model's own pipeline gives them in a ``schedule_steps`` run
        (flow matching: shifted, Flux's by the grid's token count): the runtime matches when a call reaches
        one, whatever the sampler and step count."""
        from export.families import reference_timesteps
        from export.load import scheduler_config

        try:
            cfg = scheduler_config(self.source) if self.source else None
        except (OSError, ValueError):
            cfg = None
        ts = reference_timesteps(cfg, int(self.options["schedule_steps"]), num_train_timesteps, family,
                                 grid[0] * grid[1] if grid else None)
        return sorted({ts[int(s)] for s in self.options["schedule"] if 0 <= int(s) < len(ts)}, reverse=True)

    def bucket_specs(self, buckets: str, num_train_timesteps: int, model: str, family=None,
                     grid: tuple[int, int] | None = None) -> list[BucketSpec]:
        """Timestep ranges from ``--buckets``; the ratios are placeholders until :meth:`prepare` calibrates."""
        self.source = model
        self.specs = parse_buckets(buckets, num_train_timesteps)
        self.checkpoint_timesteps = self._checkpoints(num_train_timesteps, family, grid)
        if any(s.ratio for s in self.specs):
            logger.info("catome: the ratios of --buckets %r are ignored; r per bucket comes from calibration", buckets)
        return self.specs

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        o = self.options
        self.config(0).validate(grid)
        check_statistic(str(o["statistic"]))
        if o["calib_samples"] < 1 or o["calib_steps"] < 1:
            raise DitmergeError(f"calib_samples and calib_steps must be at least 1, got {o['calib_samples']} and "
                                f"{o['calib_steps']}")
        if o["unmerged"] not in ("branch", "base"):
            raise DitmergeError(f"option unmerged={o['unmerged']!r}: choose from branch, base")
        steps = int(o["schedule_steps"])
        sched = [int(s) for s in o["schedule"]]
        if steps < 1 or not sched or any(not 0 <= s < steps for s in sched):
            raise DitmergeError(f"schedule {sched} must be step indices in 0..{steps - 1} (schedule_steps={steps})")

    def bands(self, grid: tuple[int, int]) -> int:
        cfg = self.config(0)
        return plan_bands(grid, cfg.stride, cfg.max_src_per_band)

    def prepare(self, ctx: BuildContext) -> None:
        """Calibrate r per bucket; the plan records the counts (``method_meta.calibration``)."""
        from export.load import scheduler_config

        o = self.options
        cfg = self.config(0)
        chosen, skipped, _, _ = merge_sites(ctx.base, cfg.locations)
        if not chosen:  # Flux: its joint attention carries rotary embeddings over the joint sequence
            why = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:2])
            raise DitmergeError(f"catome found no module to merge at {list(cfg.locations)}"
                                f"{f' ({why})' if why else ''}; choose other locations, e.g. -o locations=mlp")
        blocks: dict[str, str] = {}
        for site in chosen:  # the matching runs on the input of a block's first merged module, or the block's
            blocks.setdefault(site.block, site.block if o["metric"] == "block" else site.path)
        num_src = ctx.tokens - num_dst(ctx.grid, cfg.stride)
        bands = self.bands(ctx.grid)
        counts = count_trajectories(ctx.torch_model, ctx.family, blocks, self.specs, ctx.grid, cfg.stride, bands,
                                    float(o["threshold"]), int(o["calib_samples"]), int(o["calib_steps"]),
                                    float(o["calib_guidance"]), int(o["calib_seed"]),
                                    scheduler_config(self.source) if self.source else None, ctx.text_len)
        for i, (spec, per_block) in enumerate(zip(self.specs, counts)):
            r, value = derive_r(per_block, str(o["statistic"]), num_src, bands)
            self.calibration[i] = {"threshold": float(o["threshold"]), "statistic": o["statistic"],
                                   "statistic_value": value, "r": r, "num_src": num_src,
                                   "merge_points": {b: block_summary(c) for b, c in per_block.items()}}
            if o["r_per_block"]:
                r_blocks = {b: derive_r({b: c}, str(o["statistic"]), num_src, bands)[0] for b, c in per_block.items()}
                r = round(sum(r_blocks.values()) / len(r_blocks))
                self.calibration[i].update(r=r, r_blocks=r_blocks)
                logger.info("catome: bucket %d: r per block %s (mean %d)", i, list(r_blocks.values()), r)
            # the plan's ratio column shows the calibrated ratio (the build loop reads this list after prepare)
            self.specs[i] = BucketSpec(spec.t_lo, spec.t_hi, r / ctx.tokens)
            logger.info("catome: bucket %d [%d, %d]: %s of src tokens with a match >= %g is %.1f -> r = %d of %d",
                        i, spec.t_lo, spec.t_hi, o["statistic"], o["threshold"], value, r, ctx.tokens)
        self._merged = [i for i, c in self.calibration.items() if not self._unmerged(c["r"], c.get("r_blocks"), bands)]
        self._mixed = 0 < len(self._merged) < len(self.calibration) and o["unmerged"] == "branch"
        self._built.clear()

    def _r(self, ctx: BuildContext, spec: BucketSpec, index: int | str) -> int:
        if isinstance(index, int) and index in self.calibration:
            return self.calibration[index]["r"]
        num_src = ctx.tokens - num_dst(ctx.grid, self.config(0).stride)  # a uniform sweep: the spec's ratio
        return min(int(ctx.tokens * spec.ratio), num_src)

    def _unmerged(self, r: int, r_blocks: dict[str, int] | None, bands: int) -> bool:
        return (r // bands == 0 and not r_blocks) or bool(r_blocks and not any(v // bands for v in r_blocks.values()))

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        r = self._r(ctx, spec, index)
        calib = self.calibration.get(index) if isinstance(index, int) else None
        r_blocks = (calib or {}).get("r_blocks")
        bands = self.bands(ctx.grid)
        mixed = isinstance(index, int) and self._mixed
        if self._unmerged(r, r_blocks, bands):
            meta = {"r": 0, "stride": list(self.options["stride"]), "bands": bands, "calibration": calib}
            if not mixed:  # no merged bucket in the plan: the unmerged graph alone
                return BucketGraphs({MAIN: None}, meta, 0, ctx.tokens)
            # a mixed plan: the plain branch of the merged buckets' one graph, its counts at 0
            joined, _, counts, _ = self._variants(ctx, self._merged[0], mixed)
            return BucketGraphs({MAIN: joined[MAIN]}, {**meta, "branch": {MAIN: PLAIN}}, 0, ctx.tokens,
                                dict.fromkeys(counts, 0), count_flops(ctx.base))
        graphs, tome, counts, flops = self._variants(ctx, index, mixed, r, r_blocks)
        meta = {**tome, "variants": {MAIN: "apply", MATCH: "match"}, "blocks": self._blocks[index],
                "index_names": [index_name(b, k) for b in self._blocks[index] for k in CACHED_NAMES] +
                               [index_name("", k) for k in PARTITION_NAMES], "calibration": calib}
        return BucketGraphs(graphs, meta, tome["r"], ctx.tokens - tome["r"], counts, flops)

    def _variants(self, ctx: BuildContext, index: int | str, mixed: bool, r: int | None = None,
                  r_blocks: dict[str, int] | None = None) -> tuple[dict, dict, dict[str, int], int]:
        """A merged bucket's match and apply graphs (r from shapes: equal for every bucket, one file per plan),
        its ToMe metadata, counts and FLOPs; in a mixed plan joined with the plain graph behind the variant
        count (the unmerged buckets run that branch: one graph, its weights once)."""
        key = (index, mixed)
        if key not in self._built or not isinstance(index, int):  # a sweep's graphs differ per call (its r)
            if r is None:
                calib = self.calibration[index]
                r, r_blocks = calib["r"], calib.get("r_blocks")
            cfg = self.config(r, r_blocks)
            match = CaToMePass(cfg, "match", bucket=index)(ctx.base)
            apply = CaToMePass(cfg, "apply", bucket=index)(ctx.base)
            tome = _meta(match.model, "tome")
            self._blocks[index] = list(_meta(match.model, "catome")["indices"])
            graphs = {MAIN: strip_bucket_meta(apply.model), MATCH: strip_bucket_meta(match.model)}
            counts = count_values(tome)
            flops = count_flops(graphs[MAIN], counts)
            if mixed:
                joined = branch_variants({**graphs, PLAIN: ctx.base})
                graphs = {MAIN: joined, MATCH: joined}
            self._built[key] = (graphs, tome, counts, flops)
        return self._built[key]

    def extra_feed(self, ctx: BuildContext, meta: dict, variant: str, batch: int,
                   seed: int | None = None) -> dict[str, np.ndarray]:
        if not meta.get("r"):
            return {}
        if variant == MATCH:
            rng = None if seed is None else np.random.default_rng(seed)
            part, inv = draw_partition(ctx.grid, tuple(meta["stride"]), rng, meta.get("bands", 1))
            return {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}
        # apply: a real matching, taken by the twin on other inputs (as a cached step would be)
        key = (meta["r"], json.dumps(meta.get("r_blocks")), tuple(meta["blocks"]), batch, seed)
        if key not in self._feeds:
            inputs = example_inputs(ctx.torch_model, batch, ctx.grid, ctx.text_len, seed=1000 + (seed or 0))
            _, indices = twin_forward(ctx.torch_model, meta, ctx.grid, inputs, seed=seed or 0)
            self._feeds[key] = to_feed(indices)
        return self._feeds[key]

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        if not meta.get("r"):
            return max_abs(run(feed_of(inputs))["sample"], eager_forward(ctx.torch_model, inputs).numpy())
        batch = len(inputs["hidden_states"])
        if variant == MATCH:
            return match_fidelity(ctx.torch_model, run, inputs, meta, ctx.grid, seed=0)
        cached = self.extra_feed(ctx, meta, MAIN, batch, seed=0)
        return apply_fidelity(ctx.torch_model, run, inputs, meta, cached)


def _meta(model, key: str) -> dict:
    import json

    return json.loads(get_model_meta(model)[key])


def twin_forward(model: torch.nn.Module, meta: dict, grid: tuple[int, int], inputs: dict[str, torch.Tensor],
                 seed: int = 0, cached: dict[str, dict[str, torch.Tensor]] | None = None
                 ) -> tuple[np.ndarray, dict[str, dict[str, torch.Tensor]]]:
    """The eager twin's output and the matching it used: matched on a seeded partition, or ``cached``."""
    bands = meta.get("bands", 1)
    twin = CaToMeTwin(model, meta["sites"], meta["num_src"], meta.get("r_blocks") or meta["r"], bands, cached=cached,
                      metric=meta.get("metric", "sublayer"), metric_blocks=meta.get("metric_blocks"))
    if cached is None:
        part, inv = draw_partition(grid, tuple(meta["stride"]), np.random.default_rng(seed), bands)
        twin.set_partition(torch.from_numpy(part), torch.from_numpy(inv))
    with twin.installed():
        out = eager_forward(model, inputs).numpy()
    return out, (cached if cached is not None else twin.recorded)


def match_fidelity(model: torch.nn.Module, run, inputs: dict[str, torch.Tensor], meta: dict, grid: tuple[int, int],
                   seed: int = 0) -> float:
    """Match variant vs twin with the same partition: max abs error of ``sample``; a differing index counts
    as its difference (so a wrong matching cannot pass). The src ranking ``order`` is compared as what it
    decides, the merged src of each band (its first r) and the kept ones: near-tied scores (thousands of
    src tokens, as Flux's 4096-token grid has) may swap neighbours on either side, which merges the same."""
    bands = meta.get("bands", 1)
    part, inv = draw_partition(grid, tuple(meta["stride"]), np.random.default_rng(seed), bands)
    out = run({**feed_of(inputs), PARTITION_INPUT: part, PARTITION_INV_INPUT: inv})
    ref, indices = twin_forward(model, meta, grid, inputs, seed=seed)
    err = max_abs(out["sample"], ref)
    got_cache = as_cache_feed(out)
    for name, want in to_feed(indices).items():
        if name not in got_cache:
            return float("inf")
        got = np.asarray(got_cache[name])
        if got.shape != want.shape:
            return float("inf")
        if want.size and name.endswith("/order"):
            block = name[len(INDEX_PREFIX):-len("/order")]
            k = int((meta.get("r_blocks") or {}).get(block, meta["r"])) // bands
            got, want = (np.concatenate([np.sort(a[..., :k], -1), np.sort(a[..., k:], -1)], -1) for a in (got, want))
        if want.size:
            err = max(err, max_abs(got, want))
    return err


def apply_fidelity(model: torch.nn.Module, run, inputs: dict[str, torch.Tensor], meta: dict,
                   cached: dict[str, np.ndarray]) -> float:
    """Apply variant with ``cached`` indices vs the twin merging with those same indices."""
    out = run({**feed_of(inputs), **cached})["sample"]
    ref, _ = twin_forward(model, meta, (0, 0), inputs, cached=from_feed(cached, meta["blocks"]))
    return max_abs(out, ref)


METHOD = CaToMe
__all__ = ["METHOD", "CaToMe", "apply_fidelity", "match_fidelity", "twin_forward"]
