"""What one serving replica does with generation requests, without Ray: parse, batch, answer in PNG.

``runtime.serve`` puts this behind Ray Serve; everything here is plain Python so it can be tested and
reused without a cluster. A request is a JSON object::

    {"class_label": 3, "seed": 1, "steps": 25, "guidance": 4.0, "num_images": 2}

``class_label`` is a class index or a list of them (one image each); ``num_images`` repeats a single
label (with a list it may only restate its length). ``seed`` defaults to a random one, reported in the
answer. One image comes back as ``image/png``; several (or any request sent with
``Accept: application/json``) as JSON ``{"images": [base64 PNG, ...], "seed": ..., ...}``. A bad request
gets ``{"error": "..."}`` with 400 (malformed: not JSON, unknown fields, wrong types, a prompt for a
class-conditional plan) or 422 (well-formed but out of range: unknown class, too many steps or images).

What a served image is. The request's seed draws its noise; the ToMe partition stream is seeded by the
deployment's fixed ``partition_seed``. So the images of a request equal ::

    x = sample_classes(runtime.load(plan), labels, steps, guidance, seed=seed, partition_seed=partition_seed)
    to_uint8(x)              # pixel-space plans
    to_uint8(decode(vae, x))  # latent-space plans (DiT-XL/2), with the VAE the deployment was given

whatever it was batched with. ``python -m runtime generate`` seeds both from ``--seed`` instead; a
server cannot, because a merged graph takes one partition per forward for its whole batch, so requests
with different seeds could then never share a forward. With the partition fixed per deployment, any
requests with equal steps and guidance share one denoising loop (``generate.sample_batch``) and each
still gets exactly its own images. For an unmerged (ratio 0) plan the two definitions coincide.

That needs a method whose graphs and runtime policy treat each batch row on its own (apart from the
shared partition; the policy's ``rows_independent``): ToMe, CA-ToMe, AT-EDM and the cache on a fixed
schedule do (tests/serve checks each). SDTM does not: its partition follows staleness counters summed over
the batch; nor does the adaptive cache, which decides on the worst row's change. Plans of such methods, and of methods not yet checked,
still batch requests through Serve, but each request runs its own denoising loop.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import math
import secrets
import threading
import time
from pathlib import Path

import numpy as np
import torch

from passes.errors import DitmergeError
from runtime.plan import Plan

logger = logging.getLogger(__name__)

FIELDS = ("class_label", "prompt", "seed", "steps", "guidance", "num_images")
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0
MAX_SEED = 2**63 - 1


class RequestError(DitmergeError):
    """A request the service refuses; ``status`` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keep the status when Ray carries the error across processes
        return type(self), (str(self), self.status)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the answer is 422."""

    max_steps: int = 100
    max_images: int = 8
    max_guidance: float = 50.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    labels: tuple[int, ...]
    seed: int
    steps: int
    guidance: float

    @property
    def shape(self) -> tuple[int, float]:
        """Requests of one shape share a denoising loop (the image count may differ)."""
        return self.steps, self.guidance

    def to_json(self) -> dict:
        return {"class_label": list(self.labels), "seed": self.seed, "steps": self.steps, "guidance": self.guidance}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _get_int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    if name not in body:
        return default
    v = body[name]
    if not _is_int(v):
        raise RequestError(f"{name} must be an integer, got {json.dumps(v)}")
    if not lo <= v <= hi:
        raise RequestError(f"{name} must be in {lo}..{hi}, got {v}", 422)
    return v


def parse_request(body: bytes | str | dict, num_classes: int, limits: Limits = Limits()) -> GenerationRequest:
    """Validate a request body against the plan's classes and the limits; raises RequestError."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not JSON ({e}); send e.g. {{\"class_label\": 3, \"seed\": 1}}") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object such as {{\"class_label\": 3}}, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; a request takes {', '.join(FIELDS)}")
    if "prompt" in body:
        raise RequestError(f"this plan's model is class-conditional ({num_classes} classes), it takes no prompt: "
                           f"send class_label (0..{num_classes - 1})")
    if "class_label" not in body:
        raise RequestError(f"class_label is required: a class index in 0..{num_classes - 1} or a list of them")
    label = body["class_label"]
    if _is_int(label):
        labels = [label]
    elif isinstance(label, list) and label and all(_is_int(v) for v in label):
        labels = list(label)
    else:
        raise RequestError(f"class_label must be an integer or a non-empty list of integers, got {json.dumps(label)}")
    count = _get_int(body, "num_images", None, 1, limits.max_images)
    if count is not None and len(labels) > 1 and count != len(labels):
        raise RequestError(f"num_images ({count}) must equal the number of class labels ({len(labels)}) when "
                           "class_label is a list", 422)
    if count is not None and len(labels) == 1:
        labels = labels * count
    if len(labels) > limits.max_images:
        raise RequestError(f"at most {limits.max_images} images per request, asked for {len(labels)}", 422)
    unknown_classes = sorted({v for v in labels if not 0 <= v < num_classes})
    if unknown_classes:
        raise RequestError(f"unknown class label(s) {unknown_classes}: the plan's model has {num_classes} classes "
                           f"(0..{num_classes - 1})", 422)
    seed = _get_int(body, "seed", None, 0, MAX_SEED)
    if seed is None:
        seed = secrets.randbelow(2**31)
    steps = _get_int(body, "steps", DEFAULT_STEPS, 1, limits.max_steps)
    guidance = body.get("guidance", DEFAULT_GUIDANCE)
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool):
        raise RequestError(f"guidance must be a number, got {json.dumps(guidance)}")
    if not (math.isfinite(guidance) and 0 <= guidance <= limits.max_guidance):
        raise RequestError(f"guidance must be in 0..{limits.max_guidance:g}, got {guidance}", 422)
    return GenerationRequest(tuple(labels), seed, steps, float(guidance))


def check_servable(plan: Plan, vae: str | None = None) -> None:
    """Refuse plans this service cannot answer for, before any replica starts."""
    config = plan.record.model.config
    family = plan.record.model.family
    if config.get("num_embeds_ada_norm") is None or family != "dit":
        raise DitmergeError(f"plan {plan.dir} is for a text-conditioned {family} model; serving answers "
                            "class-conditional plans only (a plan holds no text encoder): load it into its "
                            "diffusers pipeline with runtime.load()")
    if config.get("in_channels") != 3 and vae is None:
        raise DitmergeError(f"plan {plan.dir} works in a {config.get('in_channels')}-channel latent space and a plan "
                            "holds no VAE: give the VAE that decodes it (vae= / --vae: a diffusers pipeline or "
                            "AutoencoderKL, folder or hub id, e.g. facebook/DiT-XL-2-256)")


def load_vae(source: str):
    """A diffusers AutoencoderKL from a pipeline (its ``vae`` subfolder) or a VAE, folder or hub id."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if path.is_dir():
        tries = [{"subfolder": "vae"}] if (path / "vae").is_dir() else [{}]
    else:  # a hub id: a pipeline repository or a VAE's own
        tries = [{"subfolder": "vae"}, {}]
    error: Exception | None = None
    for kwargs in tries:
        try:
            return AutoencoderKL.from_pretrained(source, **kwargs).eval()
        except (OSError, ValueError) as e:
            error = e
    raise DitmergeError(f"could not load a VAE from {source!r}: {error}") from error


@torch.no_grad()
def decode(vae, latents: np.ndarray) -> np.ndarray:
    """Latents to pixel-space samples in [-1, 1], as diffusers' DiTPipeline decodes them."""
    z = torch.from_numpy(latents).to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.float().cpu().numpy()


class PlanService:
    """One loaded plan; answers lists of requests, each same-shape group in one batched loop.

    Args:
        plan_dir: the plan directory.
        backend: runtime backend ("auto", "cpu", "cuda", "ort-trt", "trt").
        partition_seed: seeds the ToMe partition stream of every generation (see the module docstring).
        threads: onnxruntime intra-op threads (0: its default, all cores).
        limits: what one request may ask for.
        verify: check the plan's file hashes when loading.
        vae: decodes a latent-space plan's samples (see :func:`load_vae`); its device is CUDA where one answers
            and the backend is not "cpu".
        prepack: onnxruntime weight prepacking per bucket session (faster; False holds one weight copy for
            the whole plan, see the README's memory figures).
    """

    def __init__(self, plan_dir: str | Path, backend: str = "auto", partition_seed: int = 0, threads: int = 1,
                 limits: Limits = Limits(), verify: bool = True, vae: str | None = None, prepack: bool = True) -> None:
        import runtime

        t0 = time.perf_counter()
        self.transformer = runtime.load(plan_dir, backend=backend, seed=partition_seed, threads=threads, verify=verify,
                                        prepack=prepack)
        self.plan = self.transformer.plan
        check_servable(self.plan, vae)
        self.vae = None
        if self.transformer.config.in_channels != 3:
            self.vae = load_vae(vae)
            if backend != "cpu" and torch.cuda.is_available():
                self.vae.to("cuda")
        self.partition_seed, self.limits = partition_seed, limits
        self.num_classes = int(self.transformer.config.num_embeds_ada_norm)
        self.scheduler_config = self.plan.record.model.scheduler
        self.method = self.plan.record.method.name
        self.shares_loops = self.transformer.policy.rows_independent
        if not self.shares_loops:
            logger.info("method %s: each request runs its own denoising loop (batch rows are not independent "
                        "or not checked to be)", self.method)
        self._warm_up()
        self.stats = {"requests": 0, "images": 0, "batches": 0, "loops": 0, "largest_loop": 0, "errors": 0}
        self._lock = threading.Lock()
        logger.info("loaded plan %s (%d buckets, backend %s) in %.1fs", self.plan.dir, len(self.plan.buckets),
                    backend, time.perf_counter() - t0)

    def _graphs(self) -> list[str]:
        """Every graph file the plan's buckets may run (all variants where a bucket has several)."""
        names: dict[str, None] = {}
        for b in self.plan.buckets:
            names.update(dict.fromkeys([b.graph, *(getattr(b, "graphs", None) or {}).values()]))
        return list(names)

    def _warm_up(self) -> None:
        """Every session created now, and one forward per bucket so the first (slow) runs are paid at start."""
        for graph in self._graphs():
            self.transformer.runner(graph).activate()
        cfg = self.transformer.config
        x = torch.zeros(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        labels = torch.tensor([0, self.num_classes])
        scale = self.transformer.timestep_scale
        for bucket in self.plan.buckets:
            self.transformer.reset(self.partition_seed)
            out = self.transformer(x, timestep=torch.full((2,), bucket.t_lo * scale), class_labels=labels).sample
        if self.vae is not None:
            decode(self.vae, out[:1, :cfg.in_channels].numpy())

    def parse(self, body: bytes | str | dict) -> GenerationRequest:
        return parse_request(body, self.num_classes, self.limits)

    def generate(self, requests: list[GenerationRequest]) -> list[np.ndarray | Exception]:
        """uint8 NHWC images per request, or the exception its group raised (the other groups still run)."""
        from runtime.generate import sample_batch, to_uint8

        out: list[np.ndarray | Exception] = [None] * len(requests)  # type: ignore[list-item]
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(req.shape if self.shares_loops else (*req.shape, i), []).append(i)
        with self._lock:  # one generation at a time per replica: it already uses the replica's cores
            for (steps, guidance, *_), idx in groups.items():
                t0 = time.perf_counter()
                try:
                    samples = sample_batch(self.transformer, [(requests[i].labels, requests[i].seed) for i in idx],
                                           steps=steps, guidance=guidance, partition_seed=self.partition_seed,
                                           scheduler_config=self.scheduler_config)
                    for i, x in zip(idx, samples):  # decoded per request: batching cannot change the images
                        out[i] = to_uint8(x if self.vae is None else decode(self.vae, x))
                except Exception as e:  # answered per request; the traceback goes to the log
                    logger.exception("generation of %d requests (steps %d, guidance %g) failed", len(idx), steps,
                                     guidance)
                    self.stats["errors"] += len(idx)
                    for i in idx:
                        out[i] = e
                logger.debug("%d requests, %d images, %d steps in %.2fs", len(idx),
                             sum(len(requests[i].labels) for i in idx), steps, time.perf_counter() - t0)
                self.stats["loops"] += 1
                self.stats["largest_loop"] = max(self.stats["largest_loop"], len(idx))
            self.stats["batches"] += 1
            self.stats["requests"] += len(requests)
            self.stats["images"] += sum(len(r.labels) for r in requests)
        return out

    def check(self) -> None:
        """Raise if the replica can no longer answer: a session is gone or the plan files vanished."""
        for graph in self._graphs():
            if not self.transformer.runner(graph).is_active:
                raise RuntimeError(f"the session of {graph} is not active")
            if not (self.plan.dir / graph).is_file():
                raise RuntimeError(f"{self.plan.dir / graph} is gone")

    def info(self) -> dict:
        return {"plan": str(self.plan.dir), "model": self.plan.record.model.source, "classes": self.num_classes,
                "buckets": [{"t": [b.t_lo, b.t_hi], "ratio": b.ratio} for b in self.plan.buckets],
                "method": self.method, "shares_loops": self.shares_loops, "partition_seed": self.partition_seed,
                "limits": dataclasses.asdict(self.limits),
                "stats": dict(self.stats)}


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def answer(req: GenerationRequest, images: np.ndarray, want_json: bool) -> tuple[str, bytes, dict[str, str]]:
    """(content type, body, headers) of a successful answer: PNG for one image unless JSON is asked for."""
    headers = {"x-seed": str(req.seed), "x-class-label": ",".join(map(str, req.labels))}
    if len(images) == 1 and not want_json:
        return "image/png", encode_png(images[0]), headers
    body = dict(req.to_json(), images=[base64.b64encode(encode_png(im)).decode("ascii") for im in images])
    return "application/json", json.dumps(body).encode(), headers


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def request_images(url: str, body: dict, timeout: float = 60.0) -> tuple[list[np.ndarray], dict]:
    """POST ``body`` to a served plan's ``/generate``; returns (uint8 HWC images, the answer's JSON fields).

    Raises RequestError with the HTTP status and the server's message when it refuses.
    """
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            message = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode(errors="replace")[:500]
        raise RequestError(f"{url} answered {e.code}: {message}", e.code) from None
    images = [decode_png(base64.b64decode(s)) for s in data.pop("images")]
    return images, data
