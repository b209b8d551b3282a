"""The TensorRT runner: one deserialized engine per graph file, one execution context per optimization
profile over one shared activation buffer, torch CUDA tensors in and out, one stream."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

from passes.counts import count_key, is_count_input
from passes.errors import DitmergeError
from passes.trt_check import TENSORRT_MIN_VERSION
from runtime.runners import Runner

logger = logging.getLogger(__name__)


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:2] if x.isdigit())


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): tensorrt importable, recent enough, and a CUDA GPU visible."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'ditmerge[trt]')"
    if _version_tuple(trt.__version__) < _version_tuple(TENSORRT_MIN_VERSION):
        return False, f"tensorrt {trt.__version__} is older than the supported {TENSORRT_MIN_VERSION}"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch"
    except ImportError:
        return False, "torch is not installed"
    return True, ""


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"


def engine_memory(engine, trt) -> dict:
    """What TensorRT reports of an engine's device memory: its weights (the ``EngineStat`` figures, where
    this TensorRT has them) and the activation buffer of each optimization profile. ``activation_bytes``
    is the largest: the one buffer that every context of the runner shares."""
    n = max(1, int(getattr(engine, "num_optimization_profiles", 1)))
    per_profile = [int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(n)]
    out = {"profiles": n, "profile_activation_bytes": per_profile,
           "activation_bytes": max(per_profile + [int(getattr(engine, "device_memory_size_v2", 0))])}
    stat = getattr(trt, "EngineStat", None)
    for key, name in (("weights_bytes", "TOTAL_WEIGHTS_SIZE"), ("stripped_weights_bytes", "STRIPPED_WEIGHTS_SIZE")):
        try:
            out[key] = int(engine.get_engine_stat(getattr(stat, name)))
        except Exception:  # noqa: BLE001 - a TensorRT without engine stats: the figure is left out, not guessed
            pass
    return out


DEFAULT_DEVICE = "cuda"  # where runners put their outputs unless told otherwise (CPU tests set "cpu")


class TrtRunner(Runner):
    """Runs one serialized engine (every bucket of its graph); refits a weight-stripped engine once, on load.

    The engine has one optimization profile per count vector of the buckets that share its graph. The
    runner creates one execution context per profile with ``USER_MANAGED`` device memory, all over ONE
    buffer sized to the largest profile: the contexts run one at a time (under the runner's lock, on one
    stream), so they never use the buffer together. :meth:`infer` picks the profile whose count dims
    equal the lengths of the fed count inputs.

    A device runner: :meth:`infer` takes torch tensors (or numpy arrays) and returns torch tensors on
    ``device``. A tensor already there in the engine's dtype is bound as it is (no copy); outputs are
    fresh device tensors, ordered after the engine on the caller's stream, so a step's method state
    feeds the next step without leaving the GPU. Count inputs are never copied: the engine reads only
    their shape, so they are bound to one zeroed device buffer (valid and non-null even at length 0).
    """

    name = "tensorrt"
    device_io = True

    def __init__(self, engine_path: Path, onnx_path: Path, strip: bool = True, device: str | None = None,
                 profiles: list[dict[str, int]] | None = None) -> None:
        super().__init__()
        self.engine_path, self.onnx_path, self.strip = engine_path, onnx_path, strip
        self.device = device or DEFAULT_DEVICE
        self.expected_profiles = profiles  # from the plan's engines table: checked against the engine's
        self._lock = threading.Lock()

    def activate_impl(self) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        log = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(log).deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise DitmergeError(f"{self.engine_path.name} does not deserialize with this TensorRT / GPU; rebuild it")
        if self.strip:  # once per engine: every profile shares the refitted weights
            refitter = trt.Refitter(self.engine, log)
            if not trt.OnnxParserRefitter(refitter, log).refit_from_file(str(self.onnx_path)) or not refitter.refit_cuda_engine():
                raise DitmergeError(f"could not refit {self.engine_path.name} from {self.onnx_path.name}")
        self.stream = torch.cuda.Stream() if torch.device(self.device).type == "cuda" else None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.input_meta = {n: tuple(self.engine.get_tensor_shape(n)) for n in self.inputs}
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.count_inputs = [n for n in self.inputs if is_count_input(n)]
        self.profiles = self._engine_profiles()
        if self.expected_profiles is not None and [dict(p) for p in self.expected_profiles] != self.profiles:
            raise DitmergeError(f"{self.engine_path.name} has profiles {self.profiles}, the plan records "
                                f"{self.expected_profiles}: the engine is stale, rebuild with --backend trt")
        self.memory = engine_memory(self.engine, trt)
        size = self.memory["activation_bytes"]
        self._activations = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        handle = self.stream.cuda_stream if self.stream is not None else 0
        self.contexts = []
        for i in range(len(self.profiles)):
            ctx = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise DitmergeError(f"TensorRT could not create an execution context for {self.engine_path.name}")
            if not ctx.set_optimization_profile_async(i, handle):
                raise DitmergeError(f"TensorRT could not select profile {i} of {self.engine_path.name}")
            ctx.set_device_memory(self._activations.data_ptr(), size)
            self.contexts.append(ctx)
        if self.stream is not None:
            self.stream.synchronize()
        longest = max([1] + [v for p in self.profiles for v in p.values()])
        dtype = self._dtypes[self.count_inputs[0]] if self.count_inputs else torch.int64
        self._zeros = torch.zeros(longest, dtype=dtype, device=self.device)  # what count inputs are bound to
        logger.debug("activated engine %s: %d inputs, %d outputs, %d profiles over one %d-byte buffer",
                     self.engine_path.name, len(self.inputs), len(self.outputs), len(self.profiles), size)

    def _engine_profiles(self) -> list[dict[str, int]]:
        """The count vector of each optimization profile, read from the engine (min = max per count input)."""
        n = max(1, int(getattr(self.engine, "num_optimization_profiles", 1)))
        out = []
        for i in range(n):
            counts = {}
            for name in self.count_inputs:
                lo, _, hi = self.engine.get_tensor_profile_shape(name, i)
                if tuple(lo) != tuple(hi) or len(tuple(lo)) != 1:
                    raise DitmergeError(f"{self.engine_path.name}: profile {i} gives count input {name} the range "
                                        f"{tuple(lo)}..{tuple(hi)}; counts must be fixed per profile: rebuild it")
                counts[count_key(name)] = int(tuple(lo)[0])
            out.append(counts)
        return out

    def profile_for(self, feed: dict) -> int:
        """The profile whose count dims equal the lengths of the fed count inputs."""
        if not self.count_inputs:
            return 0
        want = {}
        for name in self.count_inputs:
            if name not in feed:
                raise DitmergeError(f"{self.engine_path.name} needs count input {name!r}, which the call did not give")
            want[count_key(name)] = int(tuple(feed[name].shape)[0])
        for i, counts in enumerate(self.profiles):
            if counts == want:
                return i
        raise DitmergeError(f"{self.engine_path.name} has no optimization profile for counts {want}; its profiles "
                            f"are {self.profiles}: rebuild the engines (--backend trt) after changing the buckets")

    def _set_shape(self, context, name: str, shape: tuple[int, ...]) -> None:
        if context.set_input_shape(name, shape) is False:  # outside the profile's range (TensorRT logs which)
            raise DitmergeError(f"{self.engine_path.name}: input {name!r} of shape {list(shape)} is outside its "
                                f"optimization profile (see the TensorRT log); rebuild the engines for this shape")

    def deactivate_impl(self) -> None:
        del self.contexts, self.engine, self._activations, self._zeros
        if self.stream is not None:
            self._torch.cuda.empty_cache()

    def infer_impl(self, feed: dict) -> dict:
        """Inputs as torch tensors (any device) or numpy arrays; outputs as torch tensors on ``self.device``."""
        torch = self._torch
        caller = torch.cuda.current_stream() if self.stream is not None else None
        with self._lock, (torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()):
            context = self.contexts[self.profile_for(feed)]
            if self.stream is not None:
                self.stream.wait_stream(caller)  # inputs written on the caller's stream are ready
            keep = []
            for name in self.inputs:
                value = feed[name]
                if name in self.count_inputs:  # only its shape is read: bind the zeroed buffer, copy nothing
                    self._set_shape(context, name, tuple(value.shape))
                    context.set_tensor_address(name, self._zeros.data_ptr())
                    continue
                t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(value))
                t = t.to(self.device, self._dtypes[name], non_blocking=True).contiguous()  # no-op when already there
                keep.append(t)
                self._set_shape(context, name, tuple(t.shape))
                # an empty tensor has no storage (data_ptr 0): TensorRT needs a valid address all the same
                context.set_tensor_address(name, t.data_ptr() if t.numel() else self._zeros.data_ptr())
            outs = {}
            for name in self.outputs:
                out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self._dtypes[name], device=self.device)
                context.set_tensor_address(name, out.data_ptr() if out.numel() else self._zeros.data_ptr())
                outs[name] = out
            handle = self.stream.cuda_stream if self.stream is not None else 0
            if not context.execute_async_v3(handle):
                raise DitmergeError(f"TensorRT execution of {self.engine_path.name} failed (see the TensorRT log)")
        if self.stream is not None:
            caller.wait_stream(self.stream)  # the caller's later work sees the outputs, without a host sync
            for t in (*keep, *outs.values()):
                t.record_stream(self.stream)
                t.record_stream(caller)
        return outs


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    return table[dtype]
