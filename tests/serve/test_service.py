"""The serving contract without Ray: request validation, batched generation against direct generation,
answers, and the CLI's errors."""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import pytest

from passes.errors import DitmergeError
from runtime.plan import Plan
from runtime.service import (
    GenerationRequest,
    Limits,
    PlanService,
    RequestError,
    answer,
    check_servable,
    decode_png,
    parse_request,
)

LIMITS = Limits(max_steps=20, max_images=4)


@pytest.mark.parametrize("body, want", [
    ({"class_label": 3, "seed": 1}, GenerationRequest((3,), 1, 25, 4.0)),
    ({"class_label": 3, "seed": 1, "num_images": 3, "steps": 5, "guidance": 1},
     GenerationRequest((3, 3, 3), 1, 5, 1.0)),
    ({"class_label": [1, 9], "seed": 0, "num_images": 2, "guidance": 2.5}, GenerationRequest((1, 9), 0, 25, 2.5)),
    (b'{"class_label": [0], "seed": 7, "steps": 20}', GenerationRequest((0,), 7, 20, 4.0)),
])
def test_valid_requests_parse(body, want):
    assert parse_request(body, 10, LIMITS) == want


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not JSON"),
    (b"[3]", 400, "JSON object"),
    ({"class_label": 3, "sead": 1}, 400, "unknown field"),
    ({"seed": 1}, 400, "class_label is required"),
    ({"prompt": "a cat"}, 400, "class-conditional"),
    ({"class_label": "3"}, 400, "integer"),
    ({"class_label": []}, 400, "non-empty list"),
    ({"class_label": True}, 400, "integer"),
    ({"class_label": 3, "seed": 1.5}, 400, "seed must be an integer"),
    ({"class_label": 3, "steps": "10"}, 400, "steps must be an integer"),
    ({"class_label": 3, "guidance": "high"}, 400, "guidance must be a number"),
    ({"class_label": 10}, 422, "unknown class label(s) [10]"),
    ({"class_label": [2, -1]}, 422, "unknown class label(s) [-1]"),
    ({"class_label": 3, "steps": 21}, 422, "steps must be in 1..20"),
    ({"class_label": 3, "steps": 0}, 422, "steps must be in 1..20"),
    ({"class_label": 3, "num_images": 5}, 422, "num_images must be in 1..4"),
    ({"class_label": [1, 2, 3, 4, 5]}, 422, "at most 4 images"),
    ({"class_label": [1, 2], "num_images": 3}, 422, "must equal the number of class labels"),
    ({"class_label": 3, "seed": -1}, 422, "seed must be in"),
    ({"class_label": 3, "guidance": 1e9}, 422, "guidance must be in"),
])
def test_bad_requests_are_refused_with_a_reason(body, status, words):
    with pytest.raises(RequestError) as e:
        parse_request(body, 10, LIMITS)
    assert e.value.status == status and words in str(e.value), (e.value.status, str(e.value))


def test_request_error_keeps_its_status_across_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(RequestError("too many", 422)))
    assert isinstance(e, DitmergeError) and e.status == 422 and str(e) == "too many"


def test_a_missing_seed_is_drawn_fresh():
    assert len({parse_request({"class_label": 1}, 10).seed for _ in range(5)}) > 1


def test_batched_requests_equal_direct_generation(served_plan, direct):
    """Mixed seeds, counts and shapes in one call: each request gets exactly its images from sample_classes."""
    service = PlanService(served_plan, threads=1, limits=LIMITS)
    requests = [GenerationRequest((3,), 11, 4, 4.0), GenerationRequest((5, 7), 12, 4, 4.0),
                GenerationRequest((3,), 13, 6, 4.0), GenerationRequest((1, 1, 1), 11, 4, 4.0),
                GenerationRequest((9,), 14, 4, 1.0)]
    results = service.generate(requests)
    for req, images in zip(requests, results):
        want = direct(req.labels, req.seed, req.steps, req.guidance)
        assert images.dtype == np.uint8 and images.shape == (len(req.labels), 32, 32, 3)
        assert np.array_equal(images, want), f"{req}: max diff {np.abs(images.astype(int) - want).max()}"
    # three shapes: (4, 4.0) x 3 requests in one loop, (6, 4.0), (4, 1.0)
    assert service.stats == {"requests": 5, "images": 8, "batches": 1, "loops": 3, "largest_loop": 3, "errors": 0}
    # the same seed but another partition seed gives other images: the partition stream is in play
    other = PlanService(served_plan, threads=1, limits=LIMITS, partition_seed=1).generate(requests[:1])[0]
    assert not np.array_equal(other, results[0])
    assert np.array_equal(other, direct((3,), 11, 4, 4.0, partition_seed=1))


def test_a_service_without_prepacking_holds_unpacked_sessions_and_answers_alike(served_plan):
    """--no-prepack: every bucket session reads the shared weights unpacked; images match the default within 1 level."""
    req = [GenerationRequest((3, 5), 11, 4, 4.0)]
    packed = PlanService(served_plan, threads=1, limits=LIMITS)
    unpacked = PlanService(served_plan, threads=1, limits=LIMITS, prepack=False)
    a, b = packed.generate(req)[0], unpacked.generate(req)[0]
    runners = list(unpacked.transformer._runners.values())
    assert runners and all(r.prepack is False for r in runners)
    assert all(r.prepack for r in packed.transformer._runners.values())
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_sample_batch_equals_sample_classes_in_float(served_plan):
    import runtime
    from runtime.generate import sample_batch, sample_classes

    tf = runtime.load(served_plan, threads=1)
    jobs = [([2, 4], 3), ([6], 4)]
    batched = sample_batch(tf, jobs, steps=3, guidance=3.0, partition_seed=5)
    for (labels, seed), got in zip(jobs, batched):
        alone = sample_classes(tf, labels, steps=3, guidance=3.0, seed=seed, progress=False, partition_seed=5)
        assert np.array_equal(got, alone), float(np.abs(got - alone).max())


def test_answers_are_png_for_one_image_and_json_for_several():
    req = GenerationRequest((3, 4), 8, 4, 4.0)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    media, body, headers = answer(GenerationRequest((3,), 8, 4, 4.0), images[:1], want_json=False)
    assert media == "image/png" and np.array_equal(decode_png(body), images[0]) and headers["x-seed"] == "8"
    media, body, _ = answer(req, images, want_json=False)
    data = json.loads(body)
    assert media == "application/json" and data["seed"] == 8 and data["class_label"] == [3, 4]
    assert all(np.array_equal(decode_png(base64.b64decode(s)), im) for s, im in zip(data["images"], images))


def test_only_class_conditional_pixel_plans_are_served(tmp_path):
    def plan(family, config):
        return Plan(tmp_path, {"format_version": 3, "model": {"family": family, "config": config, "grid": [2, 2]},
                               "weights": {"file": "weights.bin", "sha256": ""}, "method": {"name": "none"},
                               "buckets": []})

    check_servable(plan("dit", {"num_embeds_ada_norm": 10, "in_channels": 3}))
    with pytest.raises(DitmergeError, match="text-conditioned pixart"):
        check_servable(plan("pixart", {"num_embeds_ada_norm": 1000, "in_channels": 4}))
    with pytest.raises(DitmergeError, match="4-channel latent space"):
        check_servable(plan("dit", {"num_embeds_ada_norm": 1000, "in_channels": 4}))


def test_serve_cli_without_ray_says_how_to_install(monkeypatch, capsys, served_plan):
    from runtime.__main__ import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "runtime.serve", raising=False)
    assert main(["serve", "--plan", str(served_plan)]) == 1
    err = capsys.readouterr().err
    assert "pip install 'ditmerge[serve]'" in err and "Traceback" not in err


def test_serve_cli_refuses_a_broken_plan_before_starting_ray(tmp_path, capsys):
    pytest.importorskip("ray", reason="the serve extra (Ray Serve) is not installed")
    import ray

    from runtime.__main__ import main
    from tests.serve.conftest import shutdown_ray

    shutdown_ray()  # the precondition, whatever ran before
    assert main(["serve", "--plan", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is not a plan: plan.json is missing" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_the_core_package_does_not_import_ray():
    import subprocess

    code = ("import sys, runtime, runtime.service, runtime.generate, runtime.__main__, export.build; "
            "sys.exit('ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing ditmerge imported Ray: {proc.stderr[-2000:]}"


def _tiny_vae(folder) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=8).save_pretrained(folder)


def test_a_latent_plan_is_served_through_its_vae(tmp_path):
    """A latent class-conditional plan (DiT-XL/2's shape, tiny) with a VAE folder: images equal direct
    generation decoded by that VAE, whatever the batch; without a VAE the plan is refused."""
    import runtime
    from export.build import build_plan
    from runtime.generate import sample_classes, to_uint8
    from runtime.service import decode, load_vae
    from tests.helpers import tiny_dit

    tiny_dit(sample_size=8, num_classes=10).save_pretrained(tmp_path / "model" / "transformer")
    _tiny_vae(tmp_path / "pipe" / "vae")
    build_plan(str(tmp_path / "model"), buckets="0.5", out=tmp_path / "plan", measure=False, progress=False)
    with pytest.raises(DitmergeError, match="latent space"):
        PlanService(tmp_path / "plan")
    service = PlanService(tmp_path / "plan", vae=str(tmp_path / "pipe"), limits=LIMITS)
    requests = [GenerationRequest((1, 2), 5, 4, 4.0), GenerationRequest((7,), 6, 4, 4.0)]
    tf, vae = runtime.load(tmp_path / "plan"), load_vae(str(tmp_path / "pipe" / "vae"))
    for req, images in zip(requests, service.generate(requests)):
        x = sample_classes(tf, list(req.labels), steps=4, guidance=4.0, seed=req.seed, progress=False, partition_seed=0,
                           scheduler_config=tf.plan.model.get("scheduler"))
        assert images.shape == (len(req.labels), 8, 8, 3)
        assert np.array_equal(images, to_uint8(decode(vae, x)))


def test_serve_cli_prints_the_library_call(capsys):
    from runtime.__main__ import main

    assert main(["serve", "--plan", "p", "--replicas", "3", "--batch-wait-ms", "50", "--num-gpus", "1",
                 "--max-images", "2", "--vae", "facebook/DiT-XL-2-256", "--print-python"]) == 0
    out = capsys.readouterr().out
    for part in ("serve_plan('p'", "replicas=3", "batch_wait_timeout_s=0.05", "num_gpus=1.0",
                 "limits=Limits(max_steps=100, max_images=2)", "vae='facebook/DiT-XL-2-256'", "blocking=True"):
        assert part in out, (part, out)


# tiny plans of the other methods: (build_plan arguments, whether requests share a loop)
METHOD_PLANS = {
    "catome": (dict(method="catome", buckets="0.5,0.3", options={"threshold": 0.5, "statistic": "median",
                                                                   "calib_samples": 3, "calib_steps": 10}), True),
    "atedm": (dict(method="atedm", buckets="0.3,0.5", options={"prune_layer": 0, "stride": 1, "iterations": 2}), True),
    "sdtm": (dict(method="sdtm", options={"steps": "10", "switch_step": "4"}), False),
    # a fixed cache schedule decides the same for every row; the adaptive rule reads the worst row's change
    "cache": (dict(method="cache", options={"interval": "2"}), True),
    "cache-adaptive": (dict(method="cache", options={"adaptive": 0.05}), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_PLANS))
def test_every_method_serves_each_request_its_own_images(method, tmp_path):
    """Requests of one shape share a loop only where the method keeps batch rows apart; either way each
    gets exactly the images of direct generation (SDTM's partition sums counters over the batch, so
    sharing would change them)."""
    import runtime
    from export.build import build_plan
    from runtime.generate import sample_classes, to_uint8
    from runtime.service import decode, load_vae
    from tests.helpers import tiny_dit

    kwargs, shares = METHOD_PLANS[method]
    _tiny_vae(tmp_path / "vae")
    tiny_dit(sample_size=8, layers=3, num_classes=10, seed=1).save_pretrained(tmp_path / "model" / "transformer")
    build_plan(str(tmp_path / "model"), out=tmp_path / "plan", measure=False, quality_samples=0, progress=False,
               **kwargs)
    service = PlanService(tmp_path / "plan", limits=LIMITS, vae=str(tmp_path / "vae"))
    requests = [GenerationRequest((2, 4), 3, 10, 3.0), GenerationRequest((6,), 4, 10, 3.0),
                GenerationRequest((1, 1, 1), 9, 10, 3.0)]
    tf, vae = runtime.load(tmp_path / "plan"), load_vae(str(tmp_path / "vae"))
    for req, images in zip(requests, service.generate(requests)):
        x = sample_classes(tf, list(req.labels), steps=10, guidance=3.0, seed=req.seed, progress=False,
                           partition_seed=0, scheduler_config=tf.plan.model.get("scheduler"))
        assert np.array_equal(images, to_uint8(decode(vae, x))), f"{method}: {req}"
    assert service.shares_loops is shares and service.stats["loops"] == (1 if shares else 3)
