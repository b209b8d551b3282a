"""Plans of the tiny pipeline transformers, built once per session and shared by the pipeline tests."""

from __future__ import annotations

import pytest

from tests.pipelines.components import RECIPES

# ToMe per family: where it merges (Flux: the image-stream MLP; its joint attention carries rotary
# embeddings over the whole sequence) and two buckets of different r, so both are crossed in one generation
TOME = {
    "dit": ("attn",), "pixart-alpha": ("attn",), "pixart-sigma": ("attn",), "sd3": ("joint",),
    "flux": ("mlp",), "flux-guidance": ("mlp",),
}
TOME_BUCKETS = "0.5,0.25"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The eager tiny models run on one intra-op thread: their ops are too small to split, and on shared
    cores the idle-waiting threads made an eager forward ~20x slower (90 ms against 4 ms for the tiny DiT)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pipeline_plans(tmp_path_factory):
    """(recipe name, "unmerged" | "tome") -> (model folder, plan folder), built on first use."""
    from export.build import build_plan

    cache: dict = {}

    def get(name: str, kind: str):
        key = (name, kind)
        if key not in cache:
            recipe = RECIPES[name]
            if (name, "model") not in cache:
                d = tmp_path_factory.mktemp(f"model_{name}")
                recipe.make_transformer().save_pretrained(d / "transformer")
                recipe.make_scheduler().save_pretrained(d / "scheduler")
                cache[(name, "model")] = d
            model = cache[(name, "model")]
            out = tmp_path_factory.mktemp(f"plan_{name}_{kind}")
            if kind == "unmerged":
                build_plan(str(model), buckets="0", out=out, measure=False, progress=False)
            else:
                build_plan(str(model), buckets=TOME_BUCKETS, locations=TOME[name], out=out, measure=False,
                           progress=False)
            cache[key] = (model, out)
        return cache[key]

    return get
