"""Throughput and latency of a plan behind Ray Serve, with and without batching, under 1, 2 and 4 clients.

    python benchmarks/serve_load.py                        # the bundled model, 2 replicas, batch 1 and 4
    python benchmarks/serve_load.py --plan plan --replicas 2 --rounds 3 --requests 4 --steps 10

Starts a local Ray cluster on 127.0.0.1 and serves the plan (built from the bundled model into a temporary
folder when --plan is not given) once per max batch size, side by side (``/b1/generate``,
``/b4/generate``, each with its own replicas, warmed up first). Then, in each round, for each client count
and each batch size in turn, every client sends ``--requests`` requests one after the other (distinct
seeds, ``--images`` each) and waits for each answer. Interleaving the configurations spreads any drift in
the machine's load over all of them. Throughput is requests answered over the time the clients ran,
summed over rounds; latency percentiles are over every request. Prints a markdown table and writes
``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.service import request_images  # noqa: E402

logger = logging.getLogger("serve_load")
RESULTS = Path(__file__).resolve().parent / "results"


def drive(url: str, clients: int, requests: int, steps: int, images: int, seed0: int) -> dict:
    """``clients`` threads x ``requests`` sequential requests: the latencies, the failures, the wall time."""
    latencies: list[float] = []
    failures: list[str] = []
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait()
        for k in range(requests):
            body = {"class_label": (c + k) % 10, "seed": seed0 + 1000 * c + k, "steps": steps, "guidance": 4.0,
                    "num_images": images}
            t0 = time.perf_counter()
            try:
                request_images(url, body, timeout=300)
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                failures.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "failures": failures, "wall_s": time.perf_counter() - t0}


def summary(max_batch_size: int, clients: int, images: int, parts: list[dict]) -> dict:
    lat = np.array([v for part in parts for v in part["latencies"]]) * 1000
    wall = sum(part["wall_s"] for part in parts)
    failures = [f for part in parts for f in part["failures"]]
    return {"max_batch_size": max_batch_size, "clients": clients, "requests": len(lat) + len(failures),
            "failed": len(failures), "wall_s": round(wall, 2), "req_per_s": round(len(lat) / wall, 2),
            "images_per_s": round(images * len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None, "failures": failures[:5]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import onnxruntime
    import ray
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "python": platform.python_version(), "ray": ray.__version__,
            "onnxruntime": onnxruntime.__version__, "date": datetime.date.today().isoformat()}


def table(result: dict) -> str:
    rows = ["| max batch size | clients | requests | req/s | images/s | p50 ms | p95 ms | failed |",
            "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        rows.append(f"| {r['max_batch_size']} | {r['clients']} | {r['requests']} | {r['req_per_s']} | "
                    f"{r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['failed']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", help="plan directory (default: build the bundled model's default plan)")
    p.add_argument("--replicas", type=int, default=2, help="replicas per batch size")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per replica")
    p.add_argument("--num-cpus", type=float, default=0.5,
                   help="CPUs each replica reserves in Ray's accounting (the side-by-side deployments take turns)")
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--batch-sizes", default="1,4", help="max batch sizes to compare; 1 is no batching")
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=4, help="requests per client per round")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default=str(RESULTS / "serve_load.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import ray
    from ray import serve

    from runtime.serve import serve_plan

    tmp = None
    plan = args.plan
    if plan is None:
        from export.build import build_plan

        tmp = tempfile.TemporaryDirectory()
        plan = str(Path(tmp.name) / "plan")
        build_plan(model="bundled:tiny-dit", out=plan, measure=False, progress=False)
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    client_counts = [int(v) for v in args.clients.split(",")]
    load_before = os.getloadavg()
    manifest = json.loads((Path(plan) / "plan.json").read_text())
    result = {"machine": machine(), "model": manifest["model"].get("source"),
              "buckets": [[b["t_lo"], b["t_hi"], b["ratio"]] for b in manifest["buckets"]],
              "replicas": args.replicas, "threads_per_replica": args.threads, "steps": args.steps, "guidance": 4.0,
              "images_per_request": args.images, "batch_wait_ms": args.batch_wait_ms, "rounds": args.rounds,
              "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": []}
    parts: dict[tuple[int, int], list[dict]] = {(b, c): [] for b in batch_sizes for c in client_counts}
    # enough logical CPUs for every replica of every deployment: they take turns, only one set runs at a time
    cluster_cpus = max(os.cpu_count() or 1, math.ceil(args.num_cpus * args.replicas * len(batch_sizes)))
    try:
        urls = {}
        for b in batch_sizes:
            serve_plan(plan, port=args.port, app_name=f"b{b}", route_prefix=f"/b{b}", replicas=args.replicas,
                       num_cpus=args.num_cpus, threads=args.threads, max_batch_size=b,
                       batch_wait_timeout_s=args.batch_wait_ms / 1000, max_pending=64,
                       ray_init={"log_to_driver": False, "num_cpus": cluster_cpus})
            urls[b] = f"http://127.0.0.1:{args.port}/b{b}/generate"
            drive(urls[b], 2 * args.replicas, 2, args.steps, args.images, seed0=10**6)  # warm every replica
        for r in range(args.rounds):
            for c in client_counts:
                for b in batch_sizes if r % 2 == 0 else batch_sizes[::-1]:
                    part = drive(urls[b], c, args.requests, args.steps, args.images, seed0=10**5 * c + 100 * r)
                    parts[b, c].append(part)
                    logger.info("round %d, batch %d, %d clients: %d answers in %.1fs", r, b, c,
                                len(part["latencies"]), part["wall_s"])
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    result["runs"] = [summary(b, c, args.images, parts[b, c]) for b in batch_sizes for c in client_counts]
    result["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"machine: {result['machine']}; load average before/after: {result['load_average']}")
    return result


if __name__ == "__main__":
    main()
