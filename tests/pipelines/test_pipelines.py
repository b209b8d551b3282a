"""Plans as ``pipe.transformer`` in the real diffusers pipelines of each family, with their defaults.

Each generation runs the pipeline's own scheduler, step count, guidance, prompt length and output type
(text encoders bypassed with prompt embeddings of the default length). A ratio-0 plan's images equal the
eager pipeline's; a ToMe plan's images equal those of the eager twin (the same merges as forward hooks on
the diffusers model, same partitions, same buckets) over the whole generation.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

import runtime
from passes.errors import DitmergeError
from passes.partition import draw_partition
from passes.tome.twin import ToMeTwin
from tests.helpers import EXPORT_ATOL, assert_close
from tests.pipelines import twins
from tests.pipelines.components import RECIPES, pipeline

PIPELINE_TWIN_ATOL = 1e-3  # merged plan vs its eager twin, over a whole generation (fp32)
NAMES = list(RECIPES)


def _eager(name: str, model_dir):
    import diffusers

    cls = type(RECIPES[name].make_transformer())
    return getattr(diffusers, cls.__name__).from_pretrained(model_dir, subfolder="transformer").eval()


def _run(pipe, name: str, seed: int = 0, **overrides):
    return pipe(**RECIPES[name].call_kwargs(), generator=torch.Generator().manual_seed(seed), **overrides).images


class TwinTransformer(twins.TwinTransformer):
    """The eager transformer with ToMe's twin installed per call, in the bucket of the call's timestep
    (:class:`tests.pipelines.twins.TwinTransformer` finds it from the plan's spans, independently of the runtime).

    The partition is tomesd's fixed top-left one, which a plan loaded with ``deterministic=True`` also uses.
    ``calls`` records (timestep, r) per call.
    """

    def __init__(self, model: torch.nn.Module, manifest: dict) -> None:
        super().__init__(model, manifest)
        self.calls: list[tuple[float, int]] = []

    def step_twin(self, t: float, bucket: dict, batch: int) -> tuple[str, contextlib.AbstractContextManager]:
        meta = bucket["method_meta"]
        self.calls.append((t, meta.get("r", 0)))
        if not meta.get("r"):
            return twins.MAIN, contextlib.nullcontext()
        twin = ToMeTwin.from_meta(self.model, meta)
        part, inv = draw_partition(self.grid, tuple(meta["stride"]), None, meta.get("bands", 1))
        twin.set_partition(torch.from_numpy(part), torch.from_numpy(inv))
        return twins.MAIN, twin.installed()


@pytest.mark.parametrize("name", NAMES)
def test_ratio0_plan_equals_eager_pipeline(name, pipeline_plans):
    """Whole default generations: the pipeline's own output type (PIL), and the same run as floats."""
    model_dir, plan = pipeline_plans(name, "unmerged")
    eager = pipeline(RECIPES[name], _eager(name, model_dir))
    through = pipeline(RECIPES[name], _eager(name, model_dir))
    tf = runtime.load(plan, pipeline=through)
    assert through.transformer is tf
    pil_eager, pil_plan = _run(eager, name), _run(through, name)
    assert len(pil_plan) == len(pil_eager) == 1 and pil_plan[0].size == pil_eager[0].size
    a, b = np.asarray(pil_plan[0], np.int16), np.asarray(pil_eager[0], np.int16)
    # rounding to uint8 may flip a value that sits on a level boundary, by one level
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99, f"{name}: PIL images differ"
    err = assert_close(_run(through, name, output_type="np"), _run(eager, name, output_type="np"), EXPORT_ATOL,
                       f"{name}: ratio-0 plan vs eager pipeline")
    print(f"{name}: ratio-0 plan vs eager, max abs {err:.2e}")


@pytest.mark.parametrize("name", NAMES)
def test_tome_plan_equals_twin_pipeline(name, pipeline_plans):
    """ToMe in two buckets of different r over a whole default generation, against the eager twin."""
    model_dir, plan = pipeline_plans(name, "tome")
    manifest = json.loads((plan / "plan.json").read_text())
    assert all(b["r"] > 0 for b in manifest["buckets"]), manifest["buckets"]
    twin = TwinTransformer(_eager(name, model_dir), manifest)
    twin_pipe = pipeline(RECIPES[name], twin)
    through = pipeline(RECIPES[name], _eager(name, model_dir))
    tf = runtime.load(plan, deterministic=True, pipeline=through)
    merged = _run(through, name, output_type="np")
    expected = _run(twin_pipe, name, output_type="np")
    assert {r for _, r in twin.calls} == {b["r"] for b in manifest["buckets"]}, "the generation crossed one bucket only"
    assert {rn.graph_path.name for rn in tf._runners.values()} == {"bucket_0.onnx"}  # one graph, r per bucket
    err = assert_close(merged, expected, PIPELINE_TWIN_ATOL, f"{name}: ToMe plan vs eager twin pipeline")
    print(f"{name}: ToMe plan vs twin, max abs {err:.2e}")


def test_batches_with_and_without_guidance(pipeline_plans):
    """Batch 3 without guidance (DiT) and 2 images per prompt with guidance (PixArt: batch 4)."""
    model_dir, plan = pipeline_plans("dit", "unmerged")
    eager, through = (pipeline(RECIPES["dit"], _eager("dit", model_dir)) for _ in range(2))
    runtime.load(plan, pipeline=through)
    kw = {"class_labels": [3, 5, 7], "guidance_scale": 1.0, "output_type": "np", "num_inference_steps": 10}
    got = through(**kw, generator=torch.Generator().manual_seed(1)).images
    assert got.shape[0] == 3
    assert_close(got, eager(**kw, generator=torch.Generator().manual_seed(1)).images, EXPORT_ATOL, "DiT batch 3")
    model_dir, plan = pipeline_plans("pixart-alpha", "unmerged")
    eager, through = (pipeline(RECIPES["pixart-alpha"], _eager("pixart-alpha", model_dir)) for _ in range(2))
    runtime.load(plan, pipeline=through)
    got = _run(through, "pixart-alpha", num_images_per_prompt=2, output_type="np", num_inference_steps=5)
    assert got.shape[0] == 2
    assert_close(got, _run(eager, "pixart-alpha", num_images_per_prompt=2, output_type="np", num_inference_steps=5),
                 EXPORT_ATOL, "PixArt 2 images per prompt")


def test_prompt_lengths_vary(pipeline_plans):
    """One plan takes the prompt lengths of PixArt-alpha (120), PixArt-Sigma (300) and a short prompt."""
    model_dir, plan = pipeline_plans("pixart-alpha", "unmerged")
    model = _eager("pixart-alpha", model_dir)
    tf = runtime.load(plan)
    g = torch.Generator().manual_seed(0)
    for length in (5, 120, 300):
        x = torch.randn(2, 4, 32, 32, generator=g)
        ehs = torch.randn(2, length, 32, generator=g)
        mask = torch.ones(2, length, dtype=torch.int64)
        mask[:, length // 2:] = 0
        kw = dict(timestep=torch.tensor([999, 999]), encoder_hidden_states=ehs, encoder_attention_mask=mask,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        with torch.no_grad():
            ref = model(x, **kw).sample
        assert_close(tf(x, **kw).sample.numpy(), ref.numpy(), EXPORT_ATOL, f"prompt length {length}")


def test_flow_matching_endpoints_and_scale(pipeline_plans):
    """SD3 sends 1000.0 at sigma 1 and Flux 1.0 (its transformer's scale): both belong to the noisiest bucket."""
    _, plan = pipeline_plans("sd3", "tome")
    p = runtime.load(plan).plan
    assert p.timesteps == "flow" and p.bucket_for(1000.0).index == 0 and p.bucket_for(0.0).index == 1
    with pytest.raises(DitmergeError, match="outside every bucket"):
        p.bucket_for(1000.5)


def test_mismatches_are_refused(pipeline_plans):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    _, dit_plan = pipeline_plans("dit", "unmerged")
    model_dir, sd3_plan = pipeline_plans("sd3", "unmerged")
    pipe = pipeline(RECIPES["dit"], _eager("dit", pipeline_plans("dit", "unmerged")[0]))
    pipe.scheduler = DDIMScheduler(num_train_timesteps=500)
    with pytest.raises(DitmergeError, match="num_train_timesteps=500"):
        runtime.load(dit_plan, pipeline=pipe)
    pipe.scheduler = DDIMScheduler(prediction_type="v_prediction")
    with pytest.raises(DitmergeError, match="prediction_type='v_prediction'.*'epsilon'"):
        runtime.load(dit_plan, pipeline=pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(DitmergeError, match="flow-matching scheduler"):
        runtime.load(dit_plan, pipeline=pipe)
    sd3 = pipeline(RECIPES["sd3"], _eager("sd3", model_dir))
    sd3.scheduler = DDIMScheduler()
    with pytest.raises(DitmergeError, match="DDPM-style"):
        runtime.load(sd3_plan, pipeline=sd3)
    # a resolution the plan was not built for names the flag that builds one
    sd3.scheduler = RECIPES["sd3"].make_scheduler()
    runtime.load(sd3_plan, pipeline=sd3)
    with pytest.raises(DitmergeError, match="--grid"):
        _run(sd3, "sd3", height=16, width=16, num_inference_steps=2)
    # arguments the graph cannot honour are refused, not dropped
    with pytest.raises(DitmergeError, match="joint_attention_kwargs"):
        _run(sd3, "sd3", joint_attention_kwargs={"scale": 0.5}, num_inference_steps=2)


@pytest.mark.parametrize("kind", ["unmerged", "tome"])
def test_flux_true_cfg(kind, pipeline_plans):
    """FluxPipeline's true classifier-free guidance (``true_cfg_scale`` with negative prompt embeddings) calls
    the transformer twice per step, under ``cache_context("cond")`` and ``("uncond")``: the plan gives the eager
    pipeline's (ratio 0) or the eager twin's (ToMe) images."""
    model_dir, plan = pipeline_plans("flux", kind)
    g = torch.Generator().manual_seed(7)
    kw = dict(true_cfg_scale=2.0, negative_prompt_embeds=torch.randn(1, 512, 32, generator=g),
              negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g), num_inference_steps=6, output_type="np")
    manifest = json.loads((plan / "plan.json").read_text())
    reference = TwinTransformer(_eager("flux", model_dir), manifest)
    expected = _run(pipeline(RECIPES["flux"], reference), "flux", **kw)
    through = pipeline(RECIPES["flux"], _eager("flux", model_dir))
    runtime.load(plan, deterministic=True, pipeline=through)
    got = _run(through, "flux", **kw)
    assert len(reference.calls) == 2 * 6, "true CFG makes two transformer calls per step"
    plain = _run(through, "flux", num_inference_steps=6, output_type="np")
    assert float(np.abs(got - plain).max()) > 1e-3, "the negative prompt changed nothing: true CFG did not run"
    atol = EXPORT_ATOL if kind == "unmerged" else PIPELINE_TWIN_ATOL
    err = assert_close(got, expected, atol, f"flux true CFG, {kind} plan vs eager")
    print(f"flux true CFG ({kind}): max abs {err:.2e}")
