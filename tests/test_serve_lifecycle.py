"""`motioncharacter serve` never outlives its server or leaves it behind: Ctrl-C then a kill while
a request is being generated leaves no tritonserver, no Python stub and (after the next start) no
shared memory behind; the admin APIs
(model repository, shared memory) are refused without the admin key."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from motioncharacter.stack import free_port
from motioncharacter.serving.client import MotionCharacterClient, Progress
from motioncharacter.serving.server import SHM_DIR, SHM_PREFIX, remove_stale_shm

from serving_fixtures import PROMPT, export_tiny, face_image

pytestmark = pytest.mark.services


def _serve(repo, tmp_path, env=None):
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "motioncharacter.cli", "serve", "--model-repository", str(repo),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                            stdout=open(tmp_path / "serve.log", "ab"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300  # a hang guard, not a speed requirement
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, http, grpc
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
        time.sleep(0.5)


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_kill_during_an_inflight_request_leaves_nothing_running(tmp_path):
    repo = export_tiny(tmp_path / "repo")
    proc, _, grpc = _serve(repo, tmp_path)
    servers = _tree(proc.pid)
    assert any(p.name() == "tritonserver" for p in servers)
    assert any("triton_python_backend_stub" in " ".join(p.cmdline()) for p in servers)

    started = threading.Event()

    def stream():  # a long generation: the server's step limit
        try:
            with MotionCharacterClient(f"grpc://127.0.0.1:{grpc}", timeout_s=300, retries=0) as c:
                for event in c.stream(face_image(), PROMPT, steps=60, frames=8, height=64, width=64):
                    if isinstance(event, Progress):
                        started.set()
        except Exception:  # noqa: BLE001 - the server goes away mid-stream: that is the point
            pass

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(120), "the request never started generating"
    assert _regions(proc.pid), "the Python backend's shared memory does not carry serve's prefix"
    proc.send_signal(signal.SIGINT)  # a user's Ctrl-C ...
    time.sleep(0.5)
    proc.kill()  # ... then a kill (or a supervisor's SIGKILL)
    proc.wait(10)
    gone, alive = psutil.wait_procs(servers, timeout=90)  # Triton's exit timeout is 15 s
    assert not alive, [f"{p.pid} {p.name()}" for p in alive]
    # serve died by SIGKILL and could not clean up; the next server's start removes what it left
    remove_stale_shm()
    assert not _regions(proc.pid)


def _regions(pid: int) -> list:
    return sorted(SHM_DIR.glob(f"{SHM_PREFIX}{pid}_*"))


def test_admin_apis_are_restricted(tmp_path, monkeypatch):
    repo = export_tiny(tmp_path / "repo")
    env = dict(__import__("os").environ, MOTIONCHARACTER_TRITON_ADMIN_KEY="k-" + "x" * 20)
    proc, http, _ = _serve(repo, tmp_path, env)
    try:
        def index(headers: dict) -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{http}/v2/repository/index", data=b"{}",
                                         headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    json.loads(r.read())
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        assert index({}) == 403 and index({"triton-admin-key": "wrong"}) == 403
        assert index({"triton-admin-key": env["MOTIONCHARACTER_TRITON_ADMIN_KEY"]}) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/motioncharacter/config", timeout=10) as r:
            assert r.status == 200  # what clients need stays open
        assert _regions(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert not _regions(proc.pid)  # a clean stop removes the server's shared memory
