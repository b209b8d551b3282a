"""One runner interface for every backend: ``activate()`` / ``infer(feed)`` / ``deactivate()``.

Modelled on Polygraphy's runners: subclasses override the ``*_impl`` hooks, the base class keeps the
lifecycle honest. ``infer`` (also ``runner(feed)``) is the one way to run a graph: it activates on first
use, for every backend, so nothing can reach an engine or a session that was never created. Sessions
are created on first use.

Where the data lives is the runner's ``device_io``: onnxruntime runners take and return numpy arrays;
device runners (TensorRT) take torch tensors wherever they are and return torch CUDA tensors, so
inputs, outputs and method state (caches, cached indices) stay on the GPU between steps.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnx

from passes.errors import DitmergeError

logger = logging.getLogger(__name__)


class Runner:
    name = "runner"
    device_io = False  # True: feeds and outputs are torch tensors on the device (see the module docstring)

    def __init__(self) -> None:
        self.is_active = False

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, feed: dict) -> dict:
        """Run the graph on ``feed``; activates the runner first if it is not active yet."""
        self.activate()
        return self.infer_impl(feed)

    __call__ = infer

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feed: dict) -> dict:
        raise NotImplementedError


ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}


def ort_providers(backend: str) -> list[str]:
    """onnxruntime providers for ``backend`` ("auto", "cpu", "cuda", "ort-trt")."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if backend == "auto":
        # CUDA only where a device answers: onnxruntime-gpu lists it even on machines without a GPU
        return (["CUDAExecutionProvider"] if _gpu_visible() and "CUDAExecutionProvider" in available else []) + [
            "CPUExecutionProvider"]
    if backend not in ORT_PROVIDERS:
        raise DitmergeError(f"unknown backend {backend!r}; choose from auto, {', '.join(ORT_PROVIDERS)}")
    provider = ORT_PROVIDERS[backend]
    if backend in ("cuda", "ort-trt") and not _gpu_visible():
        raise DitmergeError(f"backend {backend!r} needs a CUDA GPU, and none is visible; use backend 'cpu' or 'auto'")
    if provider not in available:
        raise DitmergeError(f"backend {backend!r} needs onnxruntime's {provider}, but this onnxruntime offers "
                            f"{', '.join(available)}")
    return [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [provider]


def _gpu_visible() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


class SharedWeights:
    """The plan's weights file, memory-mapped once; every session reads its initializers from it.

    onnxruntime takes them through ``SessionOptions.add_initializer`` without copying, so N bucket
    sessions hold one copy of the weights, not N.
    """

    def __init__(self, weights_path: Path) -> None:
        self.path = weights_path
        self._map = np.memmap(weights_path, dtype=np.uint8, mode="r") if weights_path.stat().st_size else None
        self._values: dict[str, object] = {}
        self._lock = threading.Lock()

    def initializers(self, model: onnx.ModelProto) -> dict[str, object]:
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype

        out = {}
        with self._lock:
            for init in model.graph.initializer:
                if init.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in init.external_data}
                if Path(info["location"]).name != self.path.name:
                    continue
                if init.name not in self._values:
                    offset, length = int(info.get("offset", 0)), int(info["length"])
                    dtype = tensor_dtype_to_np_dtype(init.data_type)
                    arr = np.frombuffer(self._map, dtype=dtype, count=length // dtype.itemsize, offset=offset)
                    self._values[init.name] = ort.OrtValue.ortvalue_from_numpy(arr.reshape(tuple(init.dims)))
                out[init.name] = self._values[init.name]
        return out


class OrtRunner(Runner):
    """One onnxruntime session over one graph file, created on first use."""

    name = "onnxruntime"

    def __init__(self, graph_path: Path, providers: list[str], weights: SharedWeights | None = None,
                 threads: int = 0, prepack: bool = True) -> None:
        super().__init__()
        self.graph_path, self.providers, self.weights, self.threads = graph_path, providers, weights, threads
        self.prepack = prepack
        self.session = None
        self._lock = threading.Lock()

    def activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # A plan holds one session per bucket; spinning intra-op threads of idle sessions would steal the
        # cores of the busy one, so threads sleep when they have no work.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not self.prepack:
            # Prepacked MatMul weights are a private copy per session: a plan of N bucket sessions would hold
            # the weights N + 1 times. Without prepacking every session reads the one shared weights file.
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self._keep = {}
        if self.weights is not None:
            proto = onnx.load(self.graph_path, load_external_data=False)
            self._keep = self.weights.initializers(proto)
            for name, value in self._keep.items():
                opts.add_initializer(name, value)
        self.session = ort.InferenceSession(str(self.graph_path), opts, providers=self.providers)
        self.input_meta = {i.name: i for i in self.session.get_inputs()}
        logger.debug("created %s session for %s", self.providers[0], self.graph_path.name)

    def activate(self) -> None:
        with self._lock:  # one session per runner, even when threads race to create it
            super().activate()

    def deactivate_impl(self) -> None:
        self.session = None
        self._keep = {}

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(None, feed)
        return {o.name: v for o, v in zip(self.session.get_outputs(), outputs)}


def torch_feed(inputs: dict[str, tuple[np.dtype, list]], values: dict[str, object],
               extra: dict[str, object] | None = None) -> dict:
    """The feed of a device runner: graph inputs as torch tensors, left on the device they are on.

    The checks of ``PlanTransformer._feed`` (names, ranks, static dims, one batch, lossless dtypes) on
    tensors, without a host copy: a CUDA tensor stays a CUDA tensor. ``extra`` (the policy's inputs:
    partitions, caches, counters) passes through as it is.
    """
    import torch

    extra = extra or {}
    feed: dict = {}
    batch = None
    for name, (want, shape) in inputs.items():
        if name in extra:
            feed[name] = torch.as_tensor(extra[name])
            continue
        value = values.get(name)
        if value is None:
            raise DitmergeError(f"the plan's graph needs input {name!r} {shape}, which the call did not give")
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        t = t.detach()
        if name == "timestep" and t.ndim == 0:
            t = t.reshape(1)
        want_t = torch.from_numpy(np.zeros(0, want)).dtype
        if t.dtype != want_t:
            if t.dtype.is_complex or (not want_t.is_floating_point and t.dtype.is_floating_point
                                      and not bool(torch.all(t == torch.round(t)))):
                raise DitmergeError(f"input {name!r} has dtype {t.dtype}; the graph takes {want}")
        if t.ndim != len(shape):
            raise DitmergeError(f"input {name!r} has shape {list(t.shape)}; the graph takes {shape}")
        for axis, (got, exp) in enumerate(zip(t.shape, shape)):
            if isinstance(exp, int) and got != exp:
                raise DitmergeError(f"input {name!r} has shape {list(t.shape)}; the graph takes {shape} "
                                    f"(axis {axis} must be {exp})")
            if axis == 0 and isinstance(exp, str):
                if name == "timestep" and batch is not None and got == 1 and batch != 1:
                    t = t.expand(batch)
                    got = batch
                if batch is None:
                    batch = got
                elif got != batch:
                    raise DitmergeError(f"input {name!r} has batch {got}, other inputs have batch {batch}")
        feed[name] = t  # the runner casts and moves it (on the device, one copy at most)
    return feed
