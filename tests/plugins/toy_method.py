"""A method defined outside ditmerge's packages: both halves in one module, found by its dotted path.

The graph scales the model's output (a Mul on ``sample``), its eager twin scales the eager output, and its
policy counts the steps it chose a variant for. tests/export/test_plugin_method.py builds and runs it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.measure import feed_of, max_abs
from export.methods import MAIN, BucketGraphs, BuildContext, Method
from export.onnx_export import eager_forward
from runtime.policies import StepPolicy


class Scale(Method):
    defaults = {"scale": 0.5}

    def build_bucket(self, ctx: BuildContext, spec, index: int) -> BucketGraphs:
        model = onnx.ModelProto()
        model.CopyFrom(ctx.base)
        g = model.graph
        out = g.output[0].name
        for n in g.node:
            n.output[:] = [f"{out}_unscaled" if o == out else o for o in n.output]
        g.initializer.append(numpy_helper.from_array(np.array(self.options["scale"], np.float32), "toy_scale"))
        g.node.append(helper.make_node("Mul", [f"{out}_unscaled", "toy_scale"], [out], name="toy/scale"))
        return BucketGraphs({MAIN: model}, meta={"scale": self.options["scale"]}, r=0, kept_tokens=ctx.tokens)

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs) -> float:
        return max_abs(run(feed_of(inputs))["sample"], eager_forward(ctx.torch_model, inputs).numpy() * meta["scale"])


class CountingPolicy(StepPolicy):
    rows_independent = True
    selected = 0

    def select(self, state, bucket, batch: int):
        type(self).selected += 1
        return MAIN, {}


METHOD = Scale
POLICY = CountingPolicy
