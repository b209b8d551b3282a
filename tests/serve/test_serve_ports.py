"""Serve's HTTP port: a taken port is a clear error that leaves no cluster behind, and port 0 retries a pick
that another process took before Serve's proxy bound it. Each test runs its own local Ray cluster."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

pytest.importorskip("ray", reason="the serve extra (Ray Serve) is not installed: pip install -e '.[serve]'")

from passes.errors import DitmergeError  # noqa: E402
from tests.serve.conftest import shutdown_ray  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster per test

RAY_INIT = {"num_cpus": 1, "log_to_driver": False, "object_store_memory": 100 * 2**20}


@pytest.fixture
def taken_port():
    """A port another process (here: this one) holds, listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _proxy_answers(port: int) -> bool:
    """Serve's proxy answers HTTP on ``port`` (any status: with no application deployed it may say 503)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/routes", timeout=30):
            return True
    except urllib.error.HTTPError:
        return True


def test_a_taken_port_is_a_user_error_and_the_started_cluster_is_shut_down(served_plan, taken_port):
    import ray

    from runtime.serve import serve_plan

    try:
        with pytest.raises(DitmergeError, match=f"cannot serve HTTP on 127.0.0.1:{taken_port}: the address is in use"):
            serve_plan(served_plan, port=taken_port, ray_init=RAY_INIT, ship_code=False)
        assert not ray.is_initialized(), "serve_plan left the cluster it started running after failing"
    finally:
        shutdown_ray()


def test_port_0_retries_a_pick_taken_before_the_proxy_bound_it(monkeypatch, taken_port):
    import runtime.serve as rs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        fresh = s.getsockname()[1]
    picks = iter([taken_port, fresh])
    asked: list[str] = []

    def pick(host: str) -> int:
        asked.append(host)
        return next(picks)

    monkeypatch.setattr(rs, "_free_port", pick)
    try:
        rs.connect(None, ship_code=False, **RAY_INIT)
        assert rs.start_http("127.0.0.1", 0) == fresh and rs.http_port() == fresh
        assert asked == ["127.0.0.1", "127.0.0.1"], "the taken pick was not retried exactly once"
        assert _proxy_answers(fresh)
        # a given port that is taken is refused, and the half-started Serve does not linger: the next start
        # gets a new proxy on a new port instead of joining one stuck on the taken port
        rs.serve.shutdown()
        with pytest.raises(DitmergeError, match="the address is in use"):
            rs.start_http("127.0.0.1", taken_port)
        monkeypatch.undo()
        again = rs.start_http("127.0.0.1", 0)
        assert again != taken_port and _proxy_answers(again)
    finally:
        shutdown_ray()
