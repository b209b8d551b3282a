"""CA-ToMe's two graph variants (methods.md §4), built on the ToMe pass.

CA-ToMe caches each block's matching across denoising steps. A static graph cannot keep state, so the
cache moves to the runtime and the graph comes in two variants with the same merges:

- ``match``: ToMe's graph (similarity, sort, merge), plus every block's matching as int64 graph outputs
  ``catome_idx/<block>/<name>`` (:class:`passes.tome_graph.MatchIndices`: unm, mrg, mrg_dst, dst, row);
- ``apply``: the same merges, with those index tensors as graph inputs of the same names; no similarity,
  no TopK, and no partition inputs (the dst positions are part of the cached matching).

Index shapes are static apart from the batch axis; the indices are batch-local (per sample), so a
cache taken at batch 2 (CFG) feeds batch 2. Deviation from the paper: ``r`` is fixed per graph (the
bucket's calibrated value) instead of the per-call count of pairs above the threshold.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.errors import DitmergeError
from passes.graphbuild import Emitter
from passes.tome import ToMeConfig, ToMePass
from passes.tome_graph import (
    INDEX_NAMES,
    Geometry,
    MatchIndices,
    MatchState,
    build_match_indices,
    build_state,
    index_shapes,
)

INDEX_PREFIX = "catome_idx/"
VARIANTS = ("match", "apply")


def index_name(block: str, name: str) -> str:
    """Graph output (match) / input (apply) name of one index tensor of one block's matching."""
    return f"{INDEX_PREFIX}{block}/{name}"


class CaToMePass(ToMePass):
    """ToMe with the matching exported (``variant="match"``) or imported (``variant="apply"``).

    ``config.r`` (tokens removed) is normally set from calibration; r = 0 inserts nothing.
    """

    name = "catome"

    def __init__(self, config: ToMeConfig, variant: str, bucket: int | str = "") -> None:
        if variant not in VARIANTS:
            raise DitmergeError(f"unknown CA-ToMe variant {variant!r}; choose from {', '.join(VARIANTS)}")
        super().__init__(config, bucket)
        self.variant = variant
        self._index_io: dict[str, dict[str, list]] = {}

    def stamp(self) -> dict:
        return {**super().stamp(), "method": "catome", "variant": self.variant, "r": self.config.r}

    def _start(self, graph: gs.Graph, n: int) -> None:
        self._batch_dim = next((t.shape[0] for t in graph.inputs if t.name == "hidden_states" and t.shape),
                               "batch")
        self._index_io = {}
        if self.variant == "match":
            super()._start(graph, n)

    def _block_state(self, em: Emitter, block: str, x: gs.Variable, geo: Geometry) -> MatchState:
        shapes = {k: [self._batch_dim if d == "B" else d for d in v] for k, v in index_shapes(geo).items()}
        if self.variant == "match":
            idx = build_match_indices(em, x, self._part, self._part_inv, geo)
            for key, var in idx.as_dict().items():
                var.name, var.dtype, var.shape = index_name(block, key), np.int64, shapes[key]
                em.graph.outputs.append(var)
        else:
            tensors = {key: gs.Variable(index_name(block, key), dtype=np.int64, shape=shapes[key]) for key in INDEX_NAMES}
            em.graph.inputs.extend(tensors.values())
            idx = MatchIndices(**tensors)
        self._index_io[block] = {index_name(block, k): [d if isinstance(d, int) else "B" for d in s]
                                 for k, s in shapes.items()}
        return build_state(em, x, idx, geo)

    def _extra_meta(self) -> dict:
        return {"catome": {"variant": self.variant, "indices": self._index_io}}
