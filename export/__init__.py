"""Turn a diffusers DiT into a ditmerge plan: ONNX export, merge passes per timestep bucket, report."""

from export.build import build_plan
from export.load import load_transformer
from passes.errors import DitmergeError

__all__ = ["DitmergeError", "build_plan", "load_transformer"]
