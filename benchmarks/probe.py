"""What the benchmarks share: the DiT-XL/2 config, a child-process resident-memory probe, latency ratios.

Resident memory is measured in a fresh interpreter, from after its imports, so neither the caller's heap
nor the libraries count: the probe's code calls ``rss_kb()`` before and after what it measures and prints
the difference (bench.py, plan_memory.py, plan_memory_methods.py).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the public facebook/DiT-XL-2-256 transformer config (no download: random weights)
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")

_HEADER = '''import sys
sys.path.insert(0, {root!r})
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
'''


def machine() -> dict:
    """What a result was measured on: CPU model, cores, library versions, load average, UTC time."""
    import diffusers
    import onnxruntime
    import torch

    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if info.exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "diffusers": diffusers.__version__, "load_average": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}


def run_probe(code: str) -> str:
    """Run ``code`` (it may call ``rss_kb()``: this process's VmRSS in kB) in a fresh interpreter with the
    project on its path; return its last line of output."""
    res = subprocess.run([sys.executable, "-c", _HEADER.format(root=str(ROOT)) + code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"memory probe failed: {res.stderr[-2000:]}")
    return res.stdout.strip().splitlines()[-1]


def latency_ratio(lat: dict, a: str, b: str) -> dict:
    """a's latency over b's (> 1: a is slower) on medians, minimums and CPU-time medians of interleaved rounds."""
    return {"median": lat[a]["median_ms"] / lat[b]["median_ms"], "min": lat[a]["min_ms"] / lat[b]["min_ms"],
            "cpu_median": lat[a]["cpu_median_ms"] / lat[b]["cpu_median_ms"]}


def latency_rows(latency: dict, head: str = "forward", digits: int = 1) -> list[str]:
    """Markdown rows of interleaved latencies (name -> median_ms, min_ms, cpu_median_ms)."""
    return [f"| {head} | median ms | min ms | CPU ms (median) |", "|---|---|---|---|"] + [
        f"| {k} | {v['median_ms']:.{digits}f} | {v['min_ms']:.{digits}f} | {v['cpu_median_ms']:.{digits}f} |"
        for k, v in latency.items()]
