"""The runtime beyond DiTPipeline: PixArt calls through a plan, and concurrent generations."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import runtime
from export.build import build_plan
from export.onnx_export import eager_forward, example_inputs
from tests.helpers import EXPORT_ATOL, tiny_pixart


def test_pixart_plan_stands_in_for_the_transformer(tmp_path):
    model = tiny_pixart(sample_size=8)
    model.save_pretrained(tmp_path / "pixart")
    build_plan(str(tmp_path / "pixart"), buckets="0", out=tmp_path / "plan", measure=False, progress=False)
    tf = runtime.load(tmp_path / "plan")
    x = example_inputs(model, 2, (4, 4), seed=4)
    out = tf(x["hidden_states"], timestep=x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
             encoder_attention_mask=x["encoder_attention_mask"], added_cond_kwargs={"resolution": None,
                                                                                     "aspect_ratio": None}).sample
    err = float((out - eager_forward(model, x)).abs().max())
    assert err <= EXPORT_ATOL, f"PixArt through the plan differs from eager by {err:.2e}"
    assert tf.config.caption_channels == 32


@pytest.fixture(scope="module")
def merged_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("conc") / "plan"
    build_plan("builtin:tiny-dit", buckets="0.5,0.3", out=out, measure=False, progress=False)
    return out


def test_concurrent_generations_equal_serial_ones(merged_plan):
    """4 threads x 3 generations on one loaded plan: each result equals its serial twin (per-thread state)."""
    from runtime.generate import sample_classes

    tf = runtime.load(merged_plan)
    jobs = [(t, g) for t in range(4) for g in range(3)]
    run = lambda seed: sample_classes(tf, [seed % 10, 3], steps=6, seed=seed, progress=False)  # noqa: E731
    serial = {job: run(job[0] * 10 + job[1]) for job in jobs}
    results, errors = {}, []

    def worker(t: int) -> None:
        try:
            for g in range(3):
                results[(t, g)] = run(t * 10 + g)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for job in jobs:
        assert np.array_equal(results[job], serial[job]), f"generation {job} differs when run concurrently"
    assert len({r.tobytes() for r in serial.values()}) == len(jobs)


def test_new_generation_restarts_the_partition_stream(merged_plan):
    """Timesteps going up mean a new denoising loop: the same seed gives the same partitions again."""
    tf = runtime.load(merged_plan, seed=3)
    x = torch.randn(1, 4, 32, 32)
    call = lambda t: tf(x, timestep=torch.tensor([t]), class_labels=torch.tensor([1])).sample  # noqa: E731
    first = [call(t) for t in (900, 600, 300)]
    second = [call(t) for t in (900, 600, 300)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # a repeated timestep is not a new generation: the stream goes on and draws a different partition
    assert not torch.equal(call(900), call(900))


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_runtime_feed_of_the_export_call_gives_back_the_example_inputs(family):
    """export/families.py calls the model as pipelines do; runtime/families.py must rebuild the graph inputs
    (names, order, dtypes, values) from that call's arguments."""
    from export.families import family_of
    from runtime.families import family_inputs
    from tests.helpers import FAMILIES

    model = FAMILIES[family][0](FAMILIES[family][1][0])
    x = example_inputs(model, 2, FAMILIES[family][1][0], seed=2)  # checks names and dtypes against runtime.families
    seen = {}

    def record(hidden_states, **kw):
        seen.update(hidden_states=hidden_states, kw=kw)
        return (hidden_states,)

    family_of(model).call(record, x)
    feed = family_inputs(family).feed(seen["hidden_states"], seen["kw"]["timestep"], seen["kw"])
    assert list({k: v for k, v in feed.items() if v is not None}) == list(x)
    assert all(feed[k] is v for k, v in x.items())
    assert set(seen["kw"]) - {"timestep", "return_dict"} <= family_inputs(family).kwargs
