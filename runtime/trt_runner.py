"""The TensorRT runner: one deserialized engine per bucket, torch CUDA tensors in and out, one stream."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

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


class TrtRunner(Runner):
    """Runs one serialized engine; refits a weight-stripped engine from its ONNX graph when it loads.

    A device runner: :meth:`infer` takes torch tensors (or numpy arrays) and returns torch tensors on
    ``device``. A tensor already there in the engine's dtype is bound as it is (no copy); outputs are
    fresh device tensors, ordered after the engine on the caller's stream, so a step's method state
    feeds the next step without leaving the GPU.
    """

    name = "tensorrt"
    device_io = True

    def __init__(self, engine_path: Path, onnx_path: Path, strip: bool = True, device: str = "cuda") -> None:
        super().__init__()
        self.engine_path, self.onnx_path, self.strip = engine_path, onnx_path, strip
        self.device = device
        self._lock = threading.Lock()

    def activate_impl(self) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        log = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(log).deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise DitmergeError(f"{self.engine_path.name} does not deserialize with this TensorRT / GPU; rebuild it")
        if self.strip:
            refitter = trt.Refitter(self.engine, log)
            if not trt.OnnxParserRefitter(refitter, log).refit_from_file(str(self.onnx_path)) or not refitter.refit_cuda_engine():
                raise DitmergeError(f"could not refit {self.engine_path.name} from {self.onnx_path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream() if torch.device(self.device).type == "cuda" else None
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.input_meta = {n: tuple(self.engine.get_tensor_shape(n)) for n in self.inputs}
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        logger.debug("activated engine %s (%d inputs, %d outputs)", self.engine_path.name, len(self.inputs),
                     len(self.outputs))

    def deactivate_impl(self) -> None:
        del self.context, self.engine
        if self.stream is not None:
            self._torch.cuda.empty_cache()

    def infer_impl(self, feed: dict) -> dict:
        """Inputs as torch tensors (any device) or numpy arrays; outputs as torch tensors on ``self.device``."""
        torch = self._torch
        caller = torch.cuda.current_stream() if self.stream is not None else None
        with self._lock, (torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()):
            if self.stream is not None:
                self.stream.wait_stream(caller)  # inputs written on the caller's stream are ready
            keep = []
            for name in self.inputs:
                value = feed[name]
                t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(value))
                t = t.to(self.device, self._dtypes[name], non_blocking=True).contiguous()  # no-op when already there
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs:
                out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outs[name] = out
            handle = self.stream.cuda_stream if self.stream is not None else 0
            if not self.context.execute_async_v3(handle):
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
