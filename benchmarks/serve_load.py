"""Throughput and latency of a plan behind Ray Serve, with and without batching, under 1, 2 and 4 clients.

    python benchmarks/serve_load.py                        # the bundled model, 2 replicas, batch 1 and 4
    python benchmarks/serve_load.py --plan plan --replicas 2 --requests 12 --steps 10

Starts a local Ray cluster on 127.0.0.1, serves the plan (built from the bundled model into a temporary
folder when --plan is not given), and for each batch size drives each client count: every client sends
``--requests`` requests one after the other (distinct seeds, ``--images`` each) and waits for each answer.
Each batch size is a fresh deployment, warmed up with two requests per replica before it is measured.
Prints a markdown table and writes ``benchmarks/results/serve_load.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
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
    """``clients`` threads x ``requests`` sequential requests; latency per request, wall time overall."""
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
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"clients": clients, "requests": clients * requests, "failed": len(failures), "wall_s": round(wall, 2),
            "req_per_s": round(len(latencies) / wall, 2), "images_per_s": round(images * len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
            "failures": failures[:5]}


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
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (and onnxruntime threads) per replica")
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--batch-sizes", default="1,4", help="max batch sizes to compare; 1 is no batching")
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--requests", type=int, default=12, help="requests per client")
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
    url = f"http://127.0.0.1:{args.port}/generate"
    load_before = os.getloadavg()
    manifest = json.loads((Path(plan) / "plan.json").read_text())
    result = {"machine": machine(), "model": manifest["model"].get("source"),
              "buckets": [[b["t_lo"], b["t_hi"], b["ratio"]] for b in manifest["buckets"]],
              "replicas": args.replicas, "num_cpus_per_replica": args.num_cpus, "steps": args.steps,
              "guidance": 4.0, "images_per_request": args.images, "batch_wait_ms": args.batch_wait_ms,
              "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": []}
    try:
        for b in (int(v) for v in args.batch_sizes.split(",")):
            serve_plan(plan, port=args.port, replicas=args.replicas, num_cpus=args.num_cpus, max_batch_size=b,
                       batch_wait_timeout_s=args.batch_wait_ms / 1000, max_pending=64,
                       ray_init={"log_to_driver": False})
            drive(url, 2 * args.replicas, 2, args.steps, args.images, seed0=10**6)  # warm every replica's sessions
            for c in (int(v) for v in args.clients.split(",")):
                run = dict(max_batch_size=b, **drive(url, c, args.requests, args.steps, args.images, seed0=10**5 * c))
                logger.info("batch %d, %d clients: %.2f req/s, p50 %s ms, p95 %s ms", b, c, run["req_per_s"],
                            run["p50_ms"], run["p95_ms"])
                result["runs"].append(run)
    finally:
        serve.shutdown()
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    result["load_average"] = {"before": [round(v, 2) for v in load_before],
                              "after": [round(v, 2) for v in os.getloadavg()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"machine: {result['machine']}; load average before/after: {result['load_average']}")
    return result


if __name__ == "__main__":
    main()
