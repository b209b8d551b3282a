"""The one runner path on CPU: lazy activation for every backend, and TensorRT's device I/O with a fake engine.

The fake ``tensorrt`` module (``conftest.py``) stands in for the real one (not installed here): its engine
copies input ``x`` into output ``y`` and ``2 * x`` into ``z`` through the raw addresses the runner binds, so
the test sees exactly which buffers the runner handed to the engine.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from passes.errors import DitmergeError
from runtime.runners import OrtRunner, Runner, torch_feed


def _runner(tmp_path):
    from runtime.trt_runner import TrtRunner

    (tmp_path / "e.engine").write_bytes(b"engine")
    return TrtRunner(tmp_path / "e.engine", tmp_path / "g.onnx", strip=False, device="cpu")


def test_trt_runner_activates_on_first_infer(tmp_path, fake_trt):
    runner = _runner(tmp_path)
    assert not runner.is_active and fake_trt["deserialized"] == 0
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = runner({"x": x})  # never activated: the first call activates
    assert runner.is_active and fake_trt["deserialized"] == 1
    assert torch.equal(out["y"], x) and torch.equal(out["z"], 2 * x)
    runner.infer({"x": x})
    assert fake_trt["deserialized"] == 1 and fake_trt["engine"].executed == 2  # activated once


def test_trt_runner_binds_device_tensors_without_copies(tmp_path, fake_trt):
    """A tensor on the runner's device in the engine's dtype is bound as it is; outputs are torch tensors there."""
    runner = _runner(tmp_path)
    x = torch.randn(4, 3)
    out = runner({"x": x})
    ctx = fake_trt["engine"].contexts[0]
    assert ctx.addresses["x"] == x.data_ptr()  # bound in place: no staging copy
    assert ctx.addresses["y"] == out["y"].data_ptr() and ctx.addresses["z"] == out["z"].data_ptr()
    assert all(isinstance(v, torch.Tensor) and v.device == torch.device("cpu") for v in out.values())
    # an output fed back as the next step's input (method state) is bound in place too
    runner({"x": out["z"]})
    assert ctx.addresses["x"] == out["z"].data_ptr()
    # a numpy input (what a host pipeline gives) and a float64 tensor are converted once, to the engine's dtype
    out2 = runner({"x": np.ones((2, 3))})
    assert out2["y"].dtype == torch.float32 and torch.equal(out2["z"], torch.full((2, 3), 2.0))


def test_plan_transformer_forward_uses_the_one_runner_path():
    """``PlanTransformer.forward`` calls ``runner.infer`` (lazy activation) and no backend-specific method."""
    import inspect

    from runtime import transformer

    src = inspect.getsource(transformer.PlanTransformer.forward)
    assert "runner.infer(feed)" in src and "infer_torch" not in src
    from runtime.trt_runner import TrtRunner

    assert not hasattr(TrtRunner, "infer_torch")


def test_ort_runner_activates_on_first_infer(tmp_path):
    import onnx
    from onnx import TensorProto as T
    from onnx import helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [2])], [helper.make_tensor_value_info("y", T.FLOAT, [2])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), tmp_path / "g.onnx")
    runner = OrtRunner(tmp_path / "g.onnx", ["CPUExecutionProvider"])
    assert runner.session is None and not runner.device_io
    out = runner({"x": np.array([-1.0, 2.0], np.float32)})
    assert runner.is_active and out["y"].tolist() == [0.0, 2.0]


def test_base_runner_lifecycle():
    calls = []

    class R(Runner):
        def activate_impl(self):
            calls.append("activate")

        def deactivate_impl(self):
            calls.append("deactivate")

        def infer_impl(self, feed):
            return feed

    r = R()
    r({"a": 1})
    r({"a": 2})
    r.deactivate()
    r({"a": 3})
    assert calls == ["activate", "deactivate", "activate"]


def test_torch_feed_keeps_tensors_and_checks_them():
    inputs = {"hidden_states": (np.dtype(np.float32), ["B", 4, 8, 8]), "timestep": (np.dtype(np.int64), ["B"]),
              "cache": (np.dtype(np.float32), ["B", 16, 8])}
    hs = torch.randn(2, 4, 8, 8)
    cache = torch.zeros(2, 16, 8)
    feed = torch_feed(inputs, {"hidden_states": hs, "timestep": torch.tensor(500)}, {"cache": cache})
    # no copy, no host round trip: the same storage goes to the runner
    assert feed["hidden_states"].data_ptr() == hs.data_ptr() and feed["cache"].data_ptr() == cache.data_ptr()
    assert feed["timestep"].shape == (2,) and int(feed["timestep"][1]) == 500  # broadcast to the batch
    with pytest.raises(DitmergeError, match="axis 2 must be 8"):
        torch_feed(inputs, {"hidden_states": torch.randn(2, 4, 9, 8), "timestep": torch.tensor([1, 1])}, {"cache": cache})
    with pytest.raises(DitmergeError, match="batch"):
        torch_feed(inputs, {"hidden_states": hs, "timestep": torch.tensor([1, 1, 1])}, {"cache": cache})
    with pytest.raises(DitmergeError, match="dtype"):
        torch_feed(inputs, {"hidden_states": hs, "timestep": torch.tensor([1.5, 2.0])}, {"cache": cache})
    with pytest.raises(DitmergeError, match="did not give"):
        torch_feed(inputs, {"hidden_states": hs}, {"cache": cache})


def test_reduced_precision_builds_pin_the_marked_layers():
    """Layers named after PIN_FP32 nodes (AT-EDM's importance) get fp32 precision and float outputs; others don't."""
    from export.trt_build import pin_fp32_layers

    class Out:
        def __init__(self, dtype):
            self.dtype = dtype

    class Layer:
        def __init__(self, name, dtypes):
            self.name, self.outs, self.precision, self.set = name, [Out(d) for d in dtypes], None, {}
            self.num_outputs = len(dtypes)

        def get_output(self, j):
            return self.outs[j]

        def set_output_type(self, j, dtype):
            self.set[j] = dtype

    trt = types.SimpleNamespace(float32="f32", float16="f16", bfloat16="bf16")
    layers = [Layer("atedm/fp32.logits_3", ["f16"]), Layer("atedm/fp32.keep_9", ["f16", "i64"]),
              Layer("atedm/metric_4", ["f16"]), Layer("node_fp32.x", ["f16"])]
    network = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert pin_fp32_layers(network, trt) == 2
    assert layers[0].precision == "f32" and layers[0].set == {0: "f32"}
    assert layers[1].set == {0: "f32"}  # the int64 indices output keeps its type
    assert layers[2].precision is None and layers[3].precision is None


def test_atedm_importance_nodes_carry_the_pin_marker():
    import numpy as np
    import onnx_graphsurgeon as gs

    from passes.atedm.graph import PruneGeometry, build_importance
    from passes.graphbuild import PIN_FP32, Emitter

    graph = gs.Graph(opset=23)
    q, k = gs.Variable("q", np.float32, [1, 2, 16, 4]), gs.Variable("k", np.float32, [1, 2, 16, 4])
    em = Emitter(graph, "atedm")
    build_importance(em, q, k, 0.5, PruneGeometry((4, 4), 8, 4, 2))
    ops = {n.op for n in graph.nodes if f"/{PIN_FP32}" in n.name}
    assert {"MatMul", "Softmax", "ReduceMean", "Div"} <= ops


class _DeviceOrt(Runner):
    """A device runner on CPU: onnxruntime inside, torch tensors at its border (as TrtRunner's), counting activations."""

    device_io = True

    def __init__(self, inner: OrtRunner, log: list) -> None:
        super().__init__()
        self.inner, self.log, self.activations = inner, log, 0

    def activate_impl(self) -> None:
        self.activations += 1

    def deactivate_impl(self) -> None:
        pass

    def infer_impl(self, feed: dict) -> dict:
        assert all(isinstance(v, torch.Tensor) for v in feed.values())  # no numpy conversion on the way in
        self.log.append({k: v.data_ptr() for k, v in feed.items()})
        out = self.inner.infer({k: v.numpy() for k, v in feed.items()})
        out = {k: torch.from_numpy(v.copy()) for k, v in out.items()}
        self.log.append({k: v.data_ptr() for k, v in out.items()})
        return out


def test_forward_keeps_method_state_as_the_runners_tensors(tmp_path):
    """Through ``PlanTransformer.forward`` with a device runner: each runner activates on its first call, and
    CA-ToMe's cached matching (outputs of a match step) is fed to the apply steps as the very same tensors."""
    from export.build import build_plan
    from runtime.transformer import PlanTransformer
    from runtime.plan import Plan
    from tests.helpers import tiny_dit

    tiny_dit(sample_size=8, num_classes=10).save_pretrained(tmp_path / "model" / "transformer")
    build_plan(str(tmp_path / "model"), method="catome", buckets="0.5", out=tmp_path / "plan", measure=False,
               options={"threshold": 0.5, "statistic": "median", "calib_samples": 2, "calib_steps": 4,
                        "schedule": (0, 8)}, quality_samples=0, progress=False)
    tf = PlanTransformer(Plan.load(tmp_path / "plan"), backend="cpu", deterministic=True)
    log: list = []
    plain = tf.runner
    wrapped: dict = {}

    def runner(graph):
        if graph not in wrapped:
            wrapped[graph] = _DeviceOrt(plain(graph), log)
        return wrapped[graph]

    tf.runner = runner
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 2])
    outs = [tf(x, timestep=torch.tensor([t, t]), class_labels=labels).sample for t in (999, 990, 980)]
    assert all(torch.isfinite(o).all() for o in outs)
    # match and apply are branches of one graph: one runner, activated once
    assert all(r.activations == 1 for r in wrapped.values()) and len(wrapped) == 1
    match_out, apply_in = log[1], log[2]
    cached = {k for k in match_out if k.startswith("catome_idx_out/")}
    # the same buffers: no host round trip (outputs catome_idx_out/X are fed back as inputs catome_idx/X)
    assert cached and all(apply_in["catome_idx/" + k[len("catome_idx_out/"):]] == match_out[k] for k in cached)
