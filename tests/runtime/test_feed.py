"""One input check for numpy feeds (onnxruntime) and torch feeds (device runners), and its signature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from passes.errors import DitmergeError
from runtime.runners import InputCheck, torch_feed

INPUTS = {"hidden_states": (np.dtype(np.float32), ["batch", 4, 8, 8]),
          "timestep": (np.dtype(np.int64), ["batch"]),
          "class_labels": (np.dtype(np.int64), ["batch"]),
          "encoder_hidden_states": (np.dtype(np.float32), ["batch", "text", 16]),
          "cache": (np.dtype(np.float32), ["batch", 16, 8])}


def _good(batch: int = 2, text: int = 5) -> dict:
    return {"hidden_states": torch.randn(batch, 4, 8, 8), "timestep": torch.tensor(500),
            "class_labels": torch.arange(batch), "encoder_hidden_states": torch.randn(batch, text, 16)}


EXTRA = {"cache": np.zeros((2, 16, 8), np.float32)}

# (what is wrong, change to the good call, message); the message is the same on both paths
BAD = [
    ("wrong batch in one input", {"class_labels": torch.arange(3)},
     "input 'class_labels' has batch 3, other inputs have batch 2 ('hidden_states')"),
    ("a float with a fraction for an int input", {"class_labels": torch.tensor([1.5, 2.0])},
     "input 'class_labels' has dtype"),
    ("missing input", {"class_labels": None},
     "the plan's graph needs input 'class_labels' ['batch'], which the call did not give"),
    ("static dim", {"hidden_states": torch.randn(2, 4, 9, 8)},
     "input 'hidden_states' has shape [2, 4, 9, 8]; the graph takes ['batch', 4, 8, 8] (axis 2 must be 8) REBUILD"),
    ("rank", {"hidden_states": torch.randn(2, 4, 8)}, "input 'hidden_states' has shape [2, 4, 8]; the graph takes"),
    ("complex values", {"hidden_states": torch.randn(2, 4, 8, 8, dtype=torch.complex64)},
     "input 'hidden_states' has dtype"),
    ("three timesteps for a batch of two", {"timestep": torch.tensor([1, 1, 1])},
     "input 'timestep' has batch 3, other inputs have batch 2 ('hidden_states')"),
]


def _check() -> InputCheck:
    return InputCheck(INPUTS, hint=lambda name: " REBUILD" if name == "hidden_states" else "")


@pytest.mark.parametrize("device_io", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("what, change, message", BAD, ids=[b[0] for b in BAD])
def test_both_paths_refuse_the_same_inputs(device_io, what, change, message):
    check = _check()
    check.feed(_good(), EXTRA, device_io=device_io)  # a valid call first: its signature is cached
    values = {**_good(), **change}
    with pytest.raises(DitmergeError) as err:
        check.feed(values, EXTRA, device_io=device_io)
    assert str(err.value).startswith(message), str(err.value)


def test_dynamic_dims_are_bound_by_name_on_both_paths():
    """A prompt axis that disagrees between two inputs is refused; one that is the same in all is any length."""
    inputs = {**INPUTS, "mask": (np.dtype(np.int64), ["batch", "text"])}
    for device_io in (False, True):
        check = InputCheck(inputs)
        for text in (3, 7):  # any prompt length, as long as the inputs agree
            check.feed({**_good(text=text), "mask": torch.ones(2, text, dtype=torch.int64)}, EXTRA, device_io=device_io)
        with pytest.raises(DitmergeError, match=r"input 'mask' has text length 4, other inputs have text length 7 "
                                                r"\('encoder_hidden_states'\)"):
            check.feed({**_good(text=7), "mask": torch.ones(2, 4, dtype=torch.int64)}, EXTRA, device_io=device_io)


def test_the_signature_cache_never_skips_a_check():
    """Same shapes and dtypes: cached. Any other shape, or a float with a fraction under a cached signature: refused."""
    for device_io in (False, True):
        check = _check()
        check.feed(_good(), EXTRA, device_io=device_io)
        check.feed(_good(), EXTRA, device_io=device_io)
        assert len(check._known) == 1, "a repeated signature must be served from the cache"
        # a different batch in one input only: a new signature, checked in full
        with pytest.raises(DitmergeError, match="has batch 3, other inputs have batch 2"):
            check.feed({**_good(), "class_labels": torch.arange(3)}, EXTRA, device_io=device_io)
        # whole floats for the int labels pass and are cached; fractions with the very same signature are refused
        check.feed({**_good(), "class_labels": torch.tensor([1.0, 2.0])}, EXTRA, device_io=device_io)
        with pytest.raises(DitmergeError, match="'class_labels' has dtype"):
            check.feed({**_good(), "class_labels": torch.tensor([1.0, 2.5])}, EXTRA, device_io=device_io)
        # a new batch for every input at once is fine (dynamic), but the cached extra input of batch 2 is not checked:
        # the policy's inputs pass through as they are
        feed = check.feed(_good(batch=3), {"cache": np.zeros((3, 16, 8), np.float32)}, device_io=device_io)
        assert tuple(feed["timestep"].shape) == (3,)
        with pytest.raises(DitmergeError, match=r"axis 2 must be 8"):
            check.feed({**_good(), "hidden_states": torch.randn(2, 4, 7, 8)}, EXTRA, device_io=device_io)


def test_numpy_feed_casts_broadcasts_and_copies_nothing():
    check = _check()
    values = _good()
    for _ in range(2):  # uncached, then cached: the same feed
        feed = check.feed({**values, "class_labels": torch.tensor([3.0, 4.0])}, EXTRA)
        assert feed["class_labels"].dtype == np.int64 and feed["class_labels"].tolist() == [3, 4]
        assert feed["timestep"].dtype == np.int64 and feed["timestep"].tolist() == [500, 500]
        assert feed["hidden_states"].dtype == np.float32
        # a CPU tensor of the graph's dtype reaches onnxruntime without a host copy
        assert np.shares_memory(feed["hidden_states"], values["hidden_states"].numpy())
        assert feed["cache"] is EXTRA["cache"]
    # a non-contiguous input keeps its values (onnxruntime makes its own contiguous copy)
    hs = torch.randn(2, 8, 8, 4).permute(0, 3, 1, 2)
    feed = check.feed({**values, "hidden_states": hs}, EXTRA)
    assert np.array_equal(feed["hidden_states"], hs.numpy())


def test_torch_feed_keeps_tensors_where_they_are():
    values = _good()
    cache = torch.zeros(2, 16, 8)
    for _ in range(2):
        feed = torch_feed(INPUTS, values, {"cache": cache})
        assert feed["hidden_states"].data_ptr() == values["hidden_states"].data_ptr()
        assert feed["cache"].data_ptr() == cache.data_ptr()
        assert feed["timestep"].shape == (2,) and feed["timestep"].tolist() == [500, 500]
    check = InputCheck(INPUTS)
    feed = check.feed({**values, "class_labels": torch.tensor([3.0, 4.0])}, {"cache": cache}, device_io=True)
    assert feed["class_labels"].dtype == torch.float32  # the runner casts, on the device


def test_plan_forward_refuses_a_bad_call_after_good_ones(tmp_path):
    """Through PlanTransformer: valid calls fill the cache; a later call with one wrong batch is still refused,
    and the outputs of cached calls equal those of a fresh plan."""
    import runtime
    from export.build import build_plan
    from tests.helpers import tiny_dit

    tiny_dit(sample_size=8).save_pretrained(tmp_path / "model")
    build_plan(str(tmp_path / "model"), buckets="0", out=tmp_path / "plan", measure=False, progress=False)
    tf = runtime.load(tmp_path / "plan", backend="cpu")
    x = torch.randn(2, 4, 8, 8)
    first = tf(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2])).sample
    again = tf(x, timestep=torch.tensor(10).expand(2), class_labels=torch.tensor([1, 2])).sample
    assert torch.equal(first, again)
    with pytest.raises(DitmergeError, match="has batch 3, other inputs have batch 2"):
        tf(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2, 3]))
    with pytest.raises(DitmergeError, match="dtype"):
        tf(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1.5, 2.0]))
    with pytest.raises(DitmergeError, match="fall in different buckets"):
        tf(x, timestep=torch.tensor([10.0, float("nan")]), class_labels=torch.tensor([1, 2]))
    fresh = runtime.load(tmp_path / "plan", backend="cpu")
    assert torch.equal(fresh(x, timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 2])).sample, first)
