"""Run a ditmerge plan: per denoising step, the engine of the step's timestep bucket."""

from passes.errors import DitmergeError
from runtime.plan import Plan
from runtime.transformer import PlanTransformer, load

__all__ = ["DitmergeError", "Plan", "PlanTransformer", "load"]
