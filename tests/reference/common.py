"""Glue shared by the reference tests: run a pass on a tiny exported model, feed it, draw tomesd's dst choice."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from export.onnx_export import eager_forward, example_inputs
from passes.onnxutil import save_checked
from passes.partition import layout
from runtime.runners import OrtRunner, SharedWeights

from tests.helpers import assert_close

logger = logging.getLogger("tests.reference")

REFERENCE_ATOL = 1e-4  # fp32 graph vs the independent reference


def check(actual: np.ndarray, expected: np.ndarray, what: str) -> float:
    """Max abs error within REFERENCE_ATOL (logged: ``pytest -o log_cli=true --log-cli-level=INFO`` shows it)."""
    err = assert_close(actual, expected, REFERENCE_ATOL, what)
    logger.info("%s: max abs error %.2e", what, err)
    return err


def runner(d: Path, model: onnx.ModelProto, name: str) -> OrtRunner:
    save_checked(model, d / name)
    return OrtRunner(d / name, ["CPUExecutionProvider"], SharedWeights(d / "weights.bin"))


def inputs(model: torch.nn.Module, batch: int, grid: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    return example_inputs(model, batch, grid, seed=seed)


def feed(inp: dict[str, torch.Tensor], **extra: np.ndarray) -> dict[str, np.ndarray]:
    return {**{k: v.numpy() for k, v in inp.items()}, **extra}


def eager(model: torch.nn.Module, inp: dict[str, torch.Tensor]) -> np.ndarray:
    return eager_forward(model, inp).numpy()


def rand_idx(grid: tuple[int, int], seed: int) -> torch.Tensor:
    """tomesd's per-cell dst choice (2x2 cells), drawn here rather than by the runtime."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (grid[0] // 2, grid[1] // 2), generator=g)


def partition_feed(grid: tuple[int, int], idx: torch.Tensor, bands: int = 1) -> dict[str, np.ndarray]:
    """The same dst choice in the layout the graphs take (``tome_partition`` and its inverse)."""
    h, w = grid
    cy, cx = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    i = idx.numpy()
    dst = ((cy * 2 + i // 2) * w + cx * 2 + i % 2).reshape(-1).astype(np.int64)
    part, inv = layout(grid, dst, bands)
    return {"tome_partition": part, "tome_partition_inv": inv}


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
