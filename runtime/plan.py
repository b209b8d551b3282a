"""Read and validate a plan directory (docs/design.md, 'The plan')."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from passes.errors import DitmergeError

# 3: a bucket is a shape: buckets may share a graph file and carry the ``counts`` fed as input lengths
# (passes/counts.py). Versions 1 and 2 (one graph per bucket) are refused: rebuild them.
FORMAT_VERSION = 3
PLAN_FILE = "plan.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Bucket:
    index: int
    t_lo: int
    t_hi: int
    ratio: float
    graph: str  # the main variant
    sha256: str
    graphs: dict = dataclasses.field(default_factory=dict, compare=False)  # variant -> file
    meta: dict = dataclasses.field(default_factory=dict, compare=False)  # the method's, for its runtime policy
    counts: dict = dataclasses.field(default_factory=dict, compare=False)  # count key -> value (input lengths)

    def covers(self, t: float) -> bool:
        """Integer timesteps t_lo..t_hi, and the continuous range [t_lo, t_hi + 1) for float schedules."""
        return self.t_lo <= t < self.t_hi + 1


class Plan:
    """A validated plan: its manifest, its directory, and the bucket lookup."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.dir = directory
        self.manifest = manifest
        self.buckets = [Bucket(b["index"], b["t_lo"], b["t_hi"], b["ratio"], b["graph"], b["sha256"],
                               {k: v["file"] for k, v in b.get("graphs", {}).items()} or {"main": b["graph"]},
                               b.get("method_meta") or {}, dict(b.get("counts") or {}))
                        for b in manifest["buckets"]]

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def method(self) -> dict:
        return self.manifest["method"]

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> Plan:
        directory = Path(directory)
        path = directory / PLAN_FILE
        if not path.is_file():
            raise DitmergeError(f"{directory} is not a plan: {PLAN_FILE} is missing (build one with `python -m export`)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DitmergeError(f"{path} is not valid JSON: {e}") from e
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise DitmergeError(f"{path} has format version {version!r}; this ditmerge reads versions up to "
                                f"{FORMAT_VERSION}: upgrade ditmerge or rebuild the plan")
        if version < FORMAT_VERSION:
            raise DitmergeError(f"{path} has format version {version}, written by an older ditmerge that kept one "
                                f"graph (and one copy of the weights) per bucket; this ditmerge reads version "
                                f"{FORMAT_VERSION}: rebuild the plan with `python -m export` (same arguments)")
        plan = cls(directory, manifest)
        files = {b.graph: b.sha256 for b in plan.buckets}
        for b in manifest["buckets"]:
            files.update({v["file"]: v["sha256"] for v in b.get("graphs", {}).values()})
        files[manifest["weights"]["file"]] = manifest["weights"]["sha256"]
        files.update({e["file"]: e["sha256"] for e in manifest.get("engines", {}).values()})
        for name, digest in files.items():
            f = directory / name
            if not f.is_file():
                raise DitmergeError(f"plan {directory} is missing {name}; rebuild it with `python -m export`")
            if verify and sha256_file(f) != digest:
                raise DitmergeError(f"{f} does not match the hash in {PLAN_FILE} (tampered or half-written); "
                                    "rebuild the plan")
        return plan

    def engines(self, graph: str) -> dict:
        """The TensorRT engine record of ``graph``."""
        return self.manifest.get("engines", {})[graph]

    @property
    def timesteps(self) -> str:
        """"discrete": DDPM-trained, the pipeline sends 0..T-1; "flow": flow matching, sigma * T in [0, T]."""
        return self.model.get("timesteps") or _FAMILY_DEFAULTS.get(self.model.get("family"), _DDPM)["timesteps"]

    @property
    def scheduler_kind(self) -> str:
        return "flow" if self.timesteps == "flow" else "ddpm"

    @property
    def prediction_type(self) -> str | None:
        """What the model predicts (DDPM-style schedulers only), from the scheduler config beside it."""
        if self.scheduler_kind == "flow":
            return None
        return (self.model.get("scheduler") or {}).get("prediction_type", "epsilon")

    @property
    def t_max(self) -> float:
        """The largest timestep the pipeline sends: T - 1 for DDPM-trained models, T (sigma 1) for flow matching."""
        t = int(self.model.get("num_train_timesteps", 1000))
        return float(t if self.timesteps == "flow" else t - 1)

    def covers(self, bucket: Bucket, t: float) -> bool:
        """``bucket.covers(t)``, and for flow matching t up to T in the noisiest bucket (sigma = 1 is t = T)."""
        if bucket.covers(t):
            return True
        return (self.timesteps == "flow" and bucket.t_hi == max(b.t_hi for b in self.buckets)
                and bucket.t_hi + 1 <= t <= self.t_max)

    def bucket_for(self, t: float) -> Bucket:
        for b in self.buckets:
            if self.covers(b, t):
                return b
        spans = ", ".join(f"[{b.t_lo}, {b.t_hi}]" for b in self.buckets)
        scale = "flow-matching timesteps 0..T" if self.timesteps == "flow" else "DDPM timesteps 0..T-1"
        raise DitmergeError(f"timestep {t} is outside every bucket of the plan ({spans}; {scale}, "
                            f"T = {self.model.get('num_train_timesteps', 1000)})")


_DDPM = {"timesteps": "discrete"}
_FAMILY_DEFAULTS = {"sd3": {"timesteps": "flow"}, "flux": {"timesteps": "flow"}}  # plans written before "timesteps"
