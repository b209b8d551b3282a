"""ONNX helpers every pass shares: metadata-preserving graphsurgeon round trips, shape inference, and reading
declared shapes and small constants."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from passes.errors import DitmergeError

PROVENANCE_KEY = "ditmerge.provenance"
MODEL_META_PREFIX = "ditmerge."


def get_model_meta(model: onnx.ModelProto) -> dict[str, str]:
    """Model-level ``ditmerge.*`` metadata (grid, family, ...), keys without the prefix."""
    return {p.key[len(MODEL_META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(MODEL_META_PREFIX)}


def set_model_meta(model: onnx.ModelProto, **values: object) -> None:
    for key, value in values.items():
        full = MODEL_META_PREFIX + key
        text = value if isinstance(value, str) else json.dumps(value)
        for p in model.metadata_props:
            if p.key == full:
                p.value = text
                break
        else:
            model.metadata_props.add(key=full, value=text)


def provenance(model: onnx.ModelProto) -> list[dict]:
    """The distinct provenance stamps carried by nodes of ``model``."""
    seen: dict[str, dict] = {}
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == PROVENANCE_KEY and p.value not in seen:
                seen[p.value] = json.loads(p.value)
    return list(seen.values())


def import_graph(model: onnx.ModelProto) -> tuple[gs.Graph, dict[str, list[tuple[str, str]]]]:
    """gs.import_onnx, plus the node metadata that onnx-graphsurgeon drops on import (by node name)."""
    meta = {n.name: [(p.key, p.value) for p in n.metadata_props] for n in model.graph.node if n.metadata_props}
    return gs.import_onnx(model), meta


def export_graph(graph: gs.Graph, like: onnx.ModelProto, meta: dict[str, list[tuple[str, str]]],
                 stamp: dict | None = None, stamped: list[str] | None = None) -> onnx.ModelProto:
    """gs.export_onnx with the original node metadata restored and ``stamp`` put on ``stamped`` nodes.

    Initializers that live in external data keep their references (gs exports them untouched), so
    every graph of a plan can point at one weights file.
    """
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    model.producer_name, model.producer_version = like.producer_name, like.producer_version
    model.metadata_props.extend(like.metadata_props)
    model.functions.extend(like.functions)
    stamp_text = json.dumps(stamp, sort_keys=True) if stamp else None
    stamped_set = set(stamped or [])
    for n in model.graph.node:
        for key, value in meta.get(n.name, []):
            n.metadata_props.add(key=key, value=value)
        if stamp_text and n.name in stamped_set:
            n.metadata_props.add(key=PROVENANCE_KEY, value=stamp_text)
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop stale value_info and re-infer every shape (in memory; initializers may be external)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def save_checked(model: onnx.ModelProto, path) -> None:
    """Write ``model`` atomically (temp + rename) and run the path-based checker on it.

    Path-based checking resolves external data beside the file and works past 2 GB.
    """
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, tmp)
    try:
        onnx.checker.check_model(str(tmp), full_check=False)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """Map tensor name -> (elem_type, dims) from inputs, outputs, value_info and initializers."""
    out: dict[str, tuple[int, list[int | str]]] = {}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out[vi.name] = (tt.elem_type, [])
            continue
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out[vi.name] = (tt.elem_type, dims)
    for init in model.graph.initializer:
        out[init.name] = (init.data_type, list(init.dims))
    return out


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of a small inline initializer or Constant node output; None otherwise."""
    for init in model.graph.initializer:
        if init.name == name:
            return None if init.data_location == onnx.TensorProto.EXTERNAL else numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def graph_grid(model: onnx.ModelProto) -> tuple[int, int]:
    meta = get_model_meta(model)
    if "grid" not in meta:
        raise DitmergeError("the graph has no ditmerge.grid metadata: export it with `python -m export` first")
    h, w = (int(v) for v in meta["grid"].strip("[]").split(","))
    return h, w
