"""A fake ``tensorrt`` module for CPU tests of the runner and the engine builder (the real one is not installed).

Runtime side: the engine has input ``x`` (and one count input ``ditmerge_count_<key>`` per key of its
profiles), outputs ``y = x`` and ``z = 2 * x``, written through the raw addresses the runner binds, so a test
sees exactly which buffers the runner handed to the engine. Like TensorRT, a context refuses an input shape
outside its profile, and refuses to run without device memory (USER_MANAGED) or with a null input address.

Builder side: ``Builder`` / ``OnnxParser`` read the graph's inputs from the ONNX file and record the
optimization profiles, flags and network flags of each build.
"""

from __future__ import annotations

import ctypes
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
        self.flags, self.inputs, self.num_layers = flags, [], 0

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


def _install(monkeypatch, state: dict) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1"

    class Runtime:
        def __init__(self, log):
            pass

        def deserialize_cuda_engine(self, blob):
            state["deserialized"] += 1
            state["engine"] = FakeEngine(state["blobs"].get(bytes(blob), state["profiles"]))
            return state["engine"]

    class OnnxParser:
        def __init__(self, network, log):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            import onnx

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
            blob = b"engine:" + repr(state["builds"][-1]["profiles"]).encode()
            state["blobs"][blob] = [{n[len(COUNT):]: s[0][0] for n, s in p.shapes.items() if n.startswith(COUNT)}
                                    for p in config.profiles]  # what deserializing this engine gives
            return blob

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
