"""The AT-EDM pass: prune the residual stream after one transformer block, refill before the output layer.

Locating is by module scope (:mod:`passes.locate`), the math is :mod:`passes.atedm.graph`. The pruning
block's self-attention keeps its fused ``Attention`` op; the importance reads the q and k that feed it.
The blocks after the pruning block run on the kept tokens only (their reshapes follow the token count
after :class:`passes.cleanup.FreeTokenAxisPass`), and the output of the last block is refilled to the
full grid before the final norm and projection.

Deviation from the paper (AT-EDM prunes after the first transformer layer of every SD-XL attention
block and refills before each ResNet block): a DiT has one stack of blocks and no convolution in
between, so there is one pruning point and one refill, and the token count is constant per bucket.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re

import onnx

from passes.atedm.graph import REFILLS, PruneGeometry, build_importance, build_prune, build_refill, static_scores
from passes.cleanup import FreeTokenAxisPass
from passes.counts import count_input_name
from passes.errors import DitmergeError
from passes.graphbuild import Emitter, count_input
from passes.infra import PassResult, StampedPass
from passes.locate import Topology, _node_scopes, find_sites, tensor_shapes
from passes.onnxutil import export_graph, graph_grid, import_graph, infer_shapes, set_model_meta
from passes.trt_limits import TOPK_MAX_K

from passes.atedm.variants import KEPT_COUNT

logger = logging.getLogger(__name__)

IMPORTANCE = ("gwpr", "static")
_BLOCK_RE = re.compile(r"(?:^|\.)(transformer_blocks)\.(\d+)$")


def kept_count(ratio: float, tokens: int) -> int:
    """``int(N * ratio)`` tokens are pruned (ToMe's ratio semantics), at least one is kept."""
    return max(tokens - int(tokens * ratio), 1)


@dataclasses.dataclass
class ATEDMConfig:
    ratio: float  # share of the tokens pruned
    prune_layer: int = 1  # the block whose output is pruned and whose self-attention scores the tokens
    stride: int = 4  # every stride-th query row enters the importance
    iterations: int = 5  # WPR iterations (ZeroTPrune's get_importance: 5)
    # "gwpr", or "static": a fixed dither pattern instead of the attention (ablation: quality, and the
    # importance's share of the latency)
    importance: str = "gwpr"
    refill: str = "delta"  # "delta" or "copy"; see passes.atedm.graph

    def validate(self, grid: tuple[int, int], num_blocks: int | None = None) -> None:
        if not isinstance(self.ratio, (int, float)) or isinstance(self.ratio, bool) or not 0 <= self.ratio < 1:
            raise DitmergeError(f"ratio must be a number in [0, 1), got {self.ratio!r}")
        n = grid[0] * grid[1]
        kept = kept_count(self.ratio, n)
        if self.ratio > 0 and kept > TOPK_MAX_K:
            raise DitmergeError(f"ratio {self.ratio} keeps {kept} of {n} tokens; TensorRT's TopK keeps at most "
                                f"{TOPK_MAX_K}: prune at least {1 - TOPK_MAX_K / n:.4f} of the tokens")
        if not isinstance(self.stride, int) or not 1 <= self.stride <= n:
            raise DitmergeError(f"stride must be an integer in [1, {n}], got {self.stride!r}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise DitmergeError(f"iterations must be a positive integer, got {self.iterations!r}")
        if self.importance not in IMPORTANCE:
            raise DitmergeError(f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.refill not in REFILLS:
            raise DitmergeError(f"refill must be one of {', '.join(REFILLS)}, got {self.refill!r}")
        if not isinstance(self.prune_layer, int) or self.prune_layer < 0:
            raise DitmergeError(f"prune_layer must be a block index >= 0, got {self.prune_layer!r}")
        if num_blocks is not None and self.prune_layer > num_blocks - 2:
            raise DitmergeError(f"prune_layer {self.prune_layer}: the model has {num_blocks} transformer blocks and "
                                f"at least one must run on the kept tokens; choose 0..{num_blocks - 2}")


@dataclasses.dataclass
class Block:
    """A transformer block of the graph: its nodes and its residual-stream output."""

    path: str
    index: int
    nodes: set[str]
    output: str | None = None


def find_blocks(model: onnx.ModelProto, num_tokens: int) -> list[Block]:
    """The ``transformer_blocks.i`` modules in order, each with its one ``[B, N, C]`` output (None if not one)."""
    members: dict[str, set[str]] = collections.OrderedDict()
    for node in model.graph.node:
        for scope in _node_scopes(node)[0]:
            m = _BLOCK_RE.search(scope)
            if m:
                members.setdefault(f"{m.group(1)}.{m.group(2)}", set()).add(node.name)
    topo = Topology.of(model, num_tokens)
    blocks = []
    for path, names in members.items():
        nodes = [n for n in model.graph.node if n.name in names]
        outs = [t for t in topo.boundary(nodes)[1] if topo.image_like(t)]
        blocks.append(Block(path, int(path.rsplit(".", 1)[1]), names, outs[0] if len(outs) == 1 else None))
    blocks.sort(key=lambda b: b.index)
    return blocks


def count_blocks(model: onnx.ModelProto) -> int:
    return len({m.group(2) for n in model.graph.node for s in _node_scopes(n)[0] if (m := _BLOCK_RE.search(s))})


class ATEDMPass(StampedPass):
    """Insert AT-EDM pruning after block ``config.prune_layer``; ratio 0 inserts nothing; a second run is a no-op."""

    name = "atedm"

    config: ATEDMConfig

    def stamp(self) -> dict:
        """Nothing per bucket (no ratio, no bucket index): buckets with one pruning layer share one graph."""
        c = self.config
        return {"pass": self.name, "method": "atedm", "kept": "count", "prune_layer": c.prune_layer,
                "stride": c.stride, "iterations": c.iterations, "importance": c.importance, "refill": c.refill}

    carries, apply_to = "an AT-EDM pruning", "the unpruned graph"

    def requires(self, model: onnx.ModelProto) -> None:
        self.config.validate(graph_grid(model))

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg = self.config
        grid = graph_grid(model)
        n = grid[0] * grid[1]
        if cfg.ratio == 0:
            return PassResult(model, False)
        geo = PruneGeometry(grid=grid, kept=kept_count(cfg.ratio, n), stride=cfg.stride, iterations=cfg.iterations)

        model = FreeTokenAxisPass(n)(model).model
        shaped = infer_shapes(model)
        blocks = find_blocks(shaped, n)
        if not blocks:
            raise DitmergeError("no transformer_blocks found in the graph (is it a diffusers DiT export?)")
        cfg.validate(grid, len(blocks))
        prune_block, last = blocks[cfg.prune_layer], blocks[-1]
        for b in (prune_block, last):
            if b.output is None:
                raise DitmergeError(f"{b.path} has no single [B, {n}, C] output; AT-EDM cannot prune its stream")
        attn = self._attention(shaped, prune_block, n)
        shapes = tensor_shapes(shaped)
        channels = int(shapes[prune_block.output][1][2])
        later = set().union(*(b.nodes for b in blocks[cfg.prune_layer + 1:]))

        graph, meta = import_graph(model)
        tensors = graph.tensors()
        x, y = tensors[prune_block.output], tensors[last.output]
        outside = [nd.name for nd in x.outputs if nd.name not in prune_block.nodes and nd.name not in later]
        if y.name in {o.name for o in graph.outputs}:
            raise DitmergeError(f"the output of {last.path} is the graph output; there is no output layer to refill "
                                "before")
        if outside:
            raise DitmergeError(f"the output of {prune_block.path} is read outside the later blocks ({outside[0]}); "
                                "AT-EDM prunes a plain stack of blocks only")
        em = Emitter(graph, f"ditmerge_atedm/{prune_block.path}/importance")
        if cfg.importance == "gwpr":
            q, k = (tensors[t] for t in attn.input[:2])
            scores = build_importance(em, q, k, _attention_scale(attn, shapes[attn.input[0]][1]), geo)
        else:
            scores = em.const("static_scores", static_scores(grid))
        em.prefix = f"ditmerge_atedm/{prune_block.path}/prune"
        pruned, state = build_prune(em, x, scores, geo, channels, count_input(graph, KEPT_COUNT))
        for nd in list(x.outputs):
            if nd.name in later:
                nd.inputs = [pruned if t is x else t for t in nd.inputs]
        em.prefix = "ditmerge_atedm/refill"
        before = len(em.inserted)
        refilled = build_refill(em, y, state, channels, cfg.refill)
        refill_nodes = set(em.inserted[before:])
        for nd in list(y.outputs):
            if nd.name not in last.nodes and nd.name not in refill_nodes:
                nd.inputs = [refilled if t is y else t for t in nd.inputs]
        out = export_graph(graph, model, meta, stamp=self.stamp(), stamped=em.inserted)
        # the bucket's ratio and kept tokens are not in the graph: see bucket_values
        set_model_meta(out, atedm={"tokens": n, "count": count_input_name(KEPT_COUNT), "prune_layer": cfg.prune_layer,
                                   "prune_block": prune_block.path, "last_block": last.path,
                                   "attention": attn.name, "stride": cfg.stride, "iterations": cfg.iterations,
                                   "importance": cfg.importance, "refill": cfg.refill,
                                   "sample_rows": len(geo.sample_rows), "blocks": len(blocks)})
        out = infer_shapes(out)
        logger.info("atedm: %s keeps k (a count input; %d of %d at ratio %g) tokens (importance from %d query rows, "
                    "%d WPR iterations); %d blocks run pruned, refill before the output layer", prune_block.path,
                    geo.kept, n, cfg.ratio,
                    len(geo.sample_rows), cfg.iterations, len(blocks) - cfg.prune_layer - 1)
        return PassResult(out, True)

    @staticmethod
    def _attention(model: onnx.ModelProto, block: Block, n: int) -> onnx.NodeProto:
        """The fused self-attention node of ``block``, checked: 4-D q/k of N tokens, no mask, no softcap."""
        sites = [s for s in find_sites(model, n) if s.block == block.path and s.kind == "attn"]
        if not sites:
            raise DitmergeError(f"{block.path} has no self-attention (attn1); AT-EDM scores tokens by it")
        names = set(sites[0].nodes)
        found = [nd for nd in model.graph.node if nd.name in names and nd.op_type == "Attention"]
        if len(found) != 1:
            raise DitmergeError(f"{sites[0].path}: expected one fused Attention node, found {len(found)} "
                                "(export at opset 23)")
        node = found[0]
        shapes = tensor_shapes(model)
        qd, kd = (shapes.get(node.input[i], (0, []))[1] for i in (0, 1))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        why = None
        if len(qd) != 4 or len(kd) != 4 or qd[2] != n or kd[2] != n:
            why = f"q/k are {qd} / {kd}, not [B, H, {n}, D]"
        elif len(node.input) > 3 and node.input[3]:
            why = "it has an attention mask"
        elif attrs.get("softcap", 0.0) or attrs.get("is_causal", 0):
            why = "it is causal or soft-capped"
        if why:
            raise DitmergeError(f"{sites[0].path}: cannot score tokens by its attention: {why}")
        return node


def bucket_values(cfg: ATEDMConfig, grid: tuple[int, int]) -> dict:
    """A bucket's own values (its ``method_meta``, never the graph's): ratio, kept tokens and ``counts``."""
    kept = kept_count(cfg.ratio, grid[0] * grid[1])
    return {"ratio": cfg.ratio, "kept": kept, "counts": {KEPT_COUNT: kept}}


def _attention_scale(node: onnx.NodeProto, q_dims: list) -> float:
    """The Attention op's ``scale`` attribute, else its default ``1 / sqrt(head size)``."""
    for a in node.attribute:
        if a.name == "scale":
            return float(a.f)
    return 1.0 / math.sqrt(int(q_dims[3]))


