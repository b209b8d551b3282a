"""The schedule spaces the tuner searches (:mod:`export.tune`), one per method.

A space says what to build once (``build_args``), which knobs a schedule turns (each an ordered tuple
of values, least aggressive first, so level 0 everywhere is the unmerged plan's quality), and how a
schedule becomes a plan: per-bucket overrides applied to a copy of the built manifest. No knob needs a
graph that was not built: the cache method's knobs are its run-time policy's (interval, warm-up); ToMe's
ratio per bucket is the length of the shared graph's ``ditmerge_count_tome_r`` input.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from export.buckets import BucketSpec, parse_buckets
from passes.counts import count_input_name
from passes.errors import DitmergeError
from passes.tome import R_COUNT, count_values
from passes.partition import max_ratio, merged_count

SUPPORTED = ("cache", "tome", "sdtm")
TOME_R = R_COUNT
DEFAULT_INTERVALS = (1, 2, 3, 4, 5, 6)
DEFAULT_FULL_ABOVE = (900, -1)  # a warm-up of full steps above t=900, then none
DEFAULT_RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_PROTECT_EVERY = (2, 3, 4)  # SDTM: a full step every n-th step


@dataclasses.dataclass(frozen=True)
class Knob:
    name: str
    values: tuple  # least aggressive first
    per_bucket: bool = True  # moved together with the other per-bucket knobs in the uniform phase


def bucket_ranges(buckets: int | str, num_train_timesteps: int) -> list[BucketSpec]:
    """``3``: three equal spans, noisiest first; a spec string: its ranges (its ratios are ignored)."""
    if isinstance(buckets, bool) or not isinstance(buckets, (int, str)):
        raise DitmergeError(f"buckets must be a count like 3 or a spec like '999-500:0,499-0:0', got {buckets!r}")
    if isinstance(buckets, int) or buckets.strip().isdigit():
        count = int(buckets)
        if not 1 <= count <= 16:
            raise DitmergeError(f"the tuner takes 1 to 16 buckets, got {count}")
        buckets = ",".join(["0"] * count)
    return parse_buckets(buckets, num_train_timesteps)


def spec_string(specs: list[BucketSpec], ratio: float) -> str:
    return ",".join(f"{s.t_hi}-{s.t_lo}:{ratio:g}" for s in specs)


class Space:
    """A method's schedule space over a plan built once."""

    method = ""
    dry_run = True  # a dry run of the policy (no graph runs) tells which graph runs at each call

    def __init__(self, specs: list[BucketSpec], options: dict, levels: dict[str, tuple] | None = None) -> None:
        self.specs, self.options = specs, dict(options)
        self.levels = dict(levels or {})
        self.knobs: list[Knob] = []

    def build_args(self) -> dict:
        """``export.build.build_plan`` arguments (method, buckets, options) of the one build."""
        raise NotImplementedError

    def check_built(self, plan_dir: Path, manifest: dict) -> None:
        """Refuse a built plan whose graphs cannot take every schedule of the space."""

    def values(self, levels: tuple[int, ...]) -> dict[str, object]:
        return {k.name: k.values[i] for k, i in zip(self.knobs, levels)}

    def describe(self, levels: tuple[int, ...]) -> str:
        return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.values(levels).items())

    def apply(self, manifest: dict, levels: tuple[int, ...]) -> dict:
        """The built manifest with the schedule's overrides (a copy)."""
        raise NotImplementedError

    def _levels(self, name: str, default: tuple) -> tuple:
        values = tuple(self.levels.get(name, default))
        if len(values) < 2:
            raise DitmergeError(f"the tuner's {name} levels need at least two values (least aggressive first), "
                                f"got {list(values)}")
        return values


class CacheSpace(Space):
    """Step caching: a full-step interval per bucket and the warm-up (``full_above``), run-time knobs only."""

    method = "cache"

    def __init__(self, specs: list[BucketSpec], options: dict, levels: dict[str, tuple] | None = None) -> None:
        super().__init__(specs, options, levels)
        for key in ("interval", "full_above"):
            if key in self.options:
                raise DitmergeError(f"the tuner chooses the cache option {key!r}; leave it out (set the candidate "
                                    f"values with levels={{{key!r}: (...)}} in the library call)")
        intervals = self._levels("interval", DEFAULT_INTERVALS)
        if intervals[0] != 1 or any(int(v) < 1 for v in intervals) or list(intervals) != sorted(intervals):
            raise DitmergeError(f"interval levels must start at 1 (never cache) and grow, got {list(intervals)}")
        self.knobs = [Knob(f"interval[{i}]", tuple(int(v) for v in intervals)) for i in range(len(specs))]
        self.knobs.append(Knob("full_above", tuple(int(v) for v in self._levels("full_above", DEFAULT_FULL_ABOVE)),
                               per_bucket=False))

    def build_args(self) -> dict:
        return {"method": "cache", "buckets": spec_string(self.specs, 0.0), "options": {**self.options, "interval": (1,)}}

    def apply(self, manifest: dict, levels: tuple[int, ...]) -> dict:
        view = copy.deepcopy(manifest)
        vals = self.values(levels)
        intervals = [vals[f"interval[{i}]"] for i in range(len(self.specs))]
        for b, interval in zip(view["buckets"], intervals):
            b["method_meta"]["interval"] = interval
            b["method_meta"]["full_above"] = vals["full_above"]
        view["method"]["params"].update(interval=intervals, full_above=vals["full_above"])
        return view


class ToMeSpace(Space):
    """ToMe: a ratio per bucket, all buckets on the one graph that takes r as a count input's length."""

    method = "tome"

    def __init__(self, specs: list[BucketSpec], options: dict, levels: dict[str, tuple] | None = None) -> None:
        super().__init__(specs, options, levels)
        ratios = tuple(float(v) for v in self._levels("ratio", DEFAULT_RATIOS))
        if ratios[0] != 0 or list(ratios) != sorted(ratios):
            raise DitmergeError(f"ratio levels must start at 0 (no merging) and grow, got {list(ratios)}")
        self.knobs = [Knob(f"ratio[{i}]", ratios) for i in range(len(specs))]

    def build_args(self) -> dict:
        """One build at the largest ratio, its last bucket unmerged: a mixed plan has the layout every tuned
        plan needs (``unmerged=branch``, the default: the one graph with ``If(r == 0)``, so a schedule's r = 0
        buckets stay on it; ``merged``: the merged graph at r = 0; ``base``: base.onnx beside it)."""
        top = self.knobs[0].values[-1]
        ratios = [top] * len(self.specs)
        if len(ratios) > 1:
            ratios[-1] = 0.0
        spec = ",".join(f"{s.t_hi}-{s.t_lo}:{r:g}" for s, r in zip(self.specs, ratios))
        return {"method": "tome", "buckets": spec, "options": self.options}

    def check_built(self, plan_dir: Path, manifest: dict) -> None:
        from runtime.transformer import graph_inputs

        top = max_ratio(tuple(manifest["model"]["grid"]), tuple(self.options.get("stride", (2, 2))))
        if self.knobs[0].values[-1] > top:
            raise DitmergeError(f"ratio level {self.knobs[0].values[-1]:g} is above this grid's maximum {top:.3g}")
        graphs = {b["graph"] for b in manifest["buckets"]} - {manifest["base"]["graph"]}
        if len(graphs) != 1 or count_input_name(TOME_R) not in graph_inputs(plan_dir / graphs.pop()):
            raise DitmergeError("tuning ToMe needs the one merged graph that takes r as the length of "
                                f"{count_input_name(TOME_R)!r} (\"a bucket is a shape\"); this build gave a graph "
                                "per bucket with r baked in, so each candidate ratio would need its own export: "
                                "not implemented; tune the cache method (--method cache) instead")

    def apply(self, manifest: dict, levels: tuple[int, ...]) -> dict:
        """Every bucket on the built plan's one graph with r as its count, as a normal build of the schedule
        lays it out; r = 0 runs base.onnx only where the build's r = 0 bucket did (``unmerged=base``, or a
        one-bucket space, whose r = 0 schedule is the unmerged plan)."""
        view = copy.deepcopy(manifest)
        base = view["base"]
        merged = next(b for b in manifest["buckets"] if b["method_meta"].get("sites"))  # the one graph's bucket
        zero_on_graph = any(b["r"] == 0 and b["graph"] != base["graph"] for b in manifest["buckets"])
        for b, ratio in zip(view["buckets"], self.values(levels).values()):
            meta = copy.deepcopy(merged["method_meta"])  # ToMe metadata (tokens, num_src, bands, counts, sites)
            r = merged_count(ratio, int(meta["tokens"]), int(meta["num_src"])) // int(meta["bands"]) * int(meta["bands"])
            b["ratio"] = ratio
            if r == 0 and not zero_on_graph:  # the unmerged graph: no count, no partition
                b.update(graph=base["graph"], sha256=base["sha256"], r=0, kept_tokens=int(meta["tokens"]), counts={},
                         graphs={"main": {"file": base["graph"], "sha256": base["sha256"]}},
                         method_meta={"stride": meta.get("stride"), "bands": meta.get("bands")})
                continue
            meta["r"], meta["ratio"] = r, ratio
            b.update(graph=merged["graph"], sha256=merged["sha256"], graphs=copy.deepcopy(merged["graphs"]),
                     method_meta=meta, r=r, kept_tokens=int(meta["tokens"]) - r,
                     counts=count_values(meta) or {TOME_R: r})
        view["schedule"]["buckets"] = ",".join(f"{b['t_hi']}-{b['t_lo']}:{b['ratio']:g}" for b in view["buckets"])
        return view


class SdtmSpace(Space):
    """SDTM: a ratio per bucket (the bucket's k windows or r tokens, a count of its stage's one graph) and how
    often a protected full step refreshes the cache (``protect_every``), run-time knobs both. The buckets and
    their stages come from the method's options (steps, switch_step, buckets_per_stage), fixed by the build:
    a stage boundary decides which graph a bucket runs, so it is not searched. A bucket at ratio 0 runs its
    graph's ``full`` branch (the unmerged forward, which also refreshes the cache): still one graph per stage."""

    method = "sdtm"
    dry_run = False  # the policy's choice depends on the cache the graphs return: every schedule is generated

    def __init__(self, specs: list[BucketSpec], options: dict, levels: dict[str, tuple] | None = None) -> None:
        super().__init__(specs, options, levels)
        for key in ("ratio", "dev", "protect_every"):
            if key in self.options:
                raise DitmergeError(f"the tuner chooses the sdtm ratio per bucket and protect_every; leave {key!r} out "
                                    "(set the candidate values with levels={'ratio': (...), 'protect_every': (...)})")
        self.ratios = tuple(float(v) for v in self._levels("ratio", DEFAULT_RATIOS))
        if self.ratios[0] != 0 or list(self.ratios) != sorted(self.ratios) or self.ratios[-1] > 0.75:
            raise DitmergeError(f"sdtm ratio levels must start at 0 (no merging), grow and stay <= 0.75, got "
                                f"{list(self.ratios)}")
        self.protect = tuple(int(v) for v in self._levels("protect_every", DEFAULT_PROTECT_EVERY))
        if self.protect[0] < 1 or list(self.protect) != sorted(self.protect):
            raise DitmergeError(f"protect_every levels must be >= 1 and grow (a full step every n-th step; least "
                                f"aggressive first), got {list(self.protect)}")
        self.specs = []  # the build's buckets: known once it ran (check_built)

    def build_args(self) -> dict:
        """Every bucket merged at the largest ratio (dev 0), with the full variant the ratio-0 buckets run."""
        from export.buckets import DEFAULT_BUCKETS

        return {"method": "sdtm", "buckets": DEFAULT_BUCKETS,
                "options": {**self.options, "ratio": self.ratios[-1], "dev": 0.0, "protect_every": self.protect[0]}}

    def check_built(self, plan_dir: Path, manifest: dict) -> None:
        buckets = manifest["buckets"]
        if any(not b["method_meta"].get("removed") or "full" not in b["graphs"] for b in buckets):
            raise DitmergeError("tuning sdtm needs a merged graph with a full variant in every bucket; the build "
                                "gave a bucket without (a ratio level too small to merge a token on this grid?)")
        self.specs = [BucketSpec(b["t_lo"], b["t_hi"], 0.0) for b in buckets]
        self.knobs = [Knob(f"ratio[{i}]", self.ratios) for i in range(len(buckets))]
        self.knobs.append(Knob("protect_every", self.protect, per_bucket=False))

    def apply(self, manifest: dict, levels: tuple[int, ...]) -> dict:
        from passes.sdtm import SdtmConfig, bucket_values

        view = copy.deepcopy(manifest)
        vals = self.values(levels)
        grid = tuple(manifest["model"]["grid"])
        for i, b in enumerate(view["buckets"]):
            meta, ratio = b["method_meta"], vals[f"ratio[{i}]"]
            values = bucket_values(SdtmConfig(merge=meta["merge"], ratio=ratio), grid)
            counts = values.pop("counts")
            meta.update(values, protect_every=vals["protect_every"])
            b["ratio"] = ratio
            if values["removed"] == 0:  # the graph's full branch; its counts stay the built ones (a profile's
                meta["branch"] = {"main": "full"}  # shapes: the full branch reads none)
                b.update(graphs={"main": b["graphs"]["full"]}, r=0, kept_tokens=values["kept"])
                continue
            b.update(r=values["removed"], kept_tokens=values["kept"], counts=counts)
        view["method"]["params"].update(ratio=[vals[f"ratio[{i}]"] for i in range(len(view["buckets"]))], dev=0.0,
                                        protect_every=vals["protect_every"])
        return view


def space_for(method: str, specs: list[BucketSpec], options: dict, levels: dict[str, tuple] | None = None) -> Space:
    spaces = {"cache": CacheSpace, "tome": ToMeSpace, "sdtm": SdtmSpace}
    if method == "catome":
        raise DitmergeError("the tuner does not search catome: its r per bucket is what threshold calibration gives "
                            "(the method's point), and a threshold is a calibration, not a run-time knob; choose "
                            "-o threshold=... at build time, or tune ToMe (--method tome), whose r per bucket it searches")
    if method not in spaces:
        raise DitmergeError(f"the tuner supports the methods {', '.join(SUPPORTED)}; {method!r} has no tunable "
                            "schedule space yet (build it with explicit --buckets and options)")
    return spaces[method](specs, options, levels)
