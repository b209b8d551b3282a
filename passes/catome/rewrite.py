"""CA-ToMe's two graph variants (docs/design.md, 'The other methods' graphs'), built on the ToMe pass.

CA-ToMe caches each block's matching across denoising steps. A static graph cannot keep state, so the
cache moves to the runtime and the graph comes in two variants with the same merges:

- ``match``: ToMe's graph (similarity, sort, merge), plus every block's matching as int64 graph outputs
  ``catome_idx_out/<block>/order`` and ``.../node_idx`` (src by best similarity, and each src's best dst,
  ``[B, K, Na]``) and the partition it used (``catome_idx_out/partition``, ``.../partition_inv``);
- ``apply``: the same merges, with those tensors as graph inputs named ``catome_idx/...``
  (:func:`as_cache_feed`); no similarity and no TopK: only the integer index half of the matching
  (:func:`passes.tome.graph.indices_from_order`). Inputs and outputs differ in name, so the two variants
  can be branches of one graph (:mod:`passes.branch`).

The cached tensors do not depend on r, so with r from shapes (``ToMeConfig.dynamic``, each block's r the
length of ``ditmerge_count_tome_r_<i>``) one match graph and one apply graph serve every bucket, and their
shapes are static apart from the batch axis. They are batch-local (per sample): a cache taken at batch 2
(CFG) feeds batch 2. Deviation from the paper: ``r`` is fixed per bucket (its calibrated value) instead
of the per-call count of pairs above the threshold.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from passes.errors import DitmergeError
from passes.graphbuild import Emitter
from passes.tome import ToMeConfig, ToMePass
from passes.tome.graph import Geometry, MatchState, band_r, build_order, build_state, indices_from_order
from passes.catome.variants import (VARIANTS, CACHED_NAMES, PARTITION_NAMES, index_name)



class CaToMePass(ToMePass):
    """ToMe with the matching exported (``variant="match"``) or imported (``variant="apply"``).

    ``config.r`` (tokens removed) is normally set from calibration; r = 0 inserts nothing.
    """

    name = "catome"

    def __init__(self, config: ToMeConfig, variant: str, bucket: int | str = "") -> None:
        if variant not in VARIANTS:
            raise DitmergeError(f"unknown CA-ToMe variant {variant!r}; choose from {', '.join(VARIANTS)}")
        if config.match_every != 1:
            raise DitmergeError("CA-ToMe caches each block's own matching across steps; match_every > 1 is a ToMe option")
        super().__init__(config, bucket)
        self.variant = variant
        self._index_io: dict[str, dict[str, list]] = {}

    def stamp(self) -> dict:
        return {**super().stamp(), "method": "catome", "variant": self.variant,
                "r": "count" if self.config.dynamic else self.config.r}

    def _start(self, graph: gs.Graph, n: int) -> None:
        self._batch_dim = next((t.shape[0] for t in graph.inputs if t.name == "hidden_states" and t.shape),
                               "batch")
        self._index_io = {}
        if self.variant == "match":
            super()._start(graph, n)
            for name, var in zip(PARTITION_NAMES, (self._part, self._part_inv)):
                out = gs.Variable(index_name("", name, output=True), dtype=np.int64, shape=[n])
                graph.nodes.append(gs.Node("Identity", name=f"ditmerge_catome/{name}_out", inputs=[var], outputs=[out]))
                graph.outputs.append(out)
        else:
            self._part, self._part_inv = (gs.Variable(index_name("", name), dtype=np.int64, shape=[n])
                                          for name in PARTITION_NAMES)
            graph.inputs.extend([self._part, self._part_inv])

    def _block_state(self, em: Emitter, block: str, x: gs.Variable, geo: Geometry,
                     r_count: gs.Variable | None = None) -> MatchState:
        shape = [self._batch_dim, geo.bands, geo.num_src // geo.bands]
        if self.variant == "match":
            cached = dict(zip(CACHED_NAMES, build_order(em, x, self._part, geo)))
            for key, var in cached.items():
                var.name, var.dtype, var.shape = index_name(block, key, output=True), np.int64, shape
                em.graph.outputs.append(var)
        else:
            cached = {key: gs.Variable(index_name(block, key), dtype=np.int64, shape=shape) for key in CACHED_NAMES}
            em.graph.inputs.extend(cached.values())
        self._index_io[block] = {index_name(block, k): ["B", shape[1], shape[2]] for k in CACHED_NAMES}
        r = band_r(em, geo, r_count)
        idx = indices_from_order(em, x, cached["order"], cached["node_idx"], self._part, self._part_inv, geo, r)
        return build_state(em, x, idx, geo, r)

    def _extra_meta(self) -> dict:
        return {"catome": {"variant": self.variant, "indices": self._index_io}}
