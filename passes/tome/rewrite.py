"""The ToMe pass: insert merge/unmerge around attention and MLP of every transformer block.

Locating is by module scope (:mod:`passes.locate`), the math is :mod:`passes.tome.graph`. Per block
one matching is computed and shared by the block's merged sublayers (tomesd also matches once per
block). Its similarity metric is ``ToMeConfig.metric``: ``"sublayer"``, the input of the block's first
merged sublayer (the adaLN-modulated norm output), or ``"block"``, the block's residual-stream input,
as tomesd matches on the block input ``x``. Either way the merge applies to each sublayer's own input.
Residual adds stay on the full token set.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.errors import DitmergeError
from passes.cleanup import FreeTokenAxisPass
from passes.commute import hoist_merge, sink_unmerge
from passes.graphbuild import Emitter, count_input
from passes.infra import PassResult, StampedPass
from passes.locate import Site, Topology, _node_scopes, find_sites, tensor_shapes
from passes.onnxutil import export_graph, get_model_meta, graph_grid, import_graph, infer_shapes, set_model_meta
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, max_ratio, merged_count, num_dst, plan_bands
from passes.tome.graph import Geometry, MatchState, build_match, build_merge, build_unmerge
from passes.trt_limits import TOPK_MAX_K

from passes.tome.variants import R_COUNT

logger = logging.getLogger(__name__)

LOCATIONS = ("attn", "xattn", "joint", "mlp")
# Attention only by default, as tomesd: on the bundled model merging the MLP as well dropped sample class
# accuracy from 0.75 to 0.30 at ratio 0.3 (attention only: 0.70); see the README's quality table.
DEFAULT_LOCATIONS = ("attn", "joint")
METRICS = ("sublayer", "block")
# Block input, as tomesd: on the bundled model at ratio 0.3 (attention, 20 seeds, 25 DDIM steps) it gave
# PSNR 20.7 / 14.5 dB (mean / worst), FID 525, class accuracy 0.75 against the sublayer input's
# 19.3 / 12.5 dB, FID 642, 0.70 (benchmarks/results/deviations.json).
DEFAULT_METRIC = "block"


@dataclasses.dataclass
class ToMeConfig:
    ratio: float
    locations: tuple[str, ...] = DEFAULT_LOCATIONS
    stride: tuple[int, int] = (2, 2)
    max_src_per_band: int = TOPK_MAX_K  # TensorRT's TopK limit; more src tokens match within bands of the grid
    r: int | None = None  # tokens removed, exactly (calibrated methods); None: int(N * ratio)
    metric: str = DEFAULT_METRIC  # what the matching compares: "sublayer" input or "block" input (tomesd)
    # tokens removed per block (block path -> r), overriding ``r`` (CA-ToMe's per-block calibration)
    r_blocks: dict[str, int] | None = None
    # r from input shapes: the graph takes r as the length of the count input ``tome_r`` (per-block r:
    # ``tome_r_<i>``, i-th merged block), so one graph serves every ratio; ``ratio`` / ``r`` then only
    # choose the r of the graph's metadata, and blocks with r = 0 stay in the graph (docs/design.md)
    dynamic: bool = False
    # one matching serves this many consecutive merged blocks (1: each block matches its own input, as
    # tomesd); k > 1 computes it in the first block of each run of k and reuses its indices in the others
    match_every: int = 1

    def validate(self, grid: tuple[int, int]) -> None:
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool):
            raise DitmergeError(f"ratio must be a number, got {self.ratio!r}")
        top = max_ratio(grid, self.stride)
        if not 0 <= self.ratio <= top:
            raise DitmergeError(f"ratio {self.ratio} is outside [0, {top:.4g}] (the src share of a "
                                f"{grid[0]}x{grid[1]} grid with {self.stride[0]}x{self.stride[1]} cells)")
        bad = [loc for loc in self.locations if loc not in LOCATIONS]
        if bad or not self.locations:
            raise DitmergeError(f"unknown merge locations {bad or '(none)'}; choose from {', '.join(LOCATIONS)}")
        if self.metric not in METRICS:
            raise DitmergeError(f"unknown ToMe metric {self.metric!r}; choose from {', '.join(METRICS)}")
        if not isinstance(self.match_every, int) or isinstance(self.match_every, bool) or self.match_every < 1:
            raise DitmergeError(f"match_every must be a whole number >= 1 (1: every block matches), got {self.match_every!r}")
        if self.match_every > 1 and self.r_blocks:
            raise DitmergeError("match_every > 1 shares one matching between blocks, so they merge the same r; it "
                                "cannot be combined with an r per block")
        n = grid[0] * grid[1]
        for r in ([self.r] if self.r is not None else []) + list((self.r_blocks or {}).values()):
            if not 0 <= r <= n - num_dst(grid, self.stride):
                raise DitmergeError(f"r={r} is outside [0, {n - num_dst(grid, self.stride)}] (the src tokens of a "
                                    f"{grid[0]}x{grid[1]} grid with {self.stride[0]}x{self.stride[1]} cells)")


def match_leaders(blocks: list[str], every: int) -> dict[str, str]:
    """Each merged block -> the block whose matching it uses: the first of its run of ``every`` blocks."""
    order = list(dict.fromkeys(blocks))
    return {b: order[i // every * every] for i, b in enumerate(order)}


def merge_sites(model: onnx.ModelProto, locations: tuple[str, ...]) -> tuple[list[Site], list[Site], list[Site],
                                                                           onnx.ModelProto]:
    """The sites ToMe merges at ``locations`` (in execution order per block), those it must skip, all sites,
    and the shape-inferred model they were found in."""
    grid = graph_grid(model)
    n = grid[0] * grid[1]
    shaped = infer_shapes(model)
    sites = find_sites(shaped, n)
    if not any(s.kind in ("attn", "joint", "xattn", "mlp") for s in sites):
        raise DitmergeError("no attention or feed-forward module found in the graph (is it a diffusers DiT export?)")
    chosen = [s for s in sites if s.kind in locations and s.ok]
    skipped = [s for s in sites if s.kind in locations and not s.ok]
    return chosen, skipped, sites, shaped


class ToMePass(StampedPass):
    """Insert ToMe at ``config.ratio``; ratio 0 inserts nothing; a second run is a no-op."""

    name = "tome"
    namespace = "token-merge"  # CA-ToMe (a subclass) shares it: a graph carries at most one token merge

    config: ToMeConfig

    def stamp(self) -> dict:
        if self.config.dynamic:  # nothing per bucket: graphs of buckets that differ in r are identical
            return {"pass": self.name, "namespace": self.namespace, "method": "tome", "r": "count",
                    "locations": list(self.config.locations),
                    "metric": self.config.metric, "stride": list(self.config.stride),
                    **({"r_blocks": sorted(self.config.r_blocks)} if self.config.r_blocks else {}),
                    **({"match_every": self.config.match_every} if self.config.match_every > 1 else {})}
        return {"pass": self.name, "namespace": self.namespace, "method": "tome", "bucket": self.bucket,
                "ratio": self.config.ratio,
                "locations": list(self.config.locations), "metric": self.config.metric,
                **({"r_blocks": dict(self.config.r_blocks)} if self.config.r_blocks else {}),
                **({"match_every": self.config.match_every} if self.config.match_every > 1 else {})}

    carries = "a ToMe merge"

    def requires(self, model: onnx.ModelProto) -> None:
        self.config.validate(graph_grid(model))

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg = self.config
        grid = graph_grid(model)
        n = grid[0] * grid[1]
        na = n - num_dst(grid, cfg.stride)
        bands = plan_bands(grid, cfg.stride, cfg.max_src_per_band)
        if bands == 0:
            raise DitmergeError(f"a {grid[0]}x{grid[1]} grid cannot be cut into equal bands of whole "
                                f"{cfg.stride[0]}-row cells with at most {cfg.max_src_per_band} src tokens each")
        r = (merged_count(cfg.ratio, n, na) if cfg.r is None else cfg.r) // bands * bands
        r_blocks = {b: v // bands * bands for b, v in (cfg.r_blocks or {}).items()}
        if not cfg.dynamic and ((r == 0 and not r_blocks) or (r_blocks and not any(r_blocks.values()))):
            return PassResult(model, False)

        model = FreeTokenAxisPass(n)(model).model
        chosen, skipped, sites, shaped = merge_sites(model, cfg.locations)
        if r_blocks:
            merged_blocks = list(dict.fromkeys(s.block for s in chosen))
            unknown = sorted(set(merged_blocks) - set(r_blocks))
            if unknown:
                raise DitmergeError(f"r_blocks gives no r for {', '.join(unknown)}")
            # the bucket's r: the mean over blocks (what the plan reports as tokens removed)
            r = round(sum(r_blocks[b] for b in merged_blocks) / len(merged_blocks))
            if not cfg.dynamic:
                chosen = [s for s in chosen if r_blocks[s.block] > 0]
        geos = {s.block: Geometry(tokens=n, num_src=na, r=r_blocks.get(s.block, r), bands=bands) for s in chosen}
        shapes = tensor_shapes(shaped)
        metric_inputs = block_inputs(shaped, n, [s.block for s in chosen]) if cfg.metric == "block" else {}

        graph, meta = import_graph(model)
        tensors = graph.tensors()
        nodes = {nd.name: nd for nd in graph.nodes}
        em = Emitter(graph, f"ditmerge_{self.name}")
        self._start(graph, n)
        counts: dict[str, str] = {}  # block -> count key (dynamic r)
        if cfg.dynamic:
            blocks = list(dict.fromkeys(s.block for s in chosen))
            counts = {b: (f"{R_COUNT}_{i}" if r_blocks else R_COUNT) for i, b in enumerate(blocks)}
            self._counts = {key: count_input(graph, key) for key in dict.fromkeys(counts.values())}

        states: dict[str, object] = {}
        leader = match_leaders([s.block for s in chosen], cfg.match_every)
        for site in chosen:
            x = tensors[site.image_input]
            y = tensors[site.image_output]
            channels_in = int(shapes[site.image_input][1][2])
            channels_out = int(shapes[site.image_output][1][2])
            em.prefix = f"ditmerge_{self.name}/{site.path}"
            lead = leader[site.block]
            if lead not in states:
                metric = tensors[metric_inputs[lead]] if lead in metric_inputs else x
                r_count = self._counts[counts[lead]] if counts else None
                states[lead] = self._block_state(em, lead, metric, geos[lead], r_count)
            state = states[lead]
            # the adaLN modulation before the sublayer and its gate after it run on the merged tokens
            inside = set(site.nodes)
            x = hoist_merge(graph, x, inside, shapes, n)
            y = sink_unmerge(graph, y, inside, shapes, n)
            merged = build_merge(em, x, state, channels_in)
            for name in inside:
                nd = nodes[name]
                nd.inputs = [merged if t is x else t for t in nd.inputs]
            before = len(em.inserted)
            unmerged = build_unmerge(em, y, state, channels_out)
            unmerge_nodes = set(em.inserted[before:])
            for nd in list(y.outputs):
                if nd.name not in inside and nd.name not in unmerge_nodes:
                    nd.inputs = [unmerged if t is y else t for t in nd.inputs]
        out = export_graph(graph, model, meta, stamp=self.stamp(), stamped=em.inserted)
        set_model_meta(out, tome={"ratio": cfg.ratio, "r": r, "num_src": na, "tokens": n, "stride": list(cfg.stride),
                                  "bands": bands,
                                  "locations": list(cfg.locations), "metric": cfg.metric,
                                  **({"metric_blocks": list(metric_inputs)} if cfg.metric == "block" else {}),
                                  **({"r_blocks": {b: g.r for b, g in geos.items()}} if r_blocks else {}),
                                  **({"counts": counts} if counts else {}),
                                  **({"match_every": cfg.match_every} if cfg.match_every > 1 else {}),
                                  "sites": [s.path for s in chosen]}, **self._extra_meta())
        out = infer_shapes(out)
        _summarize(chosen, skipped, sites, cfg.locations, r, n)
        return PassResult(out, True)

    # Hooks for passes built on this one (CA-ToMe's match and apply variants)
    def _start(self, graph: gs.Graph, n: int) -> None:
        """Add the graph inputs every block's matching reads: the partition and its inverse."""
        self._part = gs.Variable(PARTITION_INPUT, dtype=np.int64, shape=[n])
        self._part_inv = gs.Variable(PARTITION_INV_INPUT, dtype=np.int64, shape=[n])
        graph.inputs.extend([self._part, self._part_inv])

    def _block_state(self, em: Emitter, block: str, x: gs.Variable, geo: Geometry,
                     r_count: gs.Variable | None = None) -> MatchState:
        """The matching of one block, on its first merged sublayer's input ``x``; ``r_count``: dynamic r."""
        return build_match(em, x, self._part, self._part_inv, geo, r_count)

    def _extra_meta(self) -> dict:
        return {}


def block_inputs(model: onnx.ModelProto, n: int, blocks: list[str]) -> dict[str, str]:
    """Each block's residual-stream input: the one ``[B, N, C]`` tensor its nodes read from outside.

    ``model`` must carry shapes. This is what tomesd matches on (the block input ``x``, before norm1).
    Blocks that read more than one such tensor (Flux's double blocks) are left out.
    """
    members: dict[str, list[onnx.NodeProto]] = {b: [] for b in blocks}
    for node in model.graph.node:
        scopes = _node_scopes(node)[0]
        for b in blocks:
            if any(sc == b or sc.endswith("." + b) for sc in scopes):
                members[b].append(node)
                break
    topo = Topology.of(model, n)
    out = {}
    for b, nodes in members.items():
        ins = [t for t in topo.boundary(nodes)[0] if topo.image_like(t)]
        if len(ins) == 1:
            out[b] = ins[0]
        else:
            logger.info("tome: metric=block: %s reads %d [B, %d, C] tensors from outside, not one residual-stream "
                        "input; it matches on its sublayer input", b, len(ins), n)
    return out


def _summarize(chosen: list[Site], skipped: list[Site], sites: list[Site], locations: tuple[str, ...], r: int, n: int) -> None:
    by_kind: dict[str, list[int]] = {}
    for s in sites:
        if s.kind in locations:
            by_kind.setdefault(s.kind, [0, 0])[1] += 1
    for s in chosen:
        by_kind[s.kind][0] += 1
    parts = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in by_kind.items())
    logger.debug("tome: merged %s modules (r=%d of %d tokens)%s", parts, r, n,
                f"; {len(skipped)} skipped: " + "; ".join(f"{s.path}: {s.reason}" for s in skipped[:4]) if skipped else "")


# what a ToMe graph's metadata holds per bucket; graphs with r from shapes leave these to the plan's buckets
PER_BUCKET_META = ("ratio", "r", "r_blocks")


def count_values(meta: dict) -> dict[str, int]:
    """The counts (key -> value) that feed r to a graph with r from shapes, from ToMe metadata with r."""
    counts = meta.get("counts")
    if not counts:
        return {}
    r_blocks = meta.get("r_blocks")
    return {key: int(r_blocks[block] if r_blocks else meta["r"]) for block, key in counts.items()}


def strip_bucket_meta(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without its per-bucket ToMe metadata (r, ratio): equal for every bucket of a plan."""
    import json

    meta = json.loads(get_model_meta(model)["tome"])
    set_model_meta(model, tome={k: v for k, v in meta.items() if k not in PER_BUCKET_META})
    return model
