"""What the runtime and the build read from a graph file (inputs, branch metadata), read once per file.

Parsing a DiT graph's protobuf (weights external) takes tens of milliseconds and a few MB; the runtime
opens a graph's session once, and the build measures every bucket and variant of a graph that many
buckets share, so each file is parsed once and both of its reads come from that one parse. The cache is
keyed by the file's path, size and modification time: a rewritten file is read again.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

CACHE_SIZE = 32  # graph files; a plan has a handful


@dataclasses.dataclass(frozen=True)
class GraphFacts:
    inputs: dict[str, tuple[np.dtype, list]]  # name -> (numpy dtype, dims with str for dynamic axes)
    branches: dict | None  # the ditmerge.branch metadata of a branched graph (passes/branch.py), or None


_CACHE: dict[tuple, GraphFacts] = {}


def graph_facts(path: Path) -> GraphFacts:
    """The inputs and branch metadata of the graph at ``path``, parsed once (treat them as read-only)."""
    path = Path(path)
    st = os.stat(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    facts = _CACHE.get(key)
    if facts is None:
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest
        facts = _CACHE[key] = _read(path)
    return facts


def _read(path: Path) -> GraphFacts:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    from passes.branch import branch_info

    model = onnx.load(path, load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        inputs[vi.name] = (np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)), dims)
    return GraphFacts(inputs, branch_info(model))


def graph_inputs(path: Path) -> dict[str, tuple[np.dtype, list]]:
    """Name -> (numpy dtype, dims with str for dynamic axes) of a graph's inputs (a copy: the caller's to keep)."""
    return dict(graph_facts(path).inputs)


def graph_branches(path: Path) -> dict | None:
    """The variants of a branched graph (:mod:`passes.branch`), or None for a graph of one variant."""
    return graph_facts(path).branches
