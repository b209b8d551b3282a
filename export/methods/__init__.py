"""Merge methods as plug-ins of the plan builder.

A method turns the unmerged graph into one or more graphs per timestep bucket and says how to check
each against its eager twin. Its runtime half (which graph runs at which step, with which extra inputs,
and what state carries between steps) is the policy of the same name in :mod:`runtime.policies`.

A method lives in ``export/methods/<name>.py`` and defines ``METHOD``, a :class:`Method` subclass; the
builder finds it by name, so adding a method touches no shared file.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path

import numpy as np
import onnx
import torch

from export.buckets import DEFAULT_BUCKETS, BucketSpec, parse_buckets
from passes.errors import DitmergeError

from runtime.policies import MAIN  # noqa: F401 - the variant a bucket runs on an ordinary step; one name for both halves


@dataclasses.dataclass
class BuildContext:
    """What a method may read while it builds: the eager model, the unmerged graph, the geometry."""

    torch_model: torch.nn.Module
    family: object  # export.families.Family
    grid: tuple[int, int]
    text_len: int
    num_train_timesteps: int
    base: onnx.ModelProto  # cleaned, unmerged; weights external in stage/weights.bin
    stage: Path
    progress: bool = True

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclasses.dataclass
class BucketGraphs:
    """A bucket's graphs by variant (None: the unmerged base graph) and what the runtime needs to run them.

    ``meta`` is written to the plan as the bucket's ``method_meta``; the runtime policy reads it.
    ``counts`` are the token counts the graphs take as input lengths (:mod:`passes.counts`): buckets
    whose graphs are identical once their counts are inputs share one graph file.
    """

    graphs: dict[str, onnx.ModelProto | None]
    meta: dict
    r: int  # tokens removed at the deepest merge point of the MAIN variant
    kept_tokens: int
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    flops: int | None = None  # of the MAIN variant at ``counts``, counted before variants are joined


class Method:
    """Base class of a merge method. Subclasses set ``name`` and implement :meth:`build_bucket`."""

    name = ""
    #: options this method takes (name -> default); ``--option KEY=VALUE`` on the command line
    defaults: dict[str, object] = {}
    #: the bucket spec used when the user gives none
    default_buckets: str = DEFAULT_BUCKETS
    #: families (export.families names) this method refuses, with the reason; README's family x method matrix
    unsupported: dict[str, str] = {}
    #: a bucket's variants become the branches of one graph (passes/branch.py): one session / engine for all
    one_graph: bool = False

    def __init__(self, options: dict[str, object] | None = None) -> None:
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise DitmergeError(f"method {self.name!r} has no option(s) {', '.join(unknown)}; it takes "
                                f"{', '.join(sorted(self.defaults)) or 'none'}")
        self.options = {k: _coerce(k, options.get(k, v), v) for k, v in self.defaults.items()}

    def params(self) -> dict:
        """The method's parameters as recorded in the plan (``method.params``)."""
        return dict(self.options)

    def bucket_specs(self, buckets: str, num_train_timesteps: int, model: str, family=None,
                     grid: tuple[int, int] | None = None) -> list[BucketSpec]:
        """The buckets to build, noisiest first; the default reads the ``--buckets`` spec.

        ``model`` is the model source, for methods whose buckets come from training (MoD); ``family``
        (export.families.Family) and ``grid``, for methods placed on the pipeline's timesteps (SDTM).
        """
        return parse_buckets(buckets, num_train_timesteps)

    def validate(self, specs: list[BucketSpec], grid: tuple[int, int]) -> None:
        """Refuse bad ratios or options before any graph is built (the model is loaded, nothing exported)."""

    def check_family(self, family) -> None:
        """Refuse a model family the method does not support, before anything is exported."""
        if family.name in self.unsupported:
            from export.families import FAMILIES

            ok = [f.name for f in FAMILIES.values() if f.name not in self.unsupported]
            raise DitmergeError(f"method {self.name!r} does not support {family.class_name} ({family.name}): "
                                f"{self.unsupported[family.name]}; it supports {', '.join(ok)}")

    def prepare(self, ctx: BuildContext) -> None:
        """Work shared by all buckets (calibration, loading trained routers); runs once per build."""

    def stamp(self, spec: BucketSpec, index: int) -> dict:
        """What a bucket's graphs depend on; a resumed build reuses graphs whose stamp matches."""
        return {"method": self.name, "index": index, "spec": dataclasses.asdict(spec), "options": self.params()}

    def build_bucket(self, ctx: BuildContext, spec: BucketSpec, index: int) -> BucketGraphs:
        raise NotImplementedError

    def extra_feed(self, ctx: BuildContext, meta: dict, variant: str, batch: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs of a variant beyond the model's own (partitions, caches, counters), for measurement."""
        return {}

    def fidelity(self, ctx: BuildContext, meta: dict, variant: str, run, inputs: dict[str, torch.Tensor]) -> float:
        """Max abs error of a variant's graph against the eager twin; ``run(feed) -> outputs``."""
        raise NotImplementedError


def _coerce(key: str, value: object, default: object) -> object:
    """Options arrive as strings from the command line; give them the default's type."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (tuple, list)):
            items = [s.strip() for s in value.split(",") if s.strip()]
            kind = type(default[0]) if default else str
            return tuple(kind(s) for s in items)
    except ValueError:
        raise DitmergeError(f"option {key}={value!r}: expected {type(default).__name__} like {default!r}") from None
    return value


def available_methods() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_method(name: str, options: dict[str, object] | None = None) -> Method:
    """The method called ``name``, configured with ``options``.

    A built-in name (``export/methods/<name>.py``), or the dotted path of any importable module that defines
    ``METHOD`` (and, for its run-time half, ``POLICY``: :func:`runtime.policies.policy_for` imports the same
    path): a method of one's own plugs in without editing this package.
    """
    if "." in name:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise DitmergeError(f"method module {name!r} cannot be imported: {e}") from e
        if not isinstance(getattr(module, "METHOD", None), type) or not issubclass(module.METHOD, Method):
            raise DitmergeError(f"method module {name!r} defines no METHOD (a export.methods.Method subclass)")
        method = module.METHOD(options)
        method.name = name  # the plan records the path, so the runtime finds the policy beside it
        return method
    if name not in available_methods():
        raise DitmergeError(f"unknown method {name!r}; available: {', '.join(available_methods())} "
                            "(or the dotted path of a module defining METHOD)")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.METHOD(options)
