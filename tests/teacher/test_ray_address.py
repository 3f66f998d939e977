"""Audit finding: a Ray address where something that is not Ray accepts TCP made ``ray.init`` retry for
minutes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest


# ------------------------------------------------------------------------- 2. a port that is not Ray

from kd_detr.teacher import ray_session as rsession  # noqa: E402

MARK = f"KD_DETR_AUDIT_RAY_TEST={os.getpid()}"  # inherited by anything the join subprocess would start


class _FakeServer:
    """A TCP server on every interface (Ray dials this machine's IP for 127.0.0.1) that accepts and then says
    nothing (``reply=None``: a frozen head) or answers ``reply`` (a service that is not Ray)."""

    def __init__(self, reply: bytes | None = None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)  # the serving thread checks `stopped` between waits
        self.port = self.sock.getsockname()[1]
        self.reply, self.conns, self.stopped = reply, [], False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(self.reply)

    def close(self):
        self.stopped = True
        self.thread.join(timeout=5)
        for c in [*self.conns, self.sock]:
            with contextlib.suppress(OSError):
                c.close()


@contextlib.contextmanager
def _fake_server(reply: bytes | None = None):
    srv = _FakeServer(reply)
    try:
        yield srv
    finally:
        srv.close()


def _ray_processes_with_mark() -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if MARK.encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray" in cmd or "gcs_server" in cmd:
            out.append(cmd)
    return out


@pytest.mark.slow  # a fresh interpreter imports torch and Ray (~6-15 s on the 2-core machine)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_join_where_a_non_ray_server_listens_fails_in_bounded_time_with_one_line():
    """The finding: the TCP probe passed and ``ray.init`` retried for minutes. Now the join gives up after
    ``$KD_DETR_RAY_CONNECT_TIMEOUT`` (3 s here), names the address and its origin, and starts no Ray. It runs
    in a fresh process, so a failed join can touch no Ray session of the other tests."""
    script = textwrap.dedent("""
        import time, ray
        from kd_detr.teacher.ray_session import ensure_ray
        t0 = time.monotonic()
        try:
            ensure_ray()
            print("JOINED")
        except ValueError as e:
            print(f"{time.monotonic() - t0:.2f}|{ray.is_initialized()}|{e}")
    """)
    with _fake_server() as silent:
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{silent.port}", "KD_DETR_RAY_CONNECT_TIMEOUT": "3",
               MARK.split("=")[0]: MARK.split("=")[1]}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    seconds, initialised, msg = out.stdout.strip().split("|", 2)
    assert 2.9 <= float(seconds) < 8 and initialised == "False"  # bounded by the 3 s, not minutes
    assert msg.startswith(f"no Ray cluster answered at 127.0.0.1:{silent.port} (from $RAY_ADDRESS")
    assert "within 3 s" in msg and "$KD_DETR_RAY_CONNECT_TIMEOUT=SECONDS waits longer" in msg
    assert "unset RAY_ADDRESS" in msg and "token" not in msg.lower() and "\n" not in msg
    assert not _ray_processes_with_mark()


def test_join_at_a_silent_or_a_non_ray_server_never_reaches_ray_init(no_ray_init, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(rsession.CONNECT_TIMEOUT_ENV, "1")
    with _fake_server() as silent, _fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as garbage:
        t0 = time.monotonic()
        with pytest.raises(ValueError) as e1:
            rsession.ensure_ray(f"127.0.0.1:{silent.port}")
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(ValueError) as e2:
            rsession.ensure_ray(f"127.0.0.1:{garbage.port}")
        assert time.monotonic() - t0 < 5
    m1, m2 = str(e1.value), str(e2.value)
    assert m1.startswith(f"no Ray cluster answered at 127.0.0.1:{silent.port} (from --address") and "within 1 s" in m1
    assert "leave out --address" in m1
    assert m2.startswith(f"no Ray cluster at 127.0.0.1:{garbage.port} (from --address") and "not a Ray GCS" in m2
    for m in (m1, m2):
        assert "token" not in m.lower() and "\n" not in m


def test_connect_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(rsession.CONNECT_TIMEOUT_ENV, raising=False)
    assert rsession.connect_timeout() == 30.0
    monkeypatch.setenv(rsession.CONNECT_TIMEOUT_ENV, "2.5")
    assert rsession.connect_timeout() == 2.5
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv(rsession.CONNECT_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=rf"^\$KD_DETR_RAY_CONNECT_TIMEOUT='{bad}' is not a number of seconds"):
            rsession.connect_timeout()


def test_only_a_refused_token_suggests_token_authentication():
    """A gRPC server that refuses every call as unauthenticated (what a Ray GCS answers a client without the
    cluster's token): the message says so; a failed ray.init after the GCS answered does not blame tokens."""
    grpc = pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    class Refuse(grpc.GenericRpcHandler):
        def service(self, details):
            def refuse(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: token missing or incorrect")
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(ThreadPoolExecutor(max_workers=1), handlers=[Refuse()])
    port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    try:
        with pytest.raises(ValueError) as e:
            rsession.check_ray_answers(f"127.0.0.1:{port}", source="$RAY_ADDRESS", timeout=5)
    finally:
        server.stop(None)
    msg = str(e.value)
    assert msg.startswith(f"the Ray cluster at 127.0.0.1:{port} (from $RAY_ADDRESS")
    assert "InvalidAuthToken" in msg and "RAY_AUTH_MODE=token" in msg


@pytest.mark.parametrize("ray_error, token_hint", [
    ("Failed to connect to Ray cluster at 10.0.0.1:6379", False),
    ("Unauthenticated: RPC error: InvalidAuthToken", True),
])
def test_failed_ray_init_blames_tokens_only_when_ray_says_so(monkeypatch, ray_error, token_hint):
    monkeypatch.setattr(rsession.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(rsession, "check_ray_reachable", lambda *a, **k: None)
    monkeypatch.setattr(rsession, "check_ray_answers", lambda *a, **k: None)

    def init(**kwargs):
        raise ConnectionError(ray_error)

    monkeypatch.setattr(rsession.ray, "init", init)
    with pytest.raises(ValueError) as e:
        rsession.ensure_ray("10.0.0.1:6379")
    msg = str(e.value)
    assert msg.startswith(f"cannot join the Ray cluster at 10.0.0.1:6379 (from --address): {ray_error}: ")
    assert ("RAY_AUTH_MODE=token" in msg) is token_hint


def test_a_live_ray_cluster_passes_the_probe(ray_session):
    """The probe must not refuse a real cluster (the shared local Ray of the tests, with its token)."""
    address = ray_session.get_runtime_context().gcs_address
    t0 = time.monotonic()
    rsession.check_ray_answers(address, timeout=10)
    assert time.monotonic() - t0 < 5
