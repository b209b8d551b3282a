"""A plan as ``pipe.transformer`` in diffusers' DiTPipeline, against eager generation."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import runtime
from export.build import build_plan
from passes.errors import DitmergeError
from tests.helpers import EXPORT_ATOL, tiny_dit


def _pipeline(transformer):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, guidance=4.0, steps=6, seed=0):
    return pipe(class_labels=[3], guidance_scale=guidance, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # DiTPipeline uses class 1000 as the null label, so the tiny model has 1000 classes
    d = tmp_path_factory.mktemp("dit_model")
    tiny_dit(sample_size=8, num_classes=1000).save_pretrained(d / "transformer")
    return d


@pytest.fixture(scope="module")
def plans(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("plans")
    build_plan(str(model_dir), buckets="0", out=root / "unmerged", measure=False, progress=False)
    build_plan(str(model_dir), buckets="999-500:0.5,499-0:0.25", out=root / "merged", measure=True, repeats=2,
               progress=False)
    return root


def test_unmerged_plan_generation_equals_eager(model_dir, plans):
    from diffusers import DiTTransformer2DModel

    eager = _generate(_pipeline(DiTTransformer2DModel.from_pretrained(model_dir, subfolder="transformer").eval()))
    pipe = _pipeline(DiTTransformer2DModel.from_pretrained(model_dir, subfolder="transformer"))
    pipe.transformer = runtime.load(plans / "unmerged")
    through_plan = _generate(pipe)
    err = float(np.abs(through_plan - eager).max())
    assert err <= EXPORT_ATOL, f"generation through the ratio-0 plan differs from eager by {err:.2e}"


def test_merged_plan_runs_the_merge_and_is_reproducible(model_dir, plans):
    from diffusers import DiTTransformer2DModel

    pipe = _pipeline(DiTTransformer2DModel.from_pretrained(model_dir, subfolder="transformer"))
    pipe.transformer = runtime.load(plans / "unmerged")
    unmerged = _generate(pipe)
    merged_tf = runtime.load(plans / "merged", seed=5)
    pipe.transformer = merged_tf
    merged = _generate(pipe)
    again = _generate(pipe)
    assert float(np.abs(merged - unmerged).max()) > 1e-3, "the merged plan generated the unmerged image"
    assert np.array_equal(merged, again), "same seed, same partitions: generations must repeat exactly"
    # a bucket is a shape: both merged buckets run the one merged graph (one session), at their own r
    assert {r.graph_path.name for r in merged_tf._runners.values()} == {"bucket_0.onnx"}


def test_plan_manifest_covers_all_timesteps(plans):
    manifest = json.loads((plans / "merged" / "plan.json").read_text())
    spans = sorted((b["t_lo"], b["t_hi"]) for b in manifest["buckets"])
    assert spans == [(0, 499), (500, 999)]
    assert manifest["buckets"][0]["r"] == 8 and manifest["buckets"][1]["r"] == 4
    base_ms = manifest["report"]["base_latency_ms"]
    for b in manifest["buckets"]:
        assert b["fidelity_max_abs"] <= EXPORT_ATOL and 0 < b["flops_rel"] < 1
        # the reported speed-up is the ratio of the reported latencies (no timing threshold: that would flake)
        assert all(math.isfinite(v) and v > 0 for v in (base_ms, b["latency_ms"]))
        assert b["speedup"] == pytest.approx(base_ms / b["latency_ms"], rel=1e-9)
        assert b["variant_latency_ms"]["main"] == b["latency_ms"]
    assert manifest["report"]["export_fidelity_max_abs"] <= EXPORT_ATOL
    assert (plans / "merged" / "report.md").read_text().count("| bucket |") == 1
    # one shared weights file: every weight of every graph is a reference into weights.bin, at the same offset
    import onnx

    refs = []
    assert [b["graph"] for b in manifest["buckets"]] == ["bucket_0.onnx", "bucket_0.onnx"]
    assert [b["counts"] for b in manifest["buckets"]] == [{"tome_r": 8}, {"tome_r": 4}]
    for graph in ("base.onnx", "bucket_0.onnx"):
        m = onnx.load(plans / "merged" / graph, load_external_data=False)
        ext = {i.name: tuple((e.key, e.value) for e in i.external_data) for i in m.graph.initializer
               if i.data_location == onnx.TensorProto.EXTERNAL}
        inline_weights = [i.name for i in m.graph.initializer
                          if i.data_location != onnx.TensorProto.EXTERNAL and i.name.startswith("model.")]
        assert not inline_weights, f"{graph} embeds weights {inline_weights[:3]}"
        assert all(dict(v)["location"] == "weights.bin" for v in ext.values())
        refs.append(ext)
    assert refs[0] and all(r == refs[0] for r in refs[1:])


def test_runtime_errors_are_clear(plans):
    tf = runtime.load(plans / "merged")
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(DitmergeError, match="outside every bucket"):
        tf(x, timestep=torch.tensor([1000, 1000]), class_labels=torch.tensor([1, 2]))
    with pytest.raises(DitmergeError, match="axis 2 must be 8"):
        tf(torch.randn(2, 4, 6, 8), timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2]))
    with pytest.raises(DitmergeError, match="has batch 3, other inputs have batch 2"):
        tf(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(DitmergeError, match="dtype"):
        tf(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1.5, 2.0]))
    with pytest.raises(DitmergeError, match="needs input 'class_labels'"):
        tf(x, timestep=torch.tensor([10, 10]))
    with pytest.raises(DitmergeError, match="unknown backend"):
        runtime.load(plans / "merged", backend="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DitmergeError, match="backend 'cuda' needs a CUDA GPU"):
            runtime.load(plans / "merged", backend="cuda")


def test_load_passes_its_session_settings_to_every_runner(plans):
    """``runtime.load``'s thread settings reach the onnxruntime sessions (spinning was once dropped on the way)."""
    from runtime.transformer import spinning_default

    graphs = {g for b in runtime.load(plans / "merged").plan.buckets for g in b.graphs.values()}
    for spinning in (False, True):
        tf = runtime.load(plans / "merged", spinning=spinning, threads=1, prepack=False)
        assert tf.spinning is spinning
        for g in graphs:
            r = tf.runner(g)
            assert (r.spinning, r.threads, r.prepack) == (spinning, 1, False), g
    auto = runtime.load(plans / "merged")
    assert auto.spinning is spinning_default(auto.plan)
    with pytest.raises(DitmergeError, match="spinning must be"):
        runtime.load(plans / "merged", spinning="sometimes")


def test_damaged_plans_are_refused(plans, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(plans / "merged", bad)
    (bad / "bucket_0.onnx").write_bytes((bad / "bucket_0.onnx").read_bytes() + b"\0")
    with pytest.raises(DitmergeError, match="does not match the hash"):
        runtime.load(bad)
    (bad / "bucket_0.onnx").unlink()
    with pytest.raises(DitmergeError, match="missing bucket_0.onnx"):
        runtime.load(bad)
    manifest = json.loads((plans / "merged" / "plan.json").read_text())
    (bad / "plan.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(DitmergeError, match="format version 99"):
        runtime.load(bad)
    # a plan of the old format (one graph and one copy of the weights per bucket) is refused: rebuild it
    (bad / "plan.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(DitmergeError, match="format version 2.*rebuild the plan"):
        runtime.load(bad)
    with pytest.raises(DitmergeError, match="plan.json is missing"):
        runtime.load(tmp_path)
    # a TensorRT engine recorded in the plan is hash-checked like the graphs
    shutil.rmtree(bad)
    shutil.copytree(plans / "merged", bad)
    (bad / "bucket_0.fp16.0123.engine").write_bytes(b"not the engine that was built")
    engines = {"bucket_0.onnx": {"file": "bucket_0.fp16.0123.engine", "sha256": "0" * 64}}
    (bad / "plan.json").write_text(json.dumps({**manifest, "engines": engines}))
    with pytest.raises(DitmergeError, match="bucket_0.fp16.0123.engine does not match the hash"):
        runtime.load(bad)


def test_manifest_round_trips_and_wrong_fields_are_refused(plans, tmp_path):
    from runtime.plan_schema import PlanManifest

    for name in ("unmerged", "merged"):
        text = (plans / name / "plan.json").read_text()
        record = PlanManifest.from_json(json.loads(text))
        assert json.dumps(record.to_json(), indent=2) == text  # the bytes export wrote, from the typed record
    assert record.buckets[0].meta["r"] == record.buckets[0].r > 0 and record.model.class_name == "DiTTransformer2DModel"
    manifest = json.loads(text)
    bad = tmp_path / "bad"
    shutil.copytree(plans / "merged", bad)
    (bad / "plan.json").write_text(json.dumps({**manifest, "buckets": [{**manifest["buckets"][0], "ratoi": 0.5}]}))
    with pytest.raises(DitmergeError, match=r"buckets\[0\] has unknown field\(s\) ratoi"):
        runtime.load(bad)
    model = {k: v for k, v in manifest["model"].items() if k != "grid"}
    (bad / "plan.json").write_text(json.dumps({**manifest, "model": model}))
    with pytest.raises(DitmergeError, match=r"plan.json.model lacks the field\(s\) grid"):
        runtime.load(bad)
