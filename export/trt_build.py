"""TensorRT engines, one per bucket graph, built with the TensorRT Python API.

Engines are cached by a key of (graph hash, precision, TensorRT version, GPU name): a rebuild happens
only when one of them changes. One timing cache is shared by every bucket of a plan, so later buckets
reuse the tactic timings of the first. Engines are written atomically (temp + rename).

Weight sharing: engines are built weight-stripped by default (``strip=True``): the engine file holds
kernels, not weights, and the runtime refits it from the plan's one weights file when it loads it. On
the GPU each loaded engine still owns its refitted weights (TensorRT has no cross-engine weight
sharing for different networks; one engine with several optimization profiles needs one network, and
our buckets are different networks), so the runtime keeps at most ``max_resident`` engines loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from passes.errors import DitmergeError
from passes.graphbuild import PIN_FP32
from passes.trt_check import assert_tensorrt_ready
from runtime.trt_runner import gpu_name, tensorrt_status

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
TIMING_CACHE = "timing.cache"


def require_tensorrt() -> None:
    ok, why = tensorrt_status()
    if not ok:
        raise DitmergeError(f"--backend trt needs TensorRT on a GPU: {why}; use --backend auto to fall back to onnxruntime")


def engine_key(graph_sha256: str, precision: str, trt_version: str, gpu: str, strip: bool = True) -> str:
    """The cache key of an engine: any change of graph, precision, TensorRT or GPU means a rebuild."""
    if precision not in PRECISIONS:
        raise DitmergeError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    blob = json.dumps({"graph": graph_sha256, "precision": precision, "tensorrt": trt_version, "gpu": gpu,
                       "strip": strip}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


TEXT_PROFILE = (1, 120, 512)  # prompt lengths an engine takes (min, opt, max): PixArt 120/300, SD3 333, Flux 512


def build_engine(onnx_path: Path, engine_path: Path, precision: str = "fp16", timing_cache: Path | None = None,
                 batch: tuple[int, int, int] = (1, 2, 8), strip: bool = True, workspace_gb: float = 8.0,
                 opt_level: int | None = None) -> None:
    """Parse ``onnx_path`` (path-based: external weights resolve beside it) and write a serialized engine.

    Args:
        onnx_path: the bucket graph.
        engine_path: where the engine goes (written atomically).
        precision: fp32, fp16 or bf16.
        timing_cache: a timing cache file shared by the plan's builds (read, then updated).
        batch: (min, opt, max) batch of the optimization profile; all other dims are static.
        strip: build a weight-stripped, refittable engine.
        workspace_gb: builder workspace limit.
        opt_level: TensorRT's builder optimization level (0-5; None: TensorRT's default, 3); lower builds faster.
    """
    import onnx
    import tensorrt as trt

    assert_tensorrt_ready(onnx.load(onnx_path, load_external_data=False), str(onnx_path.name))
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DitmergeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if opt_level is not None:
        config.builder_optimization_level = opt_level
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls miss the 1e-3 agreement with onnxruntime fp32
    elif precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        pinned = pin_fp32_layers(network, trt)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            logger.info("%s: %d layers pinned to fp32 in the %s build", onnx_path.name, pinned, precision)
    if strip:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if shape and shape[0] == -1 or -1 in shape:
            # the batch (axis 0 of batched inputs) and the prompt length (any other dynamic axis, e.g. txt_ids'
            # axis 0): min / opt / max from ``batch`` and TEXT_PROFILE
            batched = shape[0] == -1 and t.name != "txt_ids"
            lo, opt, hi = ([(b if batched and a == 0 else txt) if d == -1 else d for a, d in enumerate(shape)]
                           for b, txt in zip(batch, TEXT_PROFILE))
            profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DitmergeError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    _write_atomic(engine_path, bytes(serialized))
    if timing_cache:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))


def pin_fp32_layers(network, trt) -> int:
    """Keep the layers of nodes the graph builders marked (``passes.graphbuild.PIN_FP32``) in fp32.

    onnx-tensorrt names each layer after its ONNX node, so the marker in the node name survives. Returns
    how many layers were pinned. (TensorRT 10.12 deprecates these precision hints in favour of strongly
    typed networks; they still apply through 10.x.)
    """
    marker = "/" + PIN_FP32
    floats = {trt.float32, trt.float16, trt.bfloat16}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if marker not in layer.name:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in floats:
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def build_plan_engines(plan_dir: Path, manifest: dict, precision: str = "fp16", strip: bool = True,
                       batch: tuple[int, int, int] = (1, 2, 8), reuse_from: Path | None = None,
                       progress: bool = True, opt_level: int | None = None) -> dict:
    """Build (or reuse from cache) one engine per distinct graph of a plan; returns the engines table.

    ``reuse_from`` is the previous plan directory: engines whose key matches and its timing cache are
    copied over instead of rebuilt.
    """
    import shutil

    import tensorrt as trt
    from tqdm.auto import tqdm

    require_tensorrt()
    gpu = gpu_name()
    if reuse_from and (reuse_from / TIMING_CACHE).exists() and not (plan_dir / TIMING_CACHE).exists():
        shutil.copy2(reuse_from / TIMING_CACHE, plan_dir / TIMING_CACHE)
    graphs = {b["graph"]: b["sha256"] for b in manifest["buckets"]}
    for b in manifest["buckets"]:
        graphs.update({v["file"]: v["sha256"] for v in b.get("graphs", {}).values()})
    engines = {}
    for graph, digest in tqdm(graphs.items(), desc="TensorRT engines", disable=not progress, leave=False):
        key = engine_key(digest, precision, trt.__version__, gpu, strip)
        name = f"{Path(graph).stem}.{precision}.{key}.engine"
        path = plan_dir / name
        if not path.exists() and reuse_from and (reuse_from / name).exists():
            shutil.copy2(reuse_from / name, path)
        if path.exists():
            logger.info("engine %s is cached (key %s)", name, key)
        else:
            logger.info("building %s (%s) ...", name, precision)
            build_engine(plan_dir / graph, path, precision, plan_dir / TIMING_CACHE, batch, strip, opt_level=opt_level)
        from runtime.plan import sha256_file

        engines[graph] = {"file": name, "sha256": sha256_file(path), "key": key, "precision": precision,
                          "tensorrt": trt.__version__, "gpu": gpu, "strip": strip, "batch": list(batch)}
    return engines
