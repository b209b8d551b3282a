"""A fake ``tensorrt`` module for CPU tests of the runner and the engine builder (the real one is not installed).

Runtime side: the engine has input ``x`` (and one count input ``ditmerge_count_<key>`` per key of its
profiles), outputs ``y = x`` and ``z = 2 * x``, written through the raw addresses the runner binds, so a test
sees exactly which buffers the runner handed to the engine. Like TensorRT, a context refuses an input shape
outside its profile, and refuses to run without device memory (USER_MANAGED) or with a null input address.

Builder side: ``Builder`` / ``OnnxParser`` read the graph's inputs from the ONNX file and record the
optimization profiles, flags and network flags of each build. An engine the fake builder wrote
deserializes as :class:`OrtEngine`: the graph itself, run by onnxruntime on the buffers the runner binds
(so a whole plan runs "on TensorRT" on a CPU, profiles and all).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import sys
import types

import numpy as np
import pytest

COUNT = "ditmerge_count_"
USER_MANAGED, STATIC = "user-managed", "static"


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.shapes, self.addresses, self.profile, self.memory = {}, {}, 0, None

    def set_optimization_profile_async(self, index, stream):
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        self.profile = index
        return True

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        if name.startswith(COUNT):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
            if not (tuple(lo) <= tuple(shape) <= tuple(hi)):
                return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def execute_async_v3(self, stream):
        need = self.engine.get_device_memory_size_for_profile_v2(self.profile)
        if self.strategy == USER_MANAGED and (self.memory is None or not self.memory[0] or self.memory[1] < need):
            return False
        if any(not self.addresses.get(n) for n in self.engine.inputs):
            return False  # TensorRT refuses a null address, even for an empty tensor
        n = int(np.prod(self.shapes["x"]))
        x = (ctypes.c_float * n).from_address(self.addresses["x"])
        ctypes.memmove(self.addresses["y"], self.addresses["x"], 4 * n)
        z = (ctypes.c_float * n).from_address(self.addresses["z"])
        for i in range(n):
            z[i] = 2 * x[i]
        self.engine.executed += 1
        self.engine.ran_profiles.append(self.profile)
        return True


class FakeEngine:
    def __init__(self, profiles: list[dict[str, int]]) -> None:
        self.profiles = profiles
        keys = sorted({k for p in profiles for k in p})
        self.inputs = ["x"] + [COUNT + k for k in keys]
        self.names = self.inputs + ["y", "z"]
        self.num_io_tensors = len(self.names)
        self.num_optimization_profiles = len(profiles)
        self.contexts: list[FakeContext] = []
        self.executed = 0
        self.ran_profiles: list[int] = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.inputs else "out"

    def get_tensor_shape(self, name):
        return (-1,) if name.startswith(COUNT) else (-1, 3)

    def get_tensor_dtype(self, name):
        return "i64" if name.startswith(COUNT) else "f32"

    def get_tensor_profile_shape(self, name, index):
        n = self.profiles[index][name[len(COUNT):]]
        return [(n,), (n,), (n,)]

    def get_device_memory_size_for_profile_v2(self, index):
        return 1000 * (index + 1)

    @property
    def device_memory_size_v2(self):
        return 1000 * self.num_optimization_profiles

    def create_execution_context(self, strategy=STATIC):
        self.contexts.append(FakeContext(self, strategy))
        return self.contexts[-1]


_NP = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "i64": np.int64, "b": np.bool_}
_TRT = {1: "f32", 10: "f16", 6: "i32", 7: "i64", 9: "b"}  # onnx TensorProto -> the fake's dtype names


class OrtContext(FakeContext):
    """Runs the engine's graph with onnxruntime on the bound input buffers; outputs go to the bound addresses."""

    def _array(self, name, dtype, shape):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if n == 0:
            return np.zeros(shape, dtype)
        raw = (ctypes.c_byte * n).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape)

    def _run(self):
        e = self.engine
        feed = {n: self._array(n, _NP[e.dtypes[n]], self.shapes[n]).copy() for n in e.inputs}
        self.results = dict(zip(e.outputs, e.session.run(e.outputs, feed)))

    def get_tensor_shape(self, name):
        self._run()  # inputs are bound before the runner asks for output shapes
        return self.results[name].shape

    def execute_async_v3(self, stream):
        need = self.engine.get_device_memory_size_for_profile_v2(self.profile)
        if self.memory is None or not self.memory[0] or self.memory[1] < need:
            return False
        if any(not self.addresses.get(n) for n in self.engine.inputs):
            return False
        self._run()
        for name, value in self.results.items():
            if value.size:
                ctypes.memmove(self.addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)
        self.engine.executed += 1
        self.engine.ran_profiles.append(self.profile)
        return True


class OrtEngine(FakeEngine):
    """An engine that is its ONNX graph (onnxruntime CPU), with the profiles it was built with."""

    def __init__(self, onnx_path: str, profiles: list[dict[str, int]]) -> None:
        import onnx
        import onnxruntime as ort

        super().__init__(profiles)
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        model = onnx.load(onnx_path, load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        ins = [vi for vi in model.graph.input if vi.name not in inits]
        self.inputs = [vi.name for vi in ins]
        self.outputs = [o.name for o in model.graph.output]
        self.names = self.inputs + self.outputs
        self.num_io_tensors = len(self.names)
        self.dtypes = {vi.name: _TRT[vi.type.tensor_type.elem_type] for vi in list(ins) + list(model.graph.output)}
        io = list(ins) + list(model.graph.output)
        dims = lambda vi: tuple(d.dim_value if d.HasField("dim_value") else -1  # noqa: E731
                                for d in vi.type.tensor_type.shape.dim)
        self.dims = {vi.name: dims(vi) for vi in io}

    def get_tensor_shape(self, name):
        return self.dims[name]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self, strategy=STATIC):
        self.contexts.append(OrtContext(self, strategy))
        return self.contexts[-1]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeTensor:
    def __init__(self, name, shape) -> None:
        self.name, self.shape = name, shape


class FakeNetwork:
    def __init__(self, flags) -> None:
        self.flags, self.inputs, self.num_layers, self.path = flags, [], 0, None

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


def _install(monkeypatch, state: dict) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1"
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # importlib.util.find_spec reads it (torch._dynamo)

    class Runtime:
        def __init__(self, log):
            pass

        def deserialize_cuda_engine(self, blob):
            state["deserialized"] += 1
            built = state["blobs"].get(bytes(blob))
            state["engine"] = OrtEngine(*built) if built else FakeEngine(state["profiles"])
            return state["engine"]

    class OnnxParser:
        def __init__(self, network, log):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            import onnx

            self.network.path = path
            model = onnx.load(path, load_external_data=False)
            inits = {i.name for i in model.graph.initializer}
            for vi in model.graph.input:
                if vi.name not in inits:
                    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                    self.network.inputs.append(FakeTensor(vi.name, dims))
            return True

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles, self.level = set(), [], None

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def create_timing_cache(self, blob):
            return blob

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"cache")

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Builder:
        def __init__(self, log):
            pass

        def create_network(self, flags):
            state["network"] = FakeNetwork(flags)
            return state["network"]

        def create_builder_config(self):
            state["config"] = Config()
            return state["config"]

        def create_optimization_profile(self):
            return FakeProfile()

        def build_serialized_network(self, network, config):
            state["builds"].append({"flags": set(config.flags), "network_flags": network.flags,
                                    "profiles": [p.shapes for p in config.profiles]})
            blob = b"engine:" + repr((network.path, state["builds"][-1]["profiles"])).encode()
            state["blobs"][blob] = (network.path, [{n[len(COUNT):]: s[0][0] for n, s in p.shapes.items()
                                                    if n.startswith(COUNT)} for p in config.profiles])
            return blob  # deserializes as the graph run by onnxruntime, with these profiles

    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime, trt.OnnxParser, trt.Builder = Runtime, OnnxParser, Builder
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED=USER_MANAGED, STATIC=STATIC)
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", FP16="FP16", BF16="BF16", STRIP_PLAN="STRIP_PLAN",
                                            REFIT_IDENTICAL="REFIT_IDENTICAL",
                                            OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.float32, trt.float16, trt.bfloat16, trt.int32, trt.int64, trt.bool = "f32", "f16", "bf16", "i32", "i64", "b"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    """The fake module's state: set ``state["profiles"]`` (count vectors) before an engine file that the fake
    builder did not write deserializes."""
    state = {"deserialized": 0, "engine": None, "profiles": [{}], "builds": [], "blobs": {}}
    _install(monkeypatch, state)
    return state
