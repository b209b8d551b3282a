"""The plan manifest (``plan.json``) as typed records: what export writes and the runtime reads.

One description of the format (docs/design.md, 'The plan'): :mod:`export.build` fills these records and
writes :meth:`PlanManifest.to_json`; :class:`runtime.plan.Plan` parses with :meth:`PlanManifest.from_json`,
which refuses a missing or unknown field by name. Free-form sections (the model's diffusers config, the
method's params and per-bucket ``method_meta``, the report, TensorRT engine records) stay plain JSON.
The JSON keys and their order are those of format 3 as written before these records, so plans already
built round-trip unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from passes.errors import DitmergeError

# 3: a bucket is a shape: buckets may share a graph file and carry the ``counts`` fed as input lengths
# (passes/counts.py). Versions 1 and 2 (one graph per bucket) are refused: rebuild them.
FORMAT_VERSION = 3


def _field(default: Any = dataclasses.MISSING, *, key: str | None = None, record: type | None = None,
           shape: str = "one", omit: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    """A record field: ``key`` its JSON name (default: the field's), ``record`` the type of a nested record
    (``shape``: "one", "list" or "dict" of them), ``omit``: left out of the JSON while it holds its default."""
    meta = {"key": key, "record": record, "shape": shape, "omit": omit}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _parse(cls: type, data: object, where: str):
    """``cls`` from its JSON object ``data``; ``where`` names it in the error."""
    if not isinstance(data, dict):
        raise DitmergeError(f"{where} is {type(data).__name__}, not an object; rebuild the plan")
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DitmergeError(f"{where} has unknown field(s) {', '.join(unknown)} (known: {', '.join(fields)}); "
                            "written by another ditmerge version? rebuild the plan")
    missing = [k for k, f in fields.items() if k not in data and _required(f)]
    if missing:
        raise DitmergeError(f"{where} lacks the field(s) {', '.join(missing)}; rebuild the plan")
    kwargs = {}
    for k, value in data.items():
        f = fields[k]
        rec, shape = f.metadata.get("record"), f.metadata.get("shape")
        if rec is not None and shape == "list":
            if not isinstance(value, list):
                raise DitmergeError(f"{where}.{k} is not a list; rebuild the plan")
            value = [_parse(rec, v, f"{where}.{k}[{i}]") for i, v in enumerate(value)]
        elif rec is not None and shape == "dict":
            if not isinstance(value, dict):
                raise DitmergeError(f"{where}.{k} is not an object; rebuild the plan")
            value = {n: _parse(rec, v, f"{where}.{k}.{n}") for n, v in value.items()}
        elif rec is not None:
            value = _parse(rec, value, f"{where}.{k}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _dump(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("omit") and v == (f.default if f.default_factory is dataclasses.MISSING
                                                 else f.default_factory()):
                continue
            out[_key(f)] = _dump(v)
        return out
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


@dataclasses.dataclass(kw_only=True)
class GraphFile:
    """A graph (or weights) file of the plan directory and the sha256 it had when written."""

    file: str
    sha256: str


@dataclasses.dataclass(kw_only=True)
class Bucket:
    """A timestep span and the graphs that run it: what the runtime picks per call, and the build's figures.

    ``t_lo``..``t_hi`` are integer timesteps; ``variants`` (JSON ``graphs``) maps each variant (``main``,
    ``cached``, ...) to its file; ``meta`` (JSON ``method_meta``) is the method's, read by its runtime
    policy; ``counts`` are the token counts fed as count-input lengths (passes/counts.py).
    """

    index: int
    t_lo: int
    t_hi: int
    ratio: float
    r: int = 0
    kept_tokens: int | None = None
    graph: str  # the main variant's file
    flops_rel: float | None = None
    tensorrt_check: list[str] = _field(factory=list)  # violations; empty: TensorRT will take it
    fidelity_max_abs: float | None = None  # the worst variant
    latency_ms: float | None = None  # the main variant
    speedup: float | None = None
    fidelity: dict[str, float] = _field(factory=dict)  # per variant
    variant_latency_ms: dict[str, float] = _field(factory=dict)
    sha256: str
    engines: dict[str, dict] = _field(factory=dict)  # backend -> engine record (TensorRT)
    variants: dict[str, GraphFile] = _field(factory=dict, key="graphs", record=GraphFile, shape="dict")
    meta: dict = _field(factory=dict, key="method_meta")
    counts: dict[str, int] = _field(factory=dict)

    def __post_init__(self) -> None:
        if not self.variants:
            self.variants = {"main": GraphFile(file=self.graph, sha256=self.sha256)}
        self.meta = self.meta or {}
        self.counts = dict(self.counts or {})

    @property
    def graphs(self) -> dict[str, str]:
        """Variant -> graph file: what the runtime opens."""
        return {v: g.file for v, g in self.variants.items()}

    def covers(self, t: float) -> bool:
        """Integer timesteps t_lo..t_hi, and the continuous range [t_lo, t_hi + 1) for float schedules."""
        return self.t_lo <= t < self.t_hi + 1


@dataclasses.dataclass(kw_only=True)
class ModelRecord:
    """The exported transformer: where it came from, its diffusers config, token grid and timestep scale."""

    source: str = ""
    class_name: str = _field("", key="class")
    family: str
    grid: list[int]
    tokens: int | None = None
    text_len: int | None = None
    text_axis: str = "dynamic"
    timestep_scale: float = 1.0  # transformer timestep = scheduler timestep * scale
    timesteps: str | None = None  # "discrete" or "flow"; None: the family's (plans written before the field)
    num_train_timesteps: int = 1000
    config: dict
    scheduler: dict | None = None  # the scheduler config saved beside the model


@dataclasses.dataclass(kw_only=True)
class MethodRecord:
    name: str
    params: dict = _field(factory=dict)


@dataclasses.dataclass(kw_only=True)
class BaseRecord:
    """The unmerged graph every plan keeps (``base.onnx``)."""

    graph: str
    sha256: str
    flops: int | None = None
    tensorrt_check: list[str] = _field(factory=list)


@dataclasses.dataclass(kw_only=True)
class PlanManifest:
    """The whole ``plan.json``."""

    format_version: int
    created: str = ""
    tool_versions: dict[str, str] = _field(factory=dict)
    model: ModelRecord = _field(record=ModelRecord)
    weights: GraphFile = _field(record=GraphFile)
    method: MethodRecord = _field(record=MethodRecord)
    schedule: dict = _field(factory=dict)  # {"buckets": the schedule string it was built from}
    base: BaseRecord | None = _field(None, record=BaseRecord, omit=True)
    buckets: list[Bucket] = _field(record=Bucket, shape="list")
    report: dict = _field(factory=dict)  # the build's measurements (report.md)
    engines: dict[str, dict] = _field(factory=dict, omit=True)  # graph file -> TensorRT engine record

    @classmethod
    def from_json(cls, data: object, where: str = "plan.json") -> PlanManifest:
        """Parse and check a manifest: its format version first, then every record's fields."""
        version = data.get("format_version") if isinstance(data, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DitmergeError(f"{where} has format version {version!r}; this ditmerge reads versions up to "
                                f"{FORMAT_VERSION}: upgrade ditmerge or rebuild the plan")
        if version < FORMAT_VERSION:
            raise DitmergeError(f"{where} has format version {version}, written by an older ditmerge that kept one "
                                f"graph (and one copy of the weights) per bucket; this ditmerge reads version "
                                f"{FORMAT_VERSION}: rebuild the plan with `python -m export` (same arguments)")
        return _parse(cls, data, where)

    def to_json(self) -> dict:
        """The manifest as written to ``plan.json`` (a new dict: editing it leaves the record alone)."""
        return _dump(self)

    def files(self) -> dict[str, str]:
        """Every file the plan references -> its recorded sha256."""
        out = {b.graph: b.sha256 for b in self.buckets}
        for b in self.buckets:
            out.update({g.file: g.sha256 for g in b.variants.values()})
        out[self.weights.file] = self.weights.sha256
        out.update({e["file"]: e["sha256"] for e in self.engines.values()})
        return out
