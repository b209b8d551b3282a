"""Fidelity and speed of a plan's graphs, measured against eager PyTorch and the unmerged graph."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from export.onnx_export import eager_forward
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.tome.twin import ToMeTwin
from runtime.runners import OrtRunner


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def feed_of(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


def export_fidelity(model: torch.nn.Module, runner: OrtRunner, inputs: dict[str, torch.Tensor]) -> float:
    """Max abs error of the unmerged graph against the eager model."""
    return max_abs(runner.infer(feed_of(inputs))["sample"], eager_forward(model, inputs).numpy())


def tome_fidelity(model: torch.nn.Module, runner: OrtRunner, inputs: dict[str, torch.Tensor], tome_meta: dict,
                  grid: tuple[int, int], seed: int = 0) -> float:
    """Max abs error of a merged graph against the eager twin with the same partition."""
    bands = tome_meta.get("bands", 1)
    part, inv = draw_partition(grid, tuple(tome_meta["stride"]), np.random.default_rng(seed), bands)
    out = runner.infer({**feed_of(inputs), PARTITION_INPUT: part, PARTITION_INV_INPUT: inv})["sample"]
    twin = ToMeTwin.from_meta(model, tome_meta)
    twin.set_partition(torch.from_numpy(part), torch.from_numpy(inv))
    with twin.installed():
        ref = eager_forward(model, inputs).numpy()
    return max_abs(out, ref)


def interleaved_latency(calls: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2,
                        stat: str = "median") -> dict:
    """Median seconds per call of each callable, run round-robin so drift hits all of them alike.

    ``stat="all"`` returns every round's seconds per callable instead (for minima beside medians).
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    if stat == "all":
        return times
    return {k: statistics.median(v) for k, v in times.items()}
