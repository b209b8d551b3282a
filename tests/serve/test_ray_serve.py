"""The plan behind Ray Serve under load, on a local cluster on 127.0.0.1: 2 replicas, concurrent clients,
bad requests, a replica killed mid-load. Every HTTP call has a timeout; the module takes a few minutes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray", reason="the serve extra (Ray Serve) is not installed: pip install -e '.[serve]'")

from runtime.service import Limits, RequestError, decode_png, request_images  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster, three deployments

TIMEOUT = 90  # seconds, any one HTTP call (a cold replica under a loaded CPU included)


@pytest.fixture(scope="module")
def server(served_plan):
    from runtime.serve import http_port, serve_plan
    from tests.serve.conftest import shutdown_ray

    try:  # port 0: Serve's proxy gets a free port (retried if taken first) and http_port reads it back
        serve_plan(served_plan, port=0, replicas=2, num_cpus=0.5, max_batch_size=4, batch_wait_timeout_s=0.2,
                   limits=Limits(max_steps=20, max_images=4),
                   ray_init={"num_cpus": 2, "log_to_driver": False, "object_store_memory": 200 * 2**20})
        yield f"http://127.0.0.1:{http_port()}"
    finally:  # also when the set-up failed half-way
        shutdown_ray()


def _call(url: str, method: str = "GET", body: bytes | None = None, accept: str = "") -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers={"accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def _replicas(url: str, want: int = 2, deadline_s: float = 60) -> dict[str, dict]:
    """replica id -> its /health, polling until ``want`` replicas answered (requests land on either)."""
    seen: dict[str, dict] = {}
    end = time.monotonic() + deadline_s
    while len(seen) < want and time.monotonic() < end:
        status, _, body = _call(url + "/health")
        if status == 200:
            info = json.loads(body)
            seen[info["replica"]] = info
    return seen


def _job(client: int, k: int) -> dict:
    """Mostly one shape (so batches form), some others, counts of 1 and 2 images."""
    body = {"class_label": (client * 3 + k) % 10, "seed": 100 * client + k, "steps": 4, "guidance": 4.0}
    if client == 3:
        body["steps"] = 6
    if k == 1:
        body["num_images"] = 2
    if client == 2 and k == 2:
        body["guidance"] = 1.0
    return body


def _expected(direct, body: dict) -> np.ndarray:
    labels = [body["class_label"]] * body.get("num_images", 1)
    return direct(labels, body["seed"], body["steps"], body["guidance"])


def test_concurrent_clients_get_the_images_of_direct_generation(server, direct):
    clients, per_client = 4, 3
    results: dict[tuple[int, int], object] = {}
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait(timeout=TIMEOUT)
        for k in range(per_client):
            body = _job(c, k)
            try:
                if k == 0 and c % 2:  # single image as a raw image/png answer
                    status, media, data = _call(server + "/generate", "POST", json.dumps(body).encode())
                    results[c, k] = [decode_png(data)] if status == 200 and media == "image/png" else (status, data)
                else:
                    results[c, k] = request_images(server + "/generate", body, timeout=TIMEOUT)[0]
            except Exception as e:  # noqa: BLE001 - surfaced below
                results[c, k] = e

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * TIMEOUT)
    assert len(results) == clients * per_client, f"only {len(results)} requests answered"
    for (c, k), got in sorted(results.items()):
        assert isinstance(got, list), f"client {c} request {k}: {got!r}"
        want = _expected(direct, _job(c, k))
        assert np.array_equal(np.stack(got), want), f"client {c} request {k} differs from direct generation"
    stats = [info["stats"] for info in _replicas(server).values()]
    assert sum(s["requests"] for s in stats) >= clients * per_client
    assert max(s["largest_loop"] for s in stats) >= 2, f"no two requests ever shared a denoising loop: {stats}"


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/generate", {"class_label": 10, "seed": 1, "steps": 4}, 422),
    ("POST", "/generate", {"class_label": "cat", "steps": 4}, 400),
    ("POST", "/generate", {"class_label": 1, "seed": "one", "steps": 4}, 400),
    ("POST", "/generate", {"class_label": 1, "steps": 21}, 422),
    ("POST", "/generate", {"class_label": 1, "num_images": 5, "steps": 4}, 422),
    ("POST", "/generate", {"prompt": "a red bus"}, 400),
    ("POST", "/generate", b"class_label=1", 400),
    ("GET", "/generate", None, 405),
    ("GET", "/nowhere", None, 404),
])
def test_malformed_requests_get_a_json_4xx(server, method, path, body, status):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    got, media, answer = _call(server + path, method, data)
    assert got == status and media == "application/json", (got, media, answer[:200])
    assert json.loads(answer)["error"]


def test_replicas_keep_serving_after_bad_requests(server, direct):
    before = _replicas(server)
    assert len(before) == 2 and all(info["status"] == "ok" for info in before.values())
    for seed in (7, 8):
        body = {"class_label": 2, "seed": seed, "steps": 4, "guidance": 4.0}
        images, meta = request_images(server + "/generate", body, timeout=TIMEOUT)
        assert meta["seed"] == seed and np.array_equal(np.stack(images), _expected(direct, body))
    assert {i["pid"] for i in _replicas(server).values()} == {i["pid"] for i in before.values()}


def test_a_full_replica_answers_503_and_a_second_app_lives_under_its_prefix(server, served_plan, direct):
    from ray import serve

    from runtime.serve import serve_plan

    serve_plan(served_plan, app_name="tight", route_prefix="/tight", replicas=1, num_cpus=0.5, max_pending=1,
               max_batch_size=1)
    url = server + "/tight/generate"
    try:
        answers: list[tuple[int, str, bytes]] = []
        body = json.dumps({"class_label": 4, "seed": 3, "steps": 20, "guidance": 4.0}).encode()
        threads = [threading.Thread(target=lambda: answers.append(_call(url, "POST", body))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=2 * TIMEOUT)
        codes = sorted(a[0] for a in answers)
        assert len(codes) == 4 and codes[0] == 200 and codes[-1] == 503, codes
        for status, media, data in answers:
            if status == 503:
                assert media == "application/json" and "overloaded" in json.loads(data)["error"]
            else:
                assert np.array_equal(decode_png(data)[None], _expected(direct, json.loads(body)))
        status, _, data = _call(server + "/tight/health")
        assert status == 200 and json.loads(data)["max_pending"] == 1
    finally:
        serve.delete("tight")


def test_a_replica_killed_mid_load_is_replaced(server, direct):
    before = _replicas(server)
    assert len(before) == 2
    victim = next(iter(before.values()))
    outcomes: list[object] = []
    stop = threading.Event()

    def load() -> None:  # keeps requests in flight while the replica dies
        k = 0
        while not stop.is_set():
            body = {"class_label": k % 10, "seed": 500 + k, "steps": 6, "guidance": 4.0}
            try:
                images, _ = request_images(server + "/generate", body, timeout=TIMEOUT)
                outcomes.append(len(images) == 1)
            except (RequestError, OSError) as e:  # the requests on the killed replica may fail, not hang
                outcomes.append(e)
            k += 1

    loaders = [threading.Thread(target=load) for _ in range(2)]
    for t in loaders:
        t.start()
    time.sleep(2)
    os.kill(victim["pid"], signal.SIGKILL)
    try:
        deadline = time.monotonic() + 180
        replaced = {}
        while time.monotonic() < deadline:
            replaced = _replicas(server, deadline_s=10)
            if len(replaced) == 2 and victim["replica"] not in replaced:
                break
            time.sleep(1)
        assert len(replaced) == 2 and victim["replica"] not in replaced, f"not replaced: {sorted(replaced)}"
    finally:
        stop.set()
        for t in loaders:
            t.join(timeout=2 * TIMEOUT)
    assert not any(o is False for o in outcomes), "a request answered with the wrong number of images"
    assert any(o is True for o in outcomes), f"no request succeeded during the load: {outcomes}"
    for seed in range(3):
        body = {"class_label": seed, "seed": 900 + seed, "steps": 4, "guidance": 4.0}
        images, _ = request_images(server + "/generate", body, timeout=TIMEOUT)
        assert np.array_equal(np.stack(images), _expected(direct, body))
