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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from passes.errors import DitmergeError
from runtime.ort_optimize import disabled_optimizers, session_graph

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
    """One onnxruntime session over one graph file, created on first use.

    ``spinning`` lets idle intra-op threads spin for work instead of sleeping: faster where one session runs
    at a time, but the spinning threads of idle sessions steal the cores of a busy one. ``optimize``: CPU
    sessions run the graph's onnxruntime-only copy, ``session_path`` (:mod:`runtime.ort_optimize`).
    """

    name = "onnxruntime"

    def __init__(self, graph_path: Path, providers: list[str], weights: SharedWeights | None = None,
                 threads: int = 0, prepack: bool = True, spinning: bool = False, optimize: bool = False) -> None:
        super().__init__()
        self.graph_path, self.providers, self.weights, self.threads = graph_path, providers, weights, threads
        self.prepack, self.spinning, self.optimize, self.session_path = prepack, spinning, optimize, graph_path
        self.session = None
        self._lock = threading.Lock()

    def activate_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if not self.prepack:
            # Prepacked MatMul weights are a private copy per session: a plan of N bucket sessions would hold
            # the weights N + 1 times. Without prepacking every session reads the one shared weights file.
            opts.add_session_config_entry("session.disable_prepacking", "1")
        self.session_path = session_graph(self.graph_path, self.providers, self.optimize)
        self._keep = {}
        if self.weights is not None:
            self._keep = self.weights.initializers(onnx.load(self.session_path, load_external_data=False))
            for name, value in self._keep.items():
                opts.add_initializer(name, value)
        self.session = ort.InferenceSession(str(self.session_path), opts, providers=self.providers,
                                            disabled_optimizers=disabled_optimizers(self.providers))
        self.input_meta = {i.name: i for i in self.session.get_inputs()}
        self._output_names = [o.name for o in self.session.get_outputs()]
        logger.debug("created %s session for %s (spinning %s)", self.providers[0], self.session_path.name, self.spinning)

    def activate(self) -> None:
        if self.is_active:  # set only once the session exists
            return
        with self._lock:  # one session per runner, even when threads race to create it
            super().activate()

    def deactivate_impl(self) -> None:
        self.session = None
        self._keep = {}

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(self._output_names, self.session.run(self._output_names, feed)))
        except Exception as e:  # the copy's fused node refused shapes its probes did not foresee: plain graph
            if self.session_path == self.graph_path:
                raise
            logger.warning("onnxruntime copy of %s failed (%s): plain graph", self.graph_path.name, e)
            with self._lock:
                self.optimize = False
                self.activate_impl()
            return self.infer_impl(feed)


def to_numpy(x) -> np.ndarray:
    """A numpy view of ``x``: a CPU tensor without a copy, a device tensor through one host copy."""
    import torch

    if isinstance(x, torch.Tensor):
        try:
            return x.numpy()  # a CPU tensor without autograd: shares its memory
        except (RuntimeError, TypeError):  # needs grad, or lives on a device
            return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_torch(x):
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach()


def _kind(dtype) -> str:
    """numpy's dtype kind ("b", "i", "u", "f", "c", ...) of a numpy or a torch dtype."""
    if isinstance(dtype, np.dtype):
        return dtype.kind
    import torch

    if dtype == torch.bool:
        return "b"
    if dtype.is_complex:
        return "c"
    if dtype.is_floating_point:
        return "f"
    return "u" if torch.iinfo(dtype).min == 0 else "i"


def _integral(x) -> bool:
    """Every value of ``x`` is a whole number (a float fed to an int input loses nothing)."""
    if isinstance(x, np.ndarray):
        return bool(np.all(x == np.round(x)))
    import torch

    return bool(torch.all(x == torch.round(x)))


_TORCH_DTYPES: dict[np.dtype, object] = {}


def _same_dtype(dtype, want: np.dtype) -> bool:
    """``dtype`` (numpy or torch) is the graph's ``want``."""
    if isinstance(dtype, np.dtype):
        return dtype == want
    if want not in _TORCH_DTYPES:
        import torch

        _TORCH_DTYPES[want] = torch.from_numpy(np.zeros(0, want)).dtype
    return dtype == _TORCH_DTYPES[want]


def _dim_word(exp: str, axis: int) -> str:
    """How an error names a dynamic dim: the batch (a dim named so, or any leading dim but the prompt's)."""
    return "batch" if exp == "batch" or (axis == 0 and exp != "text") else f"{exp} length"


# what one input needs once its shape and dtype passed the checks:
# (name, from_extra, to_1d, want, cast, check_integral, broadcast_to)
_Step = tuple


class InputCheck:
    """The input checks of one graph, for numpy feeds (onnxruntime) and torch feeds (device runners) alike.

    Checks names, ranks, static dims, dynamic dims by name (``batch``, ``text``: every input that has one
    agrees on its size) and dtypes (lossless casts only: a float with a fraction is refused for an int
    input); a 0-d or length-1 ``timestep`` is broadcast to the batch. What the shape and dtype checks decide
    depends only on the inputs' shapes and dtypes, so each validated signature is kept, and a later call
    with the same signature goes straight to the per-value work (the whole-number check of a float fed to an
    int input, casts, broadcasts). A call with any other signature is checked in full.

    Args:
        inputs: name -> (numpy dtype, dims with str for dynamic axes), as ``runtime.transformer.graph_inputs``
            reads them.
        hint: name -> text appended to a static-dim error (how to rebuild the plan for that shape).
    """

    MAX_SIGNATURES = 64

    def __init__(self, inputs: dict[str, tuple[np.dtype, list]], hint: Callable[[str], str] | None = None) -> None:
        self.inputs = inputs
        self.hint = hint
        self._known: dict[tuple, tuple[_Step, ...]] = {}

    def feed(self, values: dict[str, object], extra: dict[str, object] | None = None,
             device_io: bool = False) -> dict:
        """The checked feed. ``extra`` (the policy's inputs: partitions, caches, counts) passes through as it is.

        numpy (``device_io`` False): arrays in the graph's dtypes, for onnxruntime (which copies what is not
        C-contiguous); a CPU tensor becomes an array without a copy. torch (``device_io`` True): tensors left
        on their device and in their dtype (the runner casts and moves them, one copy at most).
        """
        extra = extra or {}
        convert = _to_torch if device_io else to_numpy
        arrays: dict[str, object] = {}
        signature: list = [device_io]
        for name in self.inputs:
            if name in extra:
                signature.append(None)
                continue
            value = values.get(name)
            if value is None:
                signature = None  # _check names the missing input
                break
            arr = arrays[name] = convert(value)
            signature.append((arr.dtype, tuple(arr.shape)))
        key = tuple(signature) if signature is not None else None
        steps = self._known.get(key) if key is not None else None
        if steps is None:
            steps = self._check(arrays, extra, device_io)  # raises unless every input fits
            if len(self._known) >= self.MAX_SIGNATURES:
                self._known.clear()
            self._known[key] = steps
        return self._apply(steps, arrays, extra, device_io)

    def _check(self, arrays: dict, extra: dict, device_io: bool) -> tuple[_Step, ...]:
        """The full checks, input by input in the graph's order; raises on the first input that does not fit."""
        steps = []
        bound: dict[str, tuple[int, str]] = {}  # dynamic dim name -> (size, the input that set it)
        for name, (want, shape) in self.inputs.items():
            if name in extra:
                steps.append((name, True, False, want, False, False, None))
                continue
            arr = arrays.get(name)
            if arr is None:
                raise DitmergeError(f"the plan's graph needs input {name!r} {shape}, which the call did not give")
            dims = list(arr.shape)
            to_1d = name == "timestep" and len(dims) == 0
            if to_1d:
                dims = [1]
            cast = check_integral = False
            if not _same_dtype(arr.dtype, want):
                kind = _kind(arr.dtype)
                check_integral = want.kind in "iu" and kind == "f"
                if kind not in "biuf" or (check_integral and not _integral(arr)):
                    raise DitmergeError(f"input {name!r} has dtype {arr.dtype}; the graph takes {want}")
                cast = not device_io
            if len(dims) != len(shape):
                raise DitmergeError(f"input {name!r} has shape {dims}; the graph takes {shape}")
            broadcast = None
            for axis, (got, exp) in enumerate(zip(dims, shape)):
                if isinstance(exp, int) and got != exp:
                    hint = self.hint(name) if self.hint is not None else ""
                    raise DitmergeError(f"input {name!r} has shape {dims}; the graph takes {shape} "
                                        f"(axis {axis} must be {exp}){hint}")
                if not isinstance(exp, str):
                    continue
                if name == "timestep" and axis == 0 and got == 1 and bound.get(exp, (1,))[0] != 1:
                    broadcast = got = bound[exp][0]
                if exp not in bound:
                    bound[exp] = (got, name)
                elif got != bound[exp][0]:
                    what = _dim_word(exp, axis)
                    raise DitmergeError(f"input {name!r} has {what} {got}, other inputs have {what} {bound[exp][0]} "
                                        f"({bound[exp][1]!r})")
            steps.append((name, False, to_1d, want, cast, check_integral, broadcast))
        return tuple(steps)

    @staticmethod
    def _apply(steps: tuple[_Step, ...], arrays: dict, extra: dict, device_io: bool) -> dict:
        """The per-call work of validated inputs: whole-number checks of floats fed to ints, casts, broadcasts."""
        feed: dict = {}
        for name, from_extra, to_1d, want, cast, check_integral, broadcast in steps:
            if from_extra:
                value = extra[name]
                if device_io:
                    feed[name] = _to_torch(value)
                else:
                    feed[name] = value if isinstance(value, np.ndarray) else to_numpy(value)
                continue
            arr = arrays[name]
            if to_1d:
                arr = arr.reshape(1)
            if check_integral and not _integral(arr):
                raise DitmergeError(f"input {name!r} has dtype {arr.dtype}; the graph takes {want}")
            if device_io:
                feed[name] = arr.expand(broadcast) if broadcast is not None else arr
                continue
            if cast:
                arr = arr.astype(want)
            # onnxruntime copies a non-contiguous array itself: no np.ascontiguousarray (each numpy call is
            # dear right after a forward, when the caches are cold)
            feed[name] = np.broadcast_to(arr, (broadcast,)) if broadcast is not None else arr
        return feed


def torch_feed(inputs: dict[str, tuple[np.dtype, list]], values: dict[str, object],
               extra: dict[str, object] | None = None) -> dict:
    """The feed of a device runner: graph inputs as torch tensors, left on the device they are on.

    :class:`InputCheck` on tensors, without a host copy: a CUDA tensor stays a CUDA tensor. ``extra`` (the
    policy's inputs: partitions, caches, counters) passes through as it is.
    """
    return InputCheck(inputs).feed(values, extra, device_io=True)
