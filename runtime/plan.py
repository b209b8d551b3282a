"""Read and validate a plan directory (docs/design.md, 'The plan')."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from passes.errors import DitmergeError
from runtime.families import FAMILY_INPUTS
from runtime.plan_schema import FORMAT_VERSION, Bucket, PlanManifest  # noqa: F401 (FORMAT_VERSION, Bucket: public here too)

PLAN_FILE = "plan.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Plan:
    """A validated plan: its manifest (the typed :attr:`record`, and the JSON it came from), its directory,
    and the bucket lookup."""

    def __init__(self, directory: Path, manifest: dict | PlanManifest, where: str | None = None) -> None:
        self.dir = directory
        if isinstance(manifest, PlanManifest):
            self.record, self.manifest = manifest, manifest.to_json()
        else:
            self.record = PlanManifest.from_json(manifest, where or f"the manifest of {directory}")
            self.manifest = manifest  # the JSON, for readers outside the runtime (reports, the tuner)
        self.buckets: list[Bucket] = self.record.buckets

    @property
    def model(self) -> dict:
        """The model section as JSON (typed: ``record.model``)."""
        return self.manifest["model"]

    @property
    def method(self) -> dict:
        """The method section as JSON (typed: ``record.method``)."""
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
        plan = cls(directory, manifest, where=str(path))
        for name, digest in plan.record.files().items():
            f = directory / name
            if not f.is_file():
                raise DitmergeError(f"plan {directory} is missing {name}; rebuild it with `python -m export`")
            if verify and sha256_file(f) != digest:
                raise DitmergeError(f"{f} does not match the hash in {PLAN_FILE} (tampered or half-written); "
                                    "rebuild the plan")
        return plan

    def engines(self, graph: str) -> dict:
        """The TensorRT engine record of ``graph``."""
        return self.record.engines[graph]

    @property
    def timesteps(self) -> str:
        """"discrete": DDPM-trained, the pipeline sends 0..T-1; "flow": flow matching, sigma * T in [0, T]."""
        m = self.record.model
        if m.timesteps:
            return m.timesteps
        return FAMILY_INPUTS[m.family].timesteps if m.family in FAMILY_INPUTS else "discrete"  # plans before the field

    @property
    def scheduler_kind(self) -> str:
        return "flow" if self.timesteps == "flow" else "ddpm"

    @property
    def prediction_type(self) -> str | None:
        """What the model predicts (DDPM-style schedulers only), from the scheduler config beside it."""
        if self.scheduler_kind == "flow":
            return None
        return (self.record.model.scheduler or {}).get("prediction_type", "epsilon")

    @property
    def t_max(self) -> float:
        """The largest timestep the pipeline sends: T - 1 for DDPM-trained models, T (sigma 1) for flow matching."""
        t = int(self.record.model.num_train_timesteps)
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
                            f"T = {self.record.model.num_train_timesteps})")

