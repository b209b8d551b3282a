"""The SDTM pass: one bucket's graph of Structure-then-Detail Token Merging (docs/design.md, SDTM).

Variants of a bucket:

- ``merged`` (the bucket's main graph): per block, one matching on the attention input (the
  norm1-modulated image tokens, as the released code), applied to the configured sublayers:
  - ``merge="window"`` (structure stage): the top-k most uniform 2x2 windows collapse to their mean
    (:mod:`passes.sdtm.graph`);
  - ``merge="bipartite"`` (detail stage): ToMe's bipartite matching (:mod:`passes.tome.graph`) with the
    partition as graph inputs; the runtime puts each window's dst on its stalest token.
  The merged count comes from a count input (:mod:`passes.counts`): ``ditmerge_count_sdtm_k`` (k windows)
  or ``ditmerge_count_sdtm_r`` (r tokens), so buckets of one stage that differ only in ratio share one
  graph; the per-bucket values are in :func:`bucket_values`, not in the graph.
  The staleness counters ``sdtm_counter [B, N]`` come in as an input, are read by each block's
  matching and advanced by it (0 where the token stayed unmerged, +1 elsewhere), and leave as
  ``sdtm_counter_out``. With ``blend`` set, each merged sublayer also takes ``sdtm_cache.<site>`` (its
  output at the last protected step) and outputs ``blend * computed + (1 - blend) * cached`` at merged
  positions.
- ``full`` (protected steps): the unmerged graph that also outputs every cached sublayer's output as
  ``sdtm_cache_out.<site>``; the same graph for every bucket.

Deviation from the released code: the cache holds the sublayer module's output (attention / feed-forward),
i.e. before the adaLN gate; the released code caches after the gate. Our site boundary is the module;
the gate changes little between nearby steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.cleanup import FreeTokenAxisPass
from passes.errors import DitmergeError
from passes.graphbuild import Emitter, count_input, count_value
from passes.infra import GraphPass, PassResult, StampedPass
from passes.locate import Site, find_sites, tensor_shapes
from passes.onnxutil import export_graph, graph_grid, import_graph, infer_shapes, provenance, set_model_meta
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, layout, merged_count, num_dst, plan_bands
from passes.sdtm.graph import (WindowGeometry, build_blend, build_counter_update, build_gather_unmerge,
    build_independent_from_map, build_window_match, build_window_merge)
from passes.trt_limits import TOPK_MAX_K
from passes.tome.graph import Geometry, build_match, build_merge, build_unmerge

from passes.sdtm.variants import (COUNTER_INPUT, COUNTER_OUTPUT, K_COUNT, R_COUNT,
    VARIANTS, cache_input, cache_output)

logger = logging.getLogger(__name__)

MERGES = ("window", "bipartite")
LOCATIONS = ("attn", "joint", "mlp")
ATTN_KINDS = ("attn", "joint")


def window_count(ratio: float, grid: tuple[int, int]) -> int:
    """Windows merged for a ratio: each removes 3 tokens, so k = int(N * ratio) // 3.

    The released code rounds k down to a multiple of 16 (k = int(N * ratio) // 48 * 16); at 256 tokens
    that would move the ratio in steps of 48 tokens, so we do not. At least one window stays unchosen
    so no tensor is empty.
    """
    geo = WindowGeometry(grid, 0)
    return max(0, min(int(geo.tokens * ratio) // 3, geo.num_windows - 1))


def bipartite_r(ratio: float, grid: tuple[int, int], max_src_per_band: int = TOPK_MAX_K) -> tuple[int, int, int]:
    """``(r, num_src, bands)`` of the detail stage's bipartite merge: tomesd's r, a multiple of the bands."""
    n = grid[0] * grid[1]
    na = n - num_dst(grid)
    bands = plan_bands(grid, (2, 2), max_src_per_band)
    if bands == 0:
        raise DitmergeError(f"a {grid[0]}x{grid[1]} grid cannot be cut into bands of at most "
                            f"{max_src_per_band} src tokens")
    return merged_count(ratio, n, na) // bands * bands, na, bands


@dataclasses.dataclass
class SdtmConfig:
    variant: str = "merged"
    merge: str = "window"
    ratio: float = 0.0
    locations: tuple[str, ...] = LOCATIONS
    a_s: float = 0.05  # weight of the staleness term in window scores (released default)
    blend: float | None = 0.1  # weight of the computed value at merged positions; None: no cache inputs
    max_src_per_band: int = TOPK_MAX_K

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise DitmergeError(f"unknown SDTM variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.merge not in MERGES:
            raise DitmergeError(f"unknown SDTM merge {self.merge!r}; choose from {', '.join(MERGES)}")
        if not 0 <= self.ratio <= 0.75:
            raise DitmergeError(f"SDTM ratio {self.ratio} is outside [0, 0.75] (3 of every 4 tokens of a 2x2 window)")
        bad = [loc for loc in self.locations if loc not in LOCATIONS]
        if bad or not self.locations:
            raise DitmergeError(f"unknown SDTM merge locations {bad or '(none)'}; choose from {', '.join(LOCATIONS)}")
        if self.blend is not None and not 0 <= self.blend <= 1:
            raise DitmergeError(f"SDTM blend weight {self.blend} is outside [0, 1]")


class SdtmPass(StampedPass):
    """Insert one SDTM variant (see the module docstring); a second run is a no-op."""

    name = "sdtm"

    config: SdtmConfig

    def stamp(self) -> dict:
        """What the graph depends on: nothing per bucket (no ratio, no bucket index), so buckets that differ
        only in ratio produce byte-identical graphs; the full variant depends on nothing but the model."""
        cfg = dataclasses.asdict(self.config)
        del cfg["ratio"]
        if self.config.variant == "full":
            cfg = {"variant": "full"}
        # JSON round trip: the stamp is compared with the one read back from the graph
        return json.loads(json.dumps({"pass": self.name, "method": "sdtm", **cfg}))

    carries = "an SDTM merge"

    def requires(self, model: onnx.ModelProto) -> None:
        self.config.validate()

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg = self.config
        grid = graph_grid(model)
        n = grid[0] * grid[1]
        model = FreeTokenAxisPass(n)(model).model
        shaped = infer_shapes(model)
        sites = find_sites(shaped, n)
        cache_sites = [s for s in sites if s.ok and s.kind in LOCATIONS]
        if not cache_sites:
            raise DitmergeError("no attention or feed-forward module found in the graph (is it a diffusers DiT export?)")
        # Flux's single-stream blocks (text and image in one sequence) and its joint attention (rotary
        # embeddings over the joint sequence) do not merge; their blocks merge at their other sites
        skipped = [s for s in sites if not s.ok and (s.kind in cfg.locations or s.kind == "single")]
        if skipped:
            logger.debug("sdtm: %d modules skipped: %s", len(skipped), "; ".join(f"{s.path}: {s.reason}" for s in skipped))
        shapes = tensor_shapes(shaped)
        graph, meta = import_graph(model)
        tensors = graph.tensors()
        batch_dim = graph.inputs[0].shape[0]
        em = Emitter(graph, "ditmerge_sdtm")
        info: dict = {"variant": cfg.variant, "grid": list(grid), "tokens": n,
                      "cache_sites": [s.path for s in cache_sites],
                      "widths": {s.path: _channels(shapes, s.image_output) for s in cache_sites},
                      "cache_bytes_per_sample": int(sum(4 * n * _channels(shapes, s.image_output) for s in cache_sites))}

        if cfg.variant == "full":
            for site in cache_sites:
                graph.outputs.append(_named_identity(em, tensors[site.image_output], cache_output(site.path),
                                                     [batch_dim, n, _channels(shapes, site.image_output)]))
            out = export_graph(graph, model, meta, stamp=self.stamp(), stamped=em.inserted)
            set_model_meta(out, sdtm=info)
            return PassResult(infer_shapes(out), True)

        geo: WindowGeometry | Geometry
        if bucket_values(cfg, grid)["removed"] == 0:
            return PassResult(model, False)
        if cfg.merge == "window":
            geo = WindowGeometry(grid, 0)  # k from the count input
            count = count_input(graph, K_COUNT)
        else:
            _, na, bands = bipartite_r(cfg.ratio, grid, cfg.max_src_per_band)
            geo = Geometry(tokens=n, num_src=na, r=0, bands=bands)  # r from the count input
            count = count_input(graph, R_COUNT)
            info.update(num_src=na, bands=bands, stride=[2, 2])

        counter = gs.Variable(COUNTER_INPUT, dtype=np.float32, shape=[batch_dim, n])
        graph.inputs.append(counter)
        if cfg.merge == "bipartite":
            part = gs.Variable(PARTITION_INPUT, dtype=np.int64, shape=[n])
            part_inv = gs.Variable(PARTITION_INV_INPUT, dtype=np.int64, shape=[n])
            graph.inputs.extend([part, part_inv])
        nodes = {nd.name: nd for nd in graph.nodes}
        blocks: dict[str, list[Site]] = {}
        for s in sites:
            if s.ok and s.kind in LOCATIONS:
                blocks.setdefault(s.block, []).append(s)
        merged_sites, metric_sites, cache_inputs = [], {}, {}
        for block, block_sites in blocks.items():
            chosen = [s for s in block_sites if s.kind in cfg.locations]
            if not chosen:
                continue
            metric = next((s for s in block_sites if s.kind in ATTN_KINDS), chosen[0])
            x_metric = tensors[metric.image_input]
            em.prefix = f"ditmerge_sdtm/{block}"
            if cfg.merge == "window":
                st = build_window_match(em, x_metric, counter, geo, cfg.a_s, count)
                independent, map_flat = st.independent, st.map_flat
            else:
                st = build_match(em, x_metric, part, part_inv, geo, count)
                r = count_value(em, count)
                independent = build_independent_from_map(em, x_metric, st.map_flat,
                                                         em.op("Sub", [em.ints("n", [n]), r], hint="kept"),
                                                         em.op("Sub", [em.ints("na", [geo.num_src]), r], hint="unmerged"))
            counter = build_counter_update(em, counter, independent)
            metric_sites[block] = metric.path
            for site in chosen:
                x, y = tensors[site.image_input], tensors[site.image_output]
                c_in, c_out = _channels(shapes, site.image_input), _channels(shapes, site.image_output)
                em.prefix = f"ditmerge_sdtm/{site.path}"
                merged = (build_window_merge(em, x, st, c_in) if cfg.merge == "window"
                          else build_merge(em, x, st, c_in))
                inside = set(site.nodes)
                for name in site.nodes:
                    nodes[name].inputs = [merged if t is x else t for t in nodes[name].inputs]
                before = len(em.inserted)
                out = (build_gather_unmerge(em, y, map_flat, c_out) if cfg.merge == "window"
                       else build_unmerge(em, y, st, c_out))
                if cfg.blend is not None:
                    cache = gs.Variable(cache_input(site.path), dtype=np.float32, shape=[batch_dim, n, c_out])
                    graph.inputs.append(cache)
                    cache_inputs[site.path] = cache.name
                    out = build_blend(em, out, cache, independent, cfg.blend)
                ours = set(em.inserted[before:])
                for nd in list(y.outputs):
                    if nd.name not in inside and nd.name not in ours:
                        nd.inputs = [out if t is y else t for t in nd.inputs]
                merged_sites.append(site.path)
        if not merged_sites:
            why = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:2])
            raise DitmergeError(f"sdtm found no module to merge at {', '.join(cfg.locations)}"
                                f"{f' ({why})' if why else ''}; merge elsewhere, e.g. at mlp")
        graph.outputs.append(_named_identity(em, counter, COUNTER_OUTPUT, [batch_dim, n]))
        out = export_graph(graph, model, meta, stamp=self.stamp(), stamped=em.inserted)
        info.update(merge=cfg.merge, a_s=cfg.a_s, blend=cfg.blend, sites=merged_sites, metric_sites=metric_sites,
                    cache_inputs=cache_inputs, count=count.name)
        set_model_meta(out, sdtm=info)
        logger.info("sdtm: %s merge of %d sublayers (%s), count from %s%s", cfg.merge, len(merged_sites),
                    ", ".join(sorted(cfg.locations)), count.name, ", blended with the cache" if cfg.blend is not None else "")
        return PassResult(infer_shapes(out), True)


def bucket_values(cfg: SdtmConfig, grid: tuple[int, int]) -> dict:
    """A merged variant's per-bucket values (the bucket's ``method_meta``, never the graph's): ratio,
    tokens removed and kept, k windows or r tokens, and ``counts`` (count key -> value) the graph takes."""
    n = grid[0] * grid[1]
    if cfg.merge == "window":
        k = window_count(cfg.ratio, grid)
        return {"ratio": cfg.ratio, "removed": 3 * k, "kept": n - 3 * k, "k": k, "counts": {K_COUNT: k}}
    r, _, _ = bipartite_r(cfg.ratio, grid, cfg.max_src_per_band)
    return {"ratio": cfg.ratio, "removed": r, "kept": n - r, "r": r, "counts": {R_COUNT: r}}


def meta_counts(meta: dict) -> dict[str, int]:
    """The counts a merged graph takes, from its bucket's meta (graph metadata + :func:`bucket_values`)."""
    if meta.get("variant") == "full" or not meta.get("removed"):
        return {}
    return {K_COUNT: int(meta["k"])} if meta["merge"] == "window" else {R_COUNT: int(meta["r"])}


def _channels(shapes: dict, name: str) -> int:
    return int(shapes[name][1][2])


def _named_identity(em: Emitter, x: gs.Variable, name: str, shape: list) -> gs.Variable:
    out = gs.Variable(name, dtype=np.float32, shape=shape)
    node = gs.Node(op="Identity", name=em._name("output"), inputs=[x], outputs=[out])
    em.graph.nodes.append(node)
    em.inserted.append(node.name)
    return out


def partition_from_counter(grid: tuple[int, int], counter: np.ndarray, rng: np.random.Generator | None = None,
                           bands: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """ToMe's partition (:func:`passes.partition.draw_partition` layout) with each window's dst on its stalest token.

    ``counter [B, N]`` is summed over the batch, so the CFG halves share one partition (the released
    code picks per sample). Ties break at random (``rng``; the released code picks at random only when
    there is no history at all) or on the first token (``rng`` None).
    """
    h, w = grid
    hc, wc = h // 2, w // 2
    total = np.asarray(counter, dtype=np.float64).reshape(-1, h * w).sum(0).reshape(h, w)
    cells = total[:2 * hc, :2 * wc].reshape(hc, 2, wc, 2).transpose(0, 2, 1, 3).reshape(hc, wc, 4)
    if rng is not None:
        cells = cells + tie_noise(grid, rng)  # counters are integers: noise only breaks ties
    slot = cells.argmax(-1)
    dy, dx = slot // 2, slot % 2
    cy, cx = np.meshgrid(np.arange(hc), np.arange(wc), indexing="ij")
    dst_pos = ((cy * 2 + dy) * w + (cx * 2 + dx)).reshape(-1).astype(np.int64)
    return layout((h, w), dst_pos, bands)


def tie_noise(grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``[H/2, W/2, 4]`` noise in [0, 0.5) that breaks ties between a window's integer counters."""
    return rng.random((grid[0] // 2, grid[1] // 2, 4)) * 0.5


def partition_from_counter_torch(grid: tuple[int, int], counter, noise=None, bands: int = 1):
    """:func:`partition_from_counter` on the counter's own device (a TensorRT step keeps it there).

    ``noise``: :func:`tie_noise`, drawn on the host (a host -> device upload of N/4 x 4 values, as ToMe
    uploads its partition), or None for the first token. No device -> host copy and no sync: the
    layout is a stable sort on a per-position key (band, then src by position, then dst by cell), and
    the inverse a scatter. Returns int64 ``(partition, inverse)`` on ``counter.device``.
    """
    import torch

    h, w = grid
    hc, wc = h // 2, w // 2
    dev = counter.device
    total = counter.to(torch.float64).reshape(-1, h * w).sum(0).reshape(h, w)
    cells = total[:2 * hc, :2 * wc].reshape(hc, 2, wc, 2).permute(0, 2, 1, 3).reshape(hc, wc, 4)
    if noise is not None:
        cells = cells + torch.as_tensor(noise, dtype=torch.float64).to(dev, non_blocking=True)
    slot = cells.argmax(-1)  # first maximum, as numpy
    cy, cx = torch.meshgrid(torch.arange(hc, device=dev), torch.arange(wc, device=dev), indexing="ij")
    dst_pos = ((cy * 2 + slot // 2) * w + (cx * 2 + slot % 2)).reshape(-1)
    n = h * w
    pos = torch.arange(n, device=dev)
    # key: band * 2N + (position for src, N + cell index for dst): sorting it gives, per band, its src in
    # position order and then its dst in cell order, the layout of passes.partition.layout
    key = pos.clone()
    key[dst_pos] = n + torch.arange(hc * wc, device=dev)
    key = key + (pos // w) // (h // bands) * 2 * n
    partition = torch.argsort(key, stable=True)
    inverse = torch.empty_like(partition).scatter_(0, partition, pos)
    return partition, inverse


class PromptWeightPass(GraphPass):
    """Prompt reweighting (our reading of the paper; the released code has none): scale the attention
    probabilities that image tokens put on prompt tokens by ``weight``, without renormalizing.

    In cross-attention (PixArt ``attn2``) every key is a prompt token, so reweighting with
    renormalization would change nothing; without it, it is a scale on the attention output before the
    output projection: the Attention node's output is multiplied by ``weight``. Weight 1 inserts nothing.
    MMDiT joint attention (SD3, Flux) is not handled (there the weight would be an additive log-weight
    on the text keys' logits).
    """

    name = "sdtm-prompt-weight"

    def __init__(self, weight: float, bucket: int | str = "") -> None:
        self.weight = float(weight)
        self.bucket = bucket

    def stamp(self) -> dict:
        # nothing per bucket: buckets of one stage share the weighted graph
        return {"pass": self.name, "method": "sdtm", "weight": self.weight}

    def call(self, model: onnx.ModelProto) -> PassResult:
        if self.weight == 1.0:
            return PassResult(model, False)
        if any(s.get("pass") == self.name for s in provenance(model)):
            raise DitmergeError("the graph already carries a prompt reweighting")
        grid = graph_grid(model)
        sites = [s for s in find_sites(infer_shapes(model), grid[0] * grid[1]) if s.kind == "xattn"]
        if not sites:
            raise DitmergeError("prompt reweighting needs cross-attention to the prompt (PixArt); this model has none")
        graph, meta = import_graph(model)
        nodes = {nd.name: nd for nd in graph.nodes}
        em = Emitter(graph, "ditmerge_sdtm_prompt")
        paths = []
        for site in sites:
            attention = [nodes[n] for n in site.nodes if nodes[n].op == "Attention"]
            if len(attention) != 1:
                raise DitmergeError(f"{site.path}: expected one Attention node, found {len(attention)}")
            y = attention[0].outputs[0]
            consumers = list(y.outputs)
            em.prefix = f"ditmerge_sdtm_prompt/{site.path}"
            scaled = em.op("Mul", [y, em.const("prompt_weight", np.float32(self.weight))], hint="prompt_weighted")
            for nd in consumers:
                nd.inputs = [scaled if t is y else t for t in nd.inputs]
            paths.append(site.path)
        out = export_graph(graph, model, meta, stamp=self.stamp(), stamped=em.inserted)
        set_model_meta(out, sdtm_prompt={"weight": self.weight, "sites": paths})
        logger.info("sdtm: prompt attention weighted by %g in %d cross-attention modules", self.weight, len(paths))
        return PassResult(infer_shapes(out), True)
