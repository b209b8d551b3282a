"""torch.export -> ONNX at opset 23, dynamic batch and prompt length, weights in one external file."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from export.families import GraphWrapper, export_processors, family_of
from passes.onnxutil import set_model_meta

logger = logging.getLogger(__name__)

OPSET = 23  # attention becomes one Attention node and reshapes use -1 (docs/design.md, 'Graph rules')
WEIGHTS_FILE = "weights.bin"
TEXT_AXIS = "text"  # the name of the prompt-length dim in exported graphs
MAX_TEXT_LEN = 4096


def example_inputs(model: torch.nn.Module, batch: int, grid: tuple[int, int], text_len: int = 8,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    family = family_of(model)
    inputs = family.example_inputs(model, batch, grid, text_len, torch.Generator().manual_seed(seed))
    family.check_inputs(inputs)
    return inputs


def eager_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return family_of(model).call(model, inputs)


def export_onnx(model: torch.nn.Module, out_path: Path, grid: tuple[int, int], text_len: int = 8) -> onnx.ModelProto:
    """Export ``model`` to ``out_path`` (+ ``weights.bin`` beside it); returns the weightless ModelProto.

    ``text_len`` is the prompt length of the example inputs only: the graph takes any length.
    With ``DITMERGE_EXPORT_CACHE`` set, an export of the same model, grid and code is copied from the cache
    (:mod:`export.export_cache`) instead of being redone.
    """
    from export import export_cache

    weights = out_path.parent / WEIGHTS_FILE
    key = export_cache.export_key(model, grid, text_len, {"opset": OPSET}) if export_cache.cache_dir() else None
    if key and export_cache.restore(key, {"base.onnx": out_path, WEIGHTS_FILE: weights}):
        return onnx.load(out_path, load_external_data=False)
    proto = _export(model, out_path, grid, text_len)
    if key:
        export_cache.store(key, {"base.onnx": out_path, WEIGHTS_FILE: weights})
    return proto


def _export(model: torch.nn.Module, out_path: Path, grid: tuple[int, int], text_len: int) -> onnx.ModelProto:
    family = family_of(model)
    inputs = example_inputs(model, 2, grid, text_len)
    names = list(inputs)
    # 2. Dynamic axes: the batch, and the prompt length (pipelines send 120, 300, 333, 512 tokens, ...)
    batch = torch.export.Dim("batch", min=1, max=1024)
    text = torch.export.Dim(TEXT_AXIS, min=2, max=MAX_TEXT_LEN)
    dynamic = {n: ({0: batch} if n in family.batch_inputs else {}) | (
        {family.text_inputs[n]: text} if n in family.text_inputs else {}) or None for n in names}
    wrapper = GraphWrapper(model, family, names).eval()
    processors = export_processors(model)
    original = model.attn_processors if processors else None
    try:
        if processors:
            model.set_attn_processor(processors)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, tuple(inputs.values()), dynamo=True, opset_version=OPSET,
                                        input_names=names, output_names=["sample"],
                                        dynamic_shapes={"args": tuple(dynamic[n] for n in names)}, optimize=True,
                                        verbose=False)
    finally:
        if original:
            model.set_attn_processor(original)
    import onnx_ir

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx_ir.save(program.model, tmp, external_data=WEIGHTS_FILE)
    proto = onnx.load(tmp, load_external_data=False)
    _externalize_parameters(proto, out_path.parent / WEIGHTS_FILE)
    set_model_meta(proto, family=family.name, grid=list(grid), text_len=text_len, model_class=family.class_name)
    onnx.save(proto, tmp)
    tmp.replace(out_path)
    return proto


def _externalize_parameters(model: onnx.ModelProto, weights: Path, alignment: int = 64) -> None:
    """Move the small module parameters onnx_ir kept inline (biases, norms) into the weights file.

    Every bucket graph then references one copy of every parameter; the exporter's small shape
    constants stay inline, where passes read them.
    """
    from onnx import numpy_helper

    with open(weights, "ab") as f:
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL or not init.name.startswith("model."):
                continue
            data = numpy_helper.to_array(init).tobytes()
            offset = -(-f.tell() // alignment) * alignment
            f.write(b"\0" * (offset - f.tell()))
            f.write(data)
            dims, dtype, name = list(init.dims), init.data_type, init.name
            init.Clear()
            init.name, init.data_type = name, dtype
            init.dims.extend(dims)
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(len(data)))):
                init.external_data.add(key=key, value=value)


