"""The pass contract: ``call(model) -> PassResult(model, modified)`` and a small manager.

Modelled on the onnx_ir / torch.fx pass infrastructure: a pass declares whether it works in place,
may check pre/postconditions, and the manager names the failing pass and the passes before it.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx

from passes.errors import DitmergeError
from passes.onnxutil import provenance

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool


class GraphPass:
    """Base class of every ONNX -> ONNX pass.

    Subclasses implement :meth:`call`. Passes are functional: they return a new ModelProto and
    leave their input untouched, so a failed pass never leaves a half-edited graph behind.
    """

    name: str = "pass"

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise if the input graph does not satisfy this pass's preconditions."""

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise if the output graph does not satisfy this pass's postconditions."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result


class StampedPass(GraphPass):
    """A pass that inserts a subgraph and stamps every node it inserts with :meth:`stamp` (provenance).

    The contract, once for every method's pass: :meth:`requires` validates the configuration against the
    graph; a graph that already carries this pass's stamp is returned unchanged (running a pass twice is a
    no-op), and one stamped by this pass with other settings is refused, since merging an already merged
    graph would compound the two.
    """

    carries: str = "this pass"  # what a stamped graph carries, for the refusal: "a ToMe merge"
    apply_to: str = "the unmerged graph"

    def __init__(self, config, bucket: int | str = "") -> None:
        """``config``: the method's settings (a dataclass with ``validate``); ``bucket``: for the stamp."""
        self.config = config
        self.bucket = bucket

    def stamp(self) -> dict:
        """What the inserted nodes depend on (and nothing per bucket that the graph does not hold)."""
        raise NotImplementedError

    # passes of one namespace count each other's stamps (recorded in the stamp's "namespace"): ToMe and
    # CA-ToMe share one, so a graph carries at most one token merge; "" means the pass's own name only
    namespace: str = ""

    def owns(self, stamp: dict) -> bool:
        """Whether a stamp found in the graph counts as this pass's."""
        return stamp.get("pass") == self.name or bool(self.namespace) and stamp.get("namespace") == self.namespace

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        stamps = [s for s in provenance(model) if self.owns(s)]
        if stamps:
            if all(s == self.stamp() for s in stamps):
                return PassResult(model, False)
            raise DitmergeError(f"the graph already carries {self.carries} ({stamps[0]}); apply passes to "
                                f"{self.apply_to}")
        result = self.call(model)
        self.ensures(result.model)
        return result


class PassManager:
    """Runs passes in order, repeating the sequence until nothing changes (at most ``steps`` times)."""

    def __init__(self, passes: list[GraphPass], steps: int = 1) -> None:
        self.passes = passes
        self.steps = steps

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        modified_any = False
        for _ in range(self.steps):
            modified = False
            done: list[str] = []
            for p in self.passes:
                try:
                    result = p(model)
                except Exception as e:
                    e.add_note(f"when running the {p.name!r} pass after the passes {done}")
                    raise
                logger.debug("pass %s modified=%s", p.name, result.modified)
                model = result.model
                modified |= result.modified
                done.append(p.name)
            modified_any |= modified
            if not modified:
                break
        return PassResult(model, modified_any)
