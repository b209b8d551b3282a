"""What the memory benchmarks share: the DiT-XL/2 config and a child-process resident-memory probe.

Resident memory is measured in a fresh interpreter, from after its imports, so neither the caller's heap
nor the libraries count: the probe's code calls ``rss_kb()`` before and after what it measures and prints
the difference (bench.py, plan_memory.py, plan_memory_methods.py).
"""

from __future__ import annotations

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


def run_probe(code: str) -> str:
    """Run ``code`` (it may call ``rss_kb()``: this process's VmRSS in kB) in a fresh interpreter with the
    project on its path; return its last line of output."""
    res = subprocess.run([sys.executable, "-c", _HEADER.format(root=str(ROOT)) + code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"memory probe failed: {res.stderr[-2000:]}")
    return res.stdout.strip().splitlines()[-1]
