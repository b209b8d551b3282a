"""Timestep buckets: which merge ratio runs at which denoising timesteps."""

from __future__ import annotations

import dataclasses

from passes.errors import DitmergeError

DEFAULT_BUCKETS = "0.3,0.2,0.1"  # noisy -> clean: merge most while the layout forms (SDTM, DiffCR)


@dataclasses.dataclass(frozen=True)
class BucketSpec:
    t_lo: int
    t_hi: int
    ratio: float


def parse_buckets(spec: str, num_train_timesteps: int = 1000) -> list[BucketSpec]:
    """Parse ``"0.5,0.4,0.3"`` (equal spans, noisiest first) or ``"999-600:0.5,599-0:0.3"``.

    Buckets are returned noisiest first and must cover 0..num_train_timesteps-1 with no gap or overlap.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DitmergeError(f"bucket spec must be a non-empty string like '0.5,0.3' or '999-500:0.5,499-0:0.3', got {spec!r}")
    items = [s.strip() for s in spec.split(",") if s.strip()]
    t_max = num_train_timesteps - 1
    out: list[BucketSpec] = []
    explicit = [":" in s for s in items]
    if any(explicit) and not all(explicit):
        raise DitmergeError(f"bucket spec {spec!r} mixes ranges and bare ratios; use one form")
    for i, item in enumerate(items):
        if ":" in item:
            span, ratio_text = item.split(":", 1)
            try:
                a, b = (int(v) for v in span.split("-"))
            except ValueError:
                raise DitmergeError(f"bucket {item!r}: the range must be two integers like '999-500'") from None
            lo, hi = min(a, b), max(a, b)
        else:
            ratio_text = item
            hi = t_max - (num_train_timesteps * i) // len(items)
            lo = t_max - (num_train_timesteps * (i + 1)) // len(items) + 1
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise DitmergeError(f"bucket {item!r}: ratio {ratio_text!r} is not a number") from None
        out.append(BucketSpec(lo, hi, ratio))
    out.sort(key=lambda b: -b.t_hi)
    if out[0].t_hi != t_max or out[-1].t_lo != 0:
        raise DitmergeError(f"buckets must cover timesteps 0..{t_max}; {spec!r} covers {out[-1].t_lo}..{out[0].t_hi}")
    for prev, nxt in zip(out, out[1:]):
        if nxt.t_hi >= prev.t_lo:
            raise DitmergeError(f"buckets [{nxt.t_lo}, {nxt.t_hi}] and [{prev.t_lo}, {prev.t_hi}] overlap")
        if nxt.t_hi != prev.t_lo - 1:
            raise DitmergeError(f"timesteps {nxt.t_hi + 1}..{prev.t_lo - 1} fall in no bucket")
    for b in out:
        if b.ratio < 0:
            raise DitmergeError(f"bucket [{b.t_lo}, {b.t_hi}] has a negative ratio {b.ratio}")
    return out
