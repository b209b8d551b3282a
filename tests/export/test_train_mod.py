"""MoD fine-tuning on a few steps, and its plan: routed buckets equal the eager routed model, end to end."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.train_mod import RATIOS_FILE, ROUTERS_FILE, LoRA, fine_tune, load_routing, merged_copy
from passes.errors import DitmergeError
from tests.count_profiles import assert_tensorrt_ok
from tests.helpers import METHOD_ATOL


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A small random DiT (the bundled architecture at width 32, 2 layers) fine-tuned with routers for 24 steps."""
    from export.train import make_model, make_scheduler

    d = tmp_path_factory.mktemp("mod")
    make_model(width=32, heads=2, layers=2).save_pretrained(d / "base")
    make_scheduler().save_pretrained(d / "scheduler")
    kwargs = {"model": str(d / "base"), "regions": 2, "batch": 8, "full": True, "lr": 2e-3, "ratio_lr": 0.02,
              "target": 0.3, "log_every": 8, "save_every": 8, "progress": False, "seed": 0, "distill": 0.0}
    record = fine_tune(d / "ft", steps=24, **kwargs)
    return d, record, kwargs


def test_a_few_steps_lower_the_loss_and_move_the_ratios_to_target(tuned):
    _, record, _ = tuned
    log = record["log"]
    assert [e["step"] for e in log] == [8, 16, 24]
    assert log[-1]["diffusion_loss"] < 0.8 * log[0]["diffusion_loss"], log
    assert 0 < log[0]["mean_ratio"] < log[-1]["mean_ratio"] <= 0.3 + 0.05, log
    assert record["mean_learned"] > 0.1
    assert len(record["regions"]) == 2 and len(record["regions"][0]["learned"]) == 2


def test_distillation_keeps_the_routed_model_near_the_starting_model(tuned, tmp_path):
    """The teacher term (on by default) is what keeps a short fine-tune close to the model users had."""
    from export.load import load_transformer

    d, _, kwargs = tuned
    gaps = {}
    for distill in (0.0, 20.0):
        out = tmp_path / f"distill_{distill:g}"
        record = fine_tune(out, steps=8, **{**kwargs, "distill": distill, "lr": 5e-3})
        assert record["distill"] == distill
        assert (record["log"][-1]["teacher_gap"] > 0) == (distill > 0)
        routing, _ = load_routing(str(out))
        base, tuned_net = load_transformer(str(d / "base")), load_transformer(str(out))
        gen = torch.Generator().manual_seed(5)
        x, y, t = torch.randn(8, 3, 32, 32, generator=gen), torch.arange(8) % 10, torch.full((8,), 600)
        with torch.no_grad():
            want = base(x, timestep=t, class_labels=y).sample
            with routing.installed(tuned_net):
                got = tuned_net(x, timestep=t, class_labels=y).sample
        gaps[distill] = float((got - want).square().mean())
    assert gaps[20.0] < 0.5 * gaps[0.0], gaps


def test_writes_a_model_folder_with_routers_and_resumes(tuned):
    d, record, kwargs = tuned
    ft = d / "ft"
    assert (ft / "config.json").is_file() and (ft / ROUTERS_FILE).is_file()
    assert (ft / "scheduler" / "scheduler_config.json").is_file()
    saved = json.loads((ft / RATIOS_FILE).read_text())
    assert saved["regions"][1]["t_lo"] == 500 and saved["finetune"] == "full"
    routing, rec = load_routing(str(ft))
    assert routing.snapped() == [r["snapped"] for r in rec["regions"]]
    resumed = fine_tune(ft, steps=26, **kwargs)
    assert resumed["steps"] == 26 and resumed["log"][:3] == record["log"]


def test_lora_merges_into_the_weights():
    from export.train import make_model

    net = make_model(width=32, heads=2, layers=1).eval()
    lora = LoRA(net, rank=4, seed=1)
    with torch.no_grad():
        for p in lora.up.values():
            p.normal_(0, 0.1)
    x = torch.randn(2, 3, 32, 32)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        hooked = net(x, timestep=t, class_labels=y).sample
        merged = merged_copy(net, lora)(x, timestep=t, class_labels=y).sample
        plain = make_model(width=32, heads=2, layers=1).eval()(x, timestep=t, class_labels=y).sample
    assert (hooked - merged).abs().max() < 1e-5
    assert (hooked - plain).abs().max() > 1e-3


def test_plan_buckets_equal_the_eager_routed_model(tuned, tmp_path):
    from export.build import build_plan
    from export.load import load_transformer
    from runtime import load

    d, _, _ = tuned
    ft = str(d / "ft")
    manifest = build_plan(model=ft, method="mod", out=tmp_path / "plan", quality_samples=0, repeats=1, progress=False)
    buckets = manifest["buckets"]
    assert buckets[0]["t_hi"] == 999 and buckets[-1]["t_lo"] == 0
    routing, record = load_routing(ft)
    for b in buckets:
        assert b["fidelity_max_abs"] <= METHOD_ATOL, b
        assert_tensorrt_ok(onnx.load(tmp_path / "plan" / b["graph"], load_external_data=False), b["counts"])
        region = next(r for r in record["regions"] if r["t_lo"] <= b["t_lo"] <= r["t_hi"])
        assert b["method_meta"]["capacities"] == region["capacities"]
    # through the runtime: a call at timestep t runs t's bucket, routed as the eager model routes t's region
    plan = load(tmp_path / "plan", backend="cpu")
    model = load_transformer(ft)
    gen = torch.Generator().manual_seed(3)
    for t in (900, 100):
        x, y, ts = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([1, 10]), torch.full((2,), t)
        got = plan(x, timestep=ts, class_labels=y).sample.numpy()
        with torch.no_grad(), routing.installed(model):
            want = model(x, timestep=ts, class_labels=y).sample.numpy()
        assert np.abs(got - want).max() <= METHOD_ATOL, f"timestep {t}"


def test_a_model_without_routers_is_refused(tmp_path):
    from export.build import build_plan

    with pytest.raises(DitmergeError, match="has no MoD routers"):
        build_plan(model="bundled:tiny-dit", method="mod", out=tmp_path / "p", measure=False, progress=False)


def test_buckets_of_other_capacities_share_one_graph_file(tmp_path):
    """builtin:tiny-dit with random routers and three regions of different capacities (one a block at
    k = N): build_plan stores one graph for the 3 buckets, each bucket feeds its capacities and matches
    the eager routed model."""
    from safetensors.torch import save_file

    from export.build import build_plan
    from export.load import BUILTIN_TINY, load_transformer
    from export.train import make_scheduler
    from passes.mod.eager import MoDRouting, capacity, region_bounds

    model = load_transformer(BUILTIN_TINY)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    make_scheduler().save_pretrained(folder / "scheduler")
    layers = len(model.transformer_blocks)
    channels = model.config.num_attention_heads * model.config.attention_head_dim
    routing = MoDRouting(channels, layers, regions=3, init_bias=0.0, seed=2)
    save_file(routing.router_tensors(), folder / ROUTERS_FILE)
    tokens = (model.config.sample_size // model.config.patch_size) ** 2
    snapped = [[0.5] + [0.3] * (layers - 1), [0.0] + [0.2] * (layers - 1), [0.1] * layers]
    regions = [{"region": r, "t_lo": region_bounds(r, 3, 1000)[0], "t_hi": region_bounds(r, 3, 1000)[1],
                "snapped": snapped[r], "learned": snapped[r], "capacities": [capacity(v, tokens) for v in snapped[r]]}
               for r in range(3)]
    (folder / RATIOS_FILE).write_text(json.dumps({"format": 1, "layers": layers, "num_train_timesteps": 1000,
                                                   "max_ratio": 0.7, "tokens": tokens, "regions": regions}))
    out = tmp_path / "plan"
    manifest = build_plan(model=str(folder), method="mod", out=out, measure=True, repeats=2, quality_samples=0,
                          progress=False)
    buckets = manifest["buckets"]
    assert len(buckets) == 3 and len({b["graph"] for b in buckets}) == 1
    assert sorted(f.name for f in out.glob("bucket_*.onnx")) == [buckets[0]["graph"]]
    assert len({tuple(b["counts"].values()) for b in buckets}) == 3
    assert any(v == tokens for b in buckets for v in b["counts"].values())  # a block at k = N in one bucket
    for b in buckets:
        assert b["fidelity_max_abs"] <= METHOD_ATOL, (b["index"], b["fidelity"])
        assert list(b["counts"].values()) == b["method_meta"]["capacities"]
        assert_tensorrt_ok(onnx.load(out / b["graph"], load_external_data=False), b["counts"])
