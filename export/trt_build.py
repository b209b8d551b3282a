"""TensorRT engines: one per distinct graph file of a plan, one optimization profile per count vector.

A bucket is a shape (:mod:`passes.counts`): buckets whose graphs are equal share one graph file, and the
token counts that tell them apart are the lengths of the graph's ``ditmerge_count_<key>`` inputs. So a
plan gets one engine per graph file, and that engine gets one optimization profile per distinct count
vector among the buckets that use it: each count input has min = opt = max = its length (every token
count is static within a profile, so TopK K and every shape derived from the counts are build-time
constants of that profile); batch and prompt (``text``) axes keep their ranges.

How the weights are held once:
- one engine for all the buckets of a graph: the weights belong to the network, and TensorRT shares
  them between the profiles of one engine (only kernels and activation sizes are per profile);
- weight-stripped (``strip=True``: ``STRIP_PLAN`` + ``REFIT_IDENTICAL``): the engine file holds kernels,
  not weights; the runtime refits it once per engine, from the plan's one weights file, when it loads;
- one activation buffer per engine: the runtime creates one execution context per profile over one
  device-memory buffer sized to the largest profile (``runtime.trt_runner.TrtRunner``);
- what the builder reports is recorded per engine (``memory`` in the engines table, read back from the
  built engine): TensorRT's ``TOTAL_WEIGHTS_SIZE`` / ``STRIPPED_WEIGHTS_SIZE`` engine stats and
  ``get_device_memory_size_for_profile_v2`` of each profile. The GPU test
  (``tests/trt/test_tensorrt.py``) holds a multi-profile engine to <= 1.15x a single-profile one.

Reduced precision: by default FP16 / BF16 builder flags, with the layers of ``fp32.``-marked nodes
pinned to fp32 by precision hints. ``strongly_typed=True`` builds a strongly typed network instead: the
types are the graph's own (so the graph must already be in the engine's precision, its fp32-marked nodes
behind their own Casts) and no precision hints are needed.

Engines are cached by a key of (graph hash, precision, TensorRT version, GPU name, stripping, strong
typing, batch and prompt ranges, profiles): a rebuild happens only when one of them changes. One timing
cache is shared by every engine of a plan. Engines are written atomically (temp + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from passes.counts import count_key, is_count_input
from passes.errors import DitmergeError
from passes.graphbuild import PIN_FP32
from passes.trt_check import assert_tensorrt_ready
from passes.trt_profiles import count_inputs
from runtime.trt_runner import engine_memory, gpu_name, tensorrt_status

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
TIMING_CACHE = "timing.cache"
TEXT_PROFILE = (1, 120, 512)  # prompt lengths an engine takes (min, opt, max): PixArt 120/300, SD3 333, Flux 512


def require_tensorrt() -> None:
    ok, why = tensorrt_status()
    if not ok:
        raise DitmergeError(f"--backend trt needs TensorRT on a GPU: {why}; use --backend auto to fall back to onnxruntime")


def engine_key(graph_sha256: str, precision: str, trt_version: str, gpu: str, strip: bool = True,
               profiles: list[dict[str, int]] | None = None, strongly_typed: bool = False,
               batch: tuple[int, int, int] = (1, 2, 8)) -> str:
    """The cache key of an engine: any change of graph, precision, TensorRT, GPU, build mode, ranges or
    optimization profiles (their count vectors, in order) means a rebuild."""
    if precision not in PRECISIONS:
        raise DitmergeError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    blob = json.dumps({"graph": graph_sha256, "precision": precision, "tensorrt": trt_version, "gpu": gpu,
                       "strip": strip, "strongly_typed": strongly_typed, "batch": list(batch),
                       "text": list(TEXT_PROFILE),
                       "profiles": [dict(sorted(p.items())) for p in (profiles or [{}])]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_engine(onnx_path: Path, engine_path: Path, precision: str = "fp16", timing_cache: Path | None = None,
                 batch: tuple[int, int, int] = (1, 2, 8), strip: bool = True, workspace_gb: float = 8.0,
                 opt_level: int | None = None, profiles: list[dict[str, int]] | None = None,
                 strongly_typed: bool = False) -> dict:
    """Parse ``onnx_path`` (path-based: external weights resolve beside it) and write a serialized engine.

    Args:
        onnx_path: the graph (one engine serves every bucket that shares it).
        engine_path: where the engine goes (written atomically).
        precision: fp32, fp16 or bf16.
        timing_cache: a timing cache file shared by the plan's builds (read, then updated).
        batch: (min, opt, max) batch of every optimization profile.
        strip: build a weight-stripped, refittable engine.
        workspace_gb: builder workspace limit.
        opt_level: TensorRT's builder optimization level (0-5; None: TensorRT's default, 3); lower builds faster.
        profiles: one count vector ({key: value}) per optimization profile, in profile order; each count
            input gets min = opt = max = (value,). None: one profile, for a graph without count inputs.
        strongly_typed: a strongly typed network (types from the graph; no FP16/BF16 flags, no hints).

    Returns:
        what TensorRT reports of the built engine (:func:`runtime.trt_runner.engine_memory`).
    """
    import onnx
    import tensorrt as trt

    model = onnx.load(onnx_path, load_external_data=False)
    takes = count_inputs(model.graph)
    profiles = [dict(p) for p in profiles] if profiles else ([] if takes else [{}])
    assert_tensorrt_ready(model, str(onnx_path.name), profiles)  # every profile's TopK K, counts as shape tensors
    if strongly_typed:
        _check_graph_precision(model, precision, onnx_path.name)
    log = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(log)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
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
    elif precision in ("fp16", "bf16") and not strongly_typed:  # strongly typed: the graph's types decide
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
    for counts in profiles:
        config.add_optimization_profile(_profile(builder, network, counts, batch))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DitmergeError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    blob = bytes(serialized)
    _write_atomic(engine_path, blob)
    if timing_cache:
        _write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(log).deserialize_cuda_engine(blob)  # a stripped engine deserializes without its weights
    report = engine_memory(engine, trt) if engine is not None else {}
    logger.info("%s: %d profile(s), %s", engine_path.name, len(profiles), report)
    return report


def _profile(builder, network, counts: dict[str, int], batch: tuple[int, int, int]):
    """One optimization profile: count inputs fixed to their lengths, batch and prompt axes as ranges."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if is_count_input(t.name):
            n = int(counts[count_key(t.name)])
            profile.set_shape(t.name, (n,), (n,), (n,))  # a count is static within its profile
        elif -1 in shape:
            # the batch (axis 0 of batched inputs) and the prompt length (any other dynamic axis, e.g. txt_ids'
            # axis 0): min / opt / max from ``batch`` and TEXT_PROFILE
            batched = shape[0] == -1 and t.name != "txt_ids"
            lo, opt, hi = ([(b if batched and a == 0 else txt) if d == -1 else d for a, d in enumerate(shape)]
                           for b, txt in zip(batch, TEXT_PROFILE))
            profile.set_shape(t.name, lo, opt, hi)
    return profile


_FLOAT_NAMES = {1: "fp32", 10: "fp16", 16: "bf16"}  # onnx TensorProto FLOAT, FLOAT16, BFLOAT16


def _check_graph_precision(model, precision: str, name: str) -> None:
    """A strongly typed engine runs in the graph's own types: refuse a precision the graph is not in."""
    types = {_FLOAT_NAMES.get(vi.type.tensor_type.elem_type) for vi in model.graph.input} - {None}
    if types and precision not in types:
        raise DitmergeError(f"{name} is a {'/'.join(sorted(types))} graph; a strongly typed build takes its types "
                            f"from the graph, so it cannot make a {precision} engine: build without strongly_typed "
                            f"(precision flags) or export the graph in {precision}")


def graph_profiles(plan_dir: Path, manifest: dict) -> dict[str, list[dict[str, int]]]:
    """Graph file -> its engine's optimization profiles: the distinct count vectors of the buckets using it.

    A bucket's vector is its ``counts`` restricted to the count inputs that graph takes (a graph without
    count inputs gets one profile, ``{}``). Sorted, so the profile order (and the engine key) does not
    depend on the order of the buckets.
    """
    import onnx

    from passes.branch import VARIANT_COUNT, branch_info
    from runtime.branches import branch_of

    takes: dict[str, set[str]] = {}
    branches: dict[str, dict | None] = {}
    vectors: dict[str, set[tuple]] = {}
    for b in manifest["buckets"]:
        uses = {(v, f["file"]) for v, f in b.get("graphs", {}).items()} or {("main", b["graph"])}
        for variant, g in sorted(uses):
            if g not in takes:
                model = onnx.load(plan_dir / g, load_external_data=False)
                takes[g] = set(count_inputs(model.graph).values())
                branches[g] = branch_info(model)
            counts = dict(b.get("counts") or {})
            if branches[g]:  # a branched graph (passes/branch.py): each variant is a profile of its own
                counts[VARIANT_COUNT] = branches[g]["variants"][branch_of(b.get("method_meta") or {}, variant)]["index"]
            missing = sorted(takes[g] - set(counts))
            if missing:
                raise DitmergeError(f"bucket {b.get('index')} uses {g}, which takes counts {', '.join(missing)} that "
                                    "the bucket does not record; rebuild the plan with `python -m export`")
            vectors.setdefault(g, set()).add(tuple(sorted((k, int(counts[k])) for k in takes[g])))
    return {g: [dict(v) for v in sorted(vs)] for g, vs in vectors.items()}


def check_plan_profiles(plan_dir: Path, manifest: dict) -> dict[str, list[str]]:
    """The per-engine static check of a plan, on CPU: graph file -> what TensorRT would refuse in its engine
    (:func:`passes.trt_check.check_tensorrt` and, per profile of :func:`graph_profiles`,
    :func:`passes.trt_profiles.check_count_profiles`); an empty list where the engine would build."""
    import onnx

    from passes.trt_check import check_tensorrt
    from passes.trt_profiles import check_count_profiles

    out = {}
    for graph, profiles in graph_profiles(plan_dir, manifest).items():
        model = onnx.load(plan_dir / graph, load_external_data=False)
        found = check_tensorrt(model) + (check_count_profiles(model, profiles) if count_inputs(model.graph) else [])
        out[graph] = [str(v) for v in dict.fromkeys(found)]
    return out


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
                       progress: bool = True, opt_level: int | None = None, strongly_typed: bool = False) -> dict:
    """Build (or reuse from cache) one engine per distinct graph file of a plan; returns the engines table.

    The table is keyed by graph file; each record holds the engine file, its key and build settings,
    ``profiles`` (``profiles[i]`` is the count vector of optimization profile ``i``, see
    :func:`graph_profiles`) and ``memory`` (what TensorRT reports of the engine). ``reuse_from`` is the
    previous plan directory: engines whose key matches and its timing cache are copied over instead of rebuilt.
    """
    import shutil

    import tensorrt as trt
    from tqdm.auto import tqdm

    from runtime.plan import sha256_file

    require_tensorrt()
    gpu = gpu_name()
    if reuse_from and (reuse_from / TIMING_CACHE).exists() and not (plan_dir / TIMING_CACHE).exists():
        shutil.copy2(reuse_from / TIMING_CACHE, plan_dir / TIMING_CACHE)
    graphs = {b["graph"]: b["sha256"] for b in manifest["buckets"]}
    for b in manifest["buckets"]:
        graphs.update({v["file"]: v["sha256"] for v in b.get("graphs", {}).values()})
    profiles = graph_profiles(plan_dir, manifest)
    previous = (manifest.get("engines") or {}) if isinstance(manifest.get("engines"), dict) else {}
    engines = {}
    for graph, digest in tqdm(graphs.items(), desc="TensorRT engines", disable=not progress, leave=False):
        key = engine_key(digest, precision, trt.__version__, gpu, strip, profiles[graph], strongly_typed, batch)
        name = f"{Path(graph).stem}.{precision}.{key}.engine"
        path = plan_dir / name
        if not path.exists() and reuse_from and (reuse_from / name).exists():
            shutil.copy2(reuse_from / name, path)
        memory = (previous.get(graph) or {}).get("memory") if (previous.get(graph) or {}).get("key") == key else None
        if path.exists():
            logger.info("engine %s is cached (key %s)", name, key)
            if memory is None:
                memory = _read_memory(path)
        else:
            logger.info("building %s (%s, %d profiles) ...", name, precision, len(profiles[graph]))
            memory = build_engine(plan_dir / graph, path, precision, plan_dir / TIMING_CACHE, batch, strip,
                                  opt_level=opt_level, profiles=profiles[graph], strongly_typed=strongly_typed)
        engines[graph] = {"file": name, "sha256": sha256_file(path), "key": key, "precision": precision,
                          "tensorrt": trt.__version__, "gpu": gpu, "strip": strip, "strongly_typed": strongly_typed,
                          "batch": list(batch), "text": list(TEXT_PROFILE), "profiles": profiles[graph],
                          "memory": memory or {}}
    return engines


def _read_memory(path: Path) -> dict:
    """What TensorRT reports of a cached engine (deserialized without refitting: no weights are loaded)."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    return engine_memory(engine, trt) if engine is not None else {}
