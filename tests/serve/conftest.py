from __future__ import annotations

import sys

import pytest


def shutdown_ray() -> None:
    """Stop Serve and Ray if this process runs them; a no-op where Ray is not installed or not up."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def no_ray_left_over():
    """Every module starts and ends without a Ray cluster in this process, whatever an earlier one left."""
    shutdown_ray()
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def served_plan(tmp_path_factory):
    """The bundled model with two merged buckets: the partition stream matters, so tests see its handling."""
    from export.build import build_plan

    out = tmp_path_factory.mktemp("served") / "plan"
    build_plan(model="bundled:tiny-dit", buckets="999-500:0.5,499-0:0.3", out=out, measure=False, progress=False)
    return out


@pytest.fixture(scope="session")
def direct(served_plan):
    """What a served request must equal: sample_classes through runtime.load, the deployment's partition seed."""
    import runtime
    from runtime.generate import sample_classes, to_uint8

    tf = runtime.load(served_plan, threads=1)
    cache: dict = {}

    def images(labels, seed: int, steps: int, guidance: float, partition_seed: int = 0):
        key = (tuple(labels), seed, steps, guidance, partition_seed)
        if key not in cache:
            cache[key] = to_uint8(sample_classes(tf, list(labels), steps=steps, guidance=guidance, seed=seed,
                                                 scheduler_config=tf.plan.model.get("scheduler"), progress=False,
                                                 partition_seed=partition_seed))
        return cache[key]

    return images
