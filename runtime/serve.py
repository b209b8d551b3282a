"""Serve a plan on Ray Serve: replicas over a cluster, requests batched across clients, PNG answers.

Needs the ``serve`` extra (``pip install 'ditmerge[serve]'``); nothing else in ditmerge imports Ray.
The request format and what a served image equals are in :mod:`runtime.service`. Routes::

    POST /generate   a generation request -> image/png, or JSON with base64 PNGs; {"error": ...} with 4xx/5xx
    GET  /health     {"status": "ok", ...}: the answering replica, its plan, limits, batching and counters

Each replica loads the plan once (every bucket session created at start) and batches with
``@serve.batch``: concurrent requests queue for up to ``batch_wait_timeout_s`` or ``max_batch_size``
requests, then each same-shape group (steps, guidance) runs as one denoising loop. The batching settings
travel as the deployment's ``user_config`` (Serve's ``reconfigure``), the rest as constructor arguments. A replica
that already holds ``max_pending`` requests answers 503 with a JSON error and ``Retry-After`` instead of
queueing more. Example::

    from runtime.serve import serve_plan
    handle = serve_plan("plan", replicas=2, port=8000)          # local cluster, returns once ready
    images = handle.images.remote({"class_label": 3, "seed": 1}).result()   # or HTTP POST /generate
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from pathlib import Path

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from passes.errors import DitmergeError
from runtime.plan import Plan
from runtime.service import Limits, PlanService, RequestError, answer, check_servable, error_body

logger = logging.getLogger(__name__)

APP_NAME = "ditmerge"
MAX_BODY = 64 * 1024


def _json_error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


@serve.deployment(name="PlanServer")
class PlanServer:
    """A Serve replica: one :class:`PlanService`, fed by ``@serve.batch``."""

    def __init__(self, plan_dir: str, backend: str, partition_seed: int, threads: int, limits: Limits,
                 max_pending: int, verify: bool, vae: str | None, prepack: bool = True) -> None:
        import torch

        torch.set_num_threads(max(1, threads))  # the scheduler's tensor ops: stay inside the replica's CPUs
        self.service = PlanService(plan_dir, backend=backend, partition_seed=partition_seed, threads=threads,
                                   limits=limits, verify=verify, vae=vae, prepack=prepack)
        self.max_pending = max_pending
        self.pending = 0
        self.batching = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}

    def reconfigure(self, config: dict) -> None:
        """Serve calls this with the deployment's user_config: the batching settings."""
        self.batching = {"max_batch_size": int(config["max_batch_size"]),
                         "batch_wait_timeout_s": float(config["batch_wait_timeout_s"])}
        self._generate_batched.set_max_batch_size(self.batching["max_batch_size"])
        self._generate_batched.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])

    def check_health(self) -> None:
        self.service.check()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _generate_batched(self, requests: list) -> list:
        # off the event loop, so requests keep arriving (and batching) while a batch runs
        return await asyncio.to_thread(self.service.generate, requests)

    async def images(self, body: dict) -> list:
        """For DeploymentHandle callers: uint8 HWC images of one request; raises RequestError.

        Handle calls skip the HTTP route's max_pending check; Serve's max_ongoing_requests bounds them.
        """
        req = self.service.parse(body)
        result = await self._generate_batched(req)
        if isinstance(result, Exception):
            raise result
        return list(result)

    async def __call__(self, request: Request) -> Response:
        scope = request.scope
        route = scope.get("path", "")[len(scope.get("root_path", "")):].rstrip("/") or "/"
        if route == "/health":
            if request.method != "GET":
                return _json_error("use GET /health", 405)
            return self._health()
        if route != "/generate":
            return _json_error(f"no route {route}; use POST /generate or GET /health", 404)
        if request.method != "POST":
            return _json_error("use POST /generate with a JSON body", 405)
        if self.pending >= self.max_pending:
            return _json_error(f"overloaded: this replica already holds {self.pending} requests; retry later", 503,
                               {"retry-after": "1"})
        self.pending += 1  # counted before the first await: requests arriving together all see it
        try:
            return await self._generate(request)
        finally:
            self.pending -= 1

    async def _generate(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY:
            return _json_error(f"the body is {len(body)} bytes; a request is at most {MAX_BODY}", 413)
        try:
            req = self.service.parse(body)
        except RequestError as e:
            return _json_error(str(e), e.status)
        result = await self._generate_batched(req)
        if isinstance(result, Exception):
            return _json_error(f"generation failed: {type(result).__name__}: {result}", 500)
        want_json = "application/json" in request.headers.get("accept", "")
        media_type, data, headers = await asyncio.to_thread(answer, req, result, want_json)
        return Response(data, media_type=media_type, headers=headers)

    def _health(self) -> Response:
        info = {"status": "ok", "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "pending": self.pending, "max_pending": self.max_pending, "batching": self.batching}
        try:  # the check Serve's health probe makes: a replica failing it is replaced soon after
            self.service.check()
        except Exception as e:  # noqa: BLE001 - reported, not raised
            info.update(status="unhealthy", error=f"{type(e).__name__}: {e}")
        info.update(self.service.info())
        return Response(json.dumps(info), status_code=200 if info["status"] == "ok" else 503,
                        media_type="application/json")


def _code_runtime_env() -> dict:
    """A job runtime_env that ships this process's ``runtime`` and ``passes`` packages to every worker.

    Replicas then run the code that built the deployment (a source checkout, an editable or a regular
    install, on this machine or a remote cluster) rather than whatever ditmerge a worker would import.
    Ray uploads local directories only at the job level (ray.init), and Serve gives the job's
    runtime_env to deployments that set none.
    """
    import passes
    import runtime

    return {"py_modules": [str(Path(m.__file__).parent) for m in (runtime, passes)]}


def build_app(plan_dir: str | Path, *, replicas: int = 1, max_batch_size: int = 4, batch_wait_timeout_s: float = 0.01,
              num_cpus: float = 1.0, num_gpus: float = 0.0, ray_actor_options: dict | None = None,
              backend: str = "auto", partition_seed: int = 0, threads: int | None = None, limits: Limits | None = None,
              max_pending: int = 16, verify: bool = True, vae: str | None = None,
              prepack: bool = True) -> serve.Application:
    """The bound Serve application of a plan; deploy it with ``serve.run`` (or use :func:`serve_plan`).

    Args:
        plan_dir: the plan directory; on a multi-node cluster it must exist at this path on every node.
        replicas: Serve replicas, each with its own runtime.
        max_batch_size: requests per batch (1: no batching).
        batch_wait_timeout_s: how long a batch waits to fill.
        num_cpus: CPUs each replica reserves.
        num_gpus: GPUs each replica reserves; with backend "auto" or "trt" a replica on a GPU node runs
            CUDA or the plan's TensorRT engines.
        ray_actor_options: more Ray actor options (resources, runtime_env, ...); they override num_cpus/num_gpus.
        backend: runtime backend of each replica.
        partition_seed: seeds every generation's ToMe partition stream (see runtime.service).
        threads: onnxruntime threads per replica; None: the replica's CPUs.
        limits: what one request may ask for (default: Limits()).
        max_pending: requests a replica holds (queued or running) before it answers 503.
        verify: check the plan's hashes here and in each replica.
        vae: for a latent-space plan, the VAE that decodes its samples (runtime.service.load_vae); like the
            plan, a folder must exist on every node (a hub id is fetched into each node's cache).
        prepack: onnxruntime weight prepacking in each replica (False: one weight copy per replica instead of
            one per bucket, at some speed).
    """
    plan_dir = Path(plan_dir).resolve()
    check_servable(Plan.load(plan_dir, verify=verify), vae)  # fail here, not in every replica
    if replicas < 1 or max_batch_size < 1 or max_pending < 1 or batch_wait_timeout_s < 0:
        raise DitmergeError(f"replicas, max_batch_size and max_pending must be >= 1 and batch_wait_timeout_s >= 0, "
                            f"got {replicas}, {max_batch_size}, {max_pending}, {batch_wait_timeout_s}")
    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, **(ray_actor_options or {})}
    if threads is None:
        threads = max(1, int(options["num_cpus"]))
    deployment = PlanServer.options(
        num_replicas=replicas, ray_actor_options=options,
        user_config={"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s},
        # room for max_pending generations plus health probes and fast 503 answers; the router's own queue
        # (whose 503 is plain text) is a backstop for replicas that stop answering at all
        max_ongoing_requests=max_pending + 8, max_queued_requests=(max_pending + 8) * replicas)
    return deployment.bind(str(plan_dir), backend, partition_seed, threads, limits or Limits(), max_pending, verify,
                           vae, prepack)


def connect(address: str | None = None, ship_code: bool = True, **init_kwargs) -> bool:
    """Join the Ray cluster at ``address`` ("auto", "host:port", "ray://host:port"), or start a local one
    on 127.0.0.1 when None; returns whether a cluster was started here. No-op when Ray is up already.

    ``ship_code`` sends this process's ditmerge code to the workers (see ``_code_runtime_env``); without
    it they import the ditmerge installed where they run.
    """
    if ray.is_initialized():
        return False
    if ship_code:
        init_kwargs["runtime_env"] = {**_code_runtime_env(), **(init_kwargs.get("runtime_env") or {})}
    if address is None:
        init_kwargs.setdefault("include_dashboard", False)
        init_kwargs.setdefault("_node_ip_address", "127.0.0.1")
        ray.init(address="local", **init_kwargs)
        return True
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DitmergeError(f"could not join the Ray cluster at {address!r}: {e}") from e
    return False


def http_port() -> int:
    """The port the running Serve's HTTP proxy listens on (after :func:`serve_plan`, also when it was given 0)."""
    from ray.serve.context import _get_global_client  # Serve has no public getter for its HTTP options

    return int(_get_global_client().http_config.port)


def _bind_failed(e: BaseException) -> bool:
    # Serve's proxy raises RuntimeError("Failed to bind to address 'host:port'."), wrapped in a RayTaskError
    return "Failed to bind to address" in f"{e} {getattr(e, 'cause', '')}"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_http(host: str = "127.0.0.1", port: int = 8000, attempts: int = 5) -> int:
    """Start Serve with its HTTP proxy on ``host:port`` and return the port it listens on.

    ``port=0`` takes any free port. One is picked here, and another process can take it before Serve's proxy
    binds it, so a bind failure shuts the half-started Serve down and retries with a fresh pick, up to
    ``attempts`` times. A given port that is taken is a DitmergeError. A Serve already running on the cluster
    keeps its own options and port.
    """
    for attempt in range(1, attempts + 1):
        chosen = port or _free_port(host)
        try:
            serve.start(http_options={"host": host, "port": chosen})
        except RuntimeError as e:
            if not _bind_failed(e):
                raise
            serve.shutdown()  # the controller outlives its failed proxy; a retry needs a fresh one
            if port:
                raise DitmergeError(f"cannot serve HTTP on {host}:{port}: the address is in use "
                                    "(choose another --port, or 0 for any free one)") from e
            logger.info("port %d was taken before Serve's proxy bound it; retrying (%d/%d)", chosen, attempt,
                        attempts)
            continue
        return http_port()
    raise DitmergeError(f"Serve's proxy could not bind a free port on {host} in {attempts} attempts")


def serve_plan(plan_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
               route_prefix: str = "/", app_name: str = APP_NAME, blocking: bool = False,
               ray_init: dict | None = None, ship_code: bool = True,
               **build_kwargs) -> serve.handle.DeploymentHandle:
    """Deploy a plan and return the handle once every replica is up; ``blocking`` serves until Ctrl-C.

    ``build_kwargs`` go to :func:`build_app`, ``ray_init`` to ``ray.init``, ``ship_code`` to :func:`connect`.
    The HTTP options (host, port) apply when this call starts Serve on the cluster; a running Serve keeps
    its own. ``port=0`` serves on any free port (see :func:`start_http`); :func:`http_port` reads it back.
    A local cluster this call started is shut down again when deploying fails.
    """
    app = build_app(plan_dir, **build_kwargs)  # validates the plan before any cluster starts
    started = connect(address, ship_code=ship_code, **(ray_init or {}))
    t0 = time.perf_counter()
    try:
        port = start_http(host, port)
        handle = serve.run(app, name=app_name, route_prefix=route_prefix)
    except BaseException as e:
        if started:  # leave nothing running behind a failed start
            serve.shutdown()
            ray.shutdown()
        if isinstance(e, RuntimeError):  # a replica failed to start: the reason is in its log and in the message
            raise DitmergeError(f"deploying {plan_dir} failed: {e}") from e
        raise
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    logger.info("serving %s at %s/generate (%s replicas, ready in %.1fs)", plan_dir, url,
                build_kwargs.get("replicas", 1), time.perf_counter() - t0)
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(app_name)
