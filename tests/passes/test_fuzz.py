"""Fuzzing: random small DiT / PixArt configs, grids, batches, ratios and locations.

The pass must either produce a graph that passes onnx.checker and the TensorRT check and matches its
eager twin within 1e-4, or raise the user-facing error. Never a crash, never a wrong result.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from export.measure import tome_fidelity
from export.onnx_export import example_inputs, export_onnx
from passes.cleanup import FreeTokenAxisPass, RemoveNoopSqueezePass
from passes.errors import DitmergeError
from passes.infra import PassManager
from passes.onnxutil import get_model_meta, save_checked
from passes.tome import ToMeConfig, ToMePass, max_ratio
from passes.trt_check import check_tensorrt
from runtime.runners import OrtRunner, SharedWeights
from tests.helpers import METHOD_ATOL

configs = st.fixed_dictionaries({
    "family": st.sampled_from(["dit", "pixart"]),
    "layers": st.integers(1, 2),
    "heads": st.integers(1, 3),
    "head_dim": st.sampled_from([4, 8]),
    "patch": st.sampled_from([1, 2]),
    "grid": st.integers(2, 6),
    "batch": st.integers(1, 3),
    "ratio": st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.75, 0.8, -0.2]),
    "locations": st.sampled_from([("attn", "mlp"), ("attn",), ("mlp",), ("attn", "xattn", "mlp"), ("xattn",)]),
    "band_limit": st.sampled_from([3840, 4]),
})


def _model(c):
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    torch.manual_seed(0)
    inner = c["heads"] * c["head_dim"]
    common = dict(num_attention_heads=c["heads"], attention_head_dim=c["head_dim"], in_channels=4, out_channels=8,
                  num_layers=c["layers"], sample_size=c["grid"] * c["patch"], patch_size=c["patch"])
    if c["family"] == "dit":
        return DiTTransformer2DModel(num_embeds_ada_norm=10, **common).eval()
    return PixArtTransformer2DModel(cross_attention_dim=inner, caption_channels=12, norm_type="ada_norm_single",
                                    num_embeds_ada_norm=1000, **common).eval()


# derandomized (the same examples in every CI run) and without shrinking (each example exports a model)
@settings(max_examples=12, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(c=configs)
def test_pass_is_correct_or_refuses(tmp_path_factory, c):
    d = tmp_path_factory.mktemp("fuzz")
    grid = (c["grid"], c["grid"])
    model = _model(c)
    export_onnx(model, d / "base.onnx", grid)
    base = onnx.load(d / "base.onnx", load_external_data=False)
    base = PassManager([RemoveNoopSqueezePass(), FreeTokenAxisPass(grid[0] * grid[1])])(base).model
    top = max_ratio(grid)
    try:
        res = ToMePass(ToMeConfig(c["ratio"], locations=c["locations"], max_src_per_band=c["band_limit"]))(base)
    except DitmergeError as e:
        bad_ratio = not 0 <= c["ratio"] <= top
        no_band = c["band_limit"] < 3840  # tiny band limits may leave no equal banding of the grid
        assert bad_ratio or no_band, f"refused a valid request: {e}"
        return
    assert 0 <= c["ratio"] <= top
    if not res.modified:
        return
    save_checked(res.model, d / "merged.onnx")  # onnx.checker, path-based
    assert check_tensorrt(res.model) == []
    meta = json.loads(get_model_meta(res.model)["tome"])
    if not meta["sites"]:
        return
    runner = OrtRunner(d / "merged.onnx", ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))
    inputs = example_inputs(model, c["batch"], grid, seed=c["batch"])
    err = tome_fidelity(model, runner, inputs, meta, grid, seed=1)
    assert np.isfinite(err) and err <= METHOD_ATOL, f"{c}: merged graph vs twin {err:.2e}"
