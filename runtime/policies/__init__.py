"""The runtime half of a merge method: per denoising step, which graph variant runs with which inputs.

A policy sees one generation at a time through :class:`GenState` (one per thread, reset when a new
denoising loop starts): the step count, a seeded random stream, and a dict for method state (caches,
counters) that carries from one step to the next. Policies live in ``runtime/policies/<method>.py``
and define ``POLICY``; a method without one runs its buckets' main graph with no extra inputs.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

from passes.errors import DitmergeError

MAIN = "main"


@dataclasses.dataclass
class GenState:
    """One generation's cross-step state."""

    seed: int
    rng: np.random.Generator
    steps: int = 0  # calls made so far in this generation
    t: float | None = None  # the current call's timestep on the training scale (0..num_train_timesteps-1; flow: ..T)
    context: str | None = None  # the pipeline's cache_context of the call ("cond", "uncond"), when it gives one
    data: dict = dataclasses.field(default_factory=dict)


class StepPolicy:
    """Base policy: every step runs the bucket's main graph with no extra inputs."""

    # each batch row's result depends only on that row (and the shared partition): requests served together
    # may share one denoising loop and still get exactly their own images (runtime/service.py; tests/serve
    # checks every method that says so)
    rows_independent = False

    def __init__(self, plan, deterministic: bool = False) -> None:
        self.plan = plan
        self.deterministic = deterministic  # fixed partitions / no random draws, for reproducible checks
        self.grid = tuple(plan.record.model.grid)
        self.params = plan.record.method.params

    def start(self, state: GenState) -> None:
        """A new generation begins (state is fresh)."""

    def select(self, state: GenState, bucket, batch: int) -> tuple[str, dict[str, np.ndarray]]:
        """The variant to run at this step and its extra inputs."""
        return MAIN, {}

    def update(self, state: GenState, bucket, variant: str, outputs: dict[str, np.ndarray]) -> None:
        """Take what the step's graph returned beyond ``sample`` into the generation's state."""


def policy_for(plan, deterministic: bool = False) -> StepPolicy:
    """The policy of the plan's method: ``runtime/policies/<name>.py``, or for a plug-in method (a dotted
    module path, :func:`export.methods.get_method`) that module's ``POLICY``; the base policy where there is none."""
    name = plan.record.method.name
    path = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name != path:
            raise
        if "." in name:
            raise DitmergeError(f"the plan's method module {name!r} is not importable here; install it where the "
                                "plan runs") from e
        return StepPolicy(plan, deterministic)
    if "." in name and not hasattr(module, "POLICY"):
        return StepPolicy(plan, deterministic)
    if not hasattr(module, "POLICY"):
        raise DitmergeError(f"runtime policy module for method {name!r} defines no POLICY")
    return module.POLICY(plan, deterministic)
