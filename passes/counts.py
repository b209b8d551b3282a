"""Token counts carried by input *shapes* ("a bucket is a shape", docs/design.md).

A merged graph takes each count it depends on (ToMe's r, kept tokens, windows, router k) as the length
of an int64 input named ``ditmerge_count_<key>`` whose one dimension is the symbol ``<key>``. The graph
reads only the input's shape, never its values, so on TensorRT every such count is a shape tensor,
static within an optimization profile, and on onnxruntime one session serves every bucket: buckets that
differ only in counts share one graph file, and the plan records each bucket's ``counts``.
"""

from __future__ import annotations

import numpy as np

COUNT_PREFIX = "ditmerge_count_"


def count_input_name(key: str) -> str:
    return COUNT_PREFIX + key


def is_count_input(name: str) -> bool:
    return name.startswith(COUNT_PREFIX)


def count_key(name: str) -> str:
    return name[len(COUNT_PREFIX):]


_ZEROS: dict[int, np.ndarray] = {}


def count_feed(counts: dict[str, int]) -> dict[str, np.ndarray]:
    """The inputs that carry ``counts``: int64 zeros of each count's length (shared, read-only)."""
    out = {}
    for key, value in counts.items():
        n = int(value)
        if n < 0:
            raise ValueError(f"count {key}={n} is negative")
        if n not in _ZEROS:
            arr = np.zeros(n, dtype=np.int64)
            arr.setflags(write=False)
            _ZEROS[n] = arr
        out[count_input_name(key)] = _ZEROS[n]
    return out
