"""The TensorRT runner: one deserialized engine per bucket, torch CUDA tensors in and out, one stream."""

from __future__ import annotations

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
    """Runs one serialized engine; refits a weight-stripped engine from its ONNX graph when it loads."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, onnx_path: Path, strip: bool = True) -> None:
        super().__init__()
        self.engine_path, self.onnx_path, self.strip = engine_path, onnx_path, strip
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
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.input_meta = {n: tuple(self.engine.get_tensor_shape(n)) for n in self.inputs}
        self._dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def deactivate_impl(self) -> None:
        del self.context, self.engine
        self._torch.cuda.empty_cache()

    def infer_impl(self, feed: dict) -> dict[str, np.ndarray]:
        return {k: v.cpu().numpy() for k, v in self.infer_torch(feed).items()}

    def infer_torch(self, feed: dict) -> dict:
        """Inputs as numpy or torch tensors; outputs as torch CUDA tensors (no host round trip)."""
        torch = self._torch
        with self._lock, torch.cuda.stream(self.stream):
            keep = []
            for name in self.inputs:
                t = torch.as_tensor(feed[name]).to("cuda", self._dtypes[name], non_blocking=True).contiguous()
                keep.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.outputs:
                out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._dtypes[name], device="cuda")
                self.context.set_tensor_address(name, out.data_ptr())
                outs[name] = out
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of {self.engine_path.name} failed")
            self.stream.synchronize()
            return outs


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
    return table[dtype]
