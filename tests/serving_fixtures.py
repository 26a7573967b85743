"""Fixtures for the serving tests: a tiny-preset model repository and a real tritonserver on loopback.

Imported by tests/test_serving.py (kept out of conftest.py, which other suites own).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

# Small limits so the "too large" checks are cheap to exercise.
LIMITS = dict(max_frames=8, max_resolution=128, max_steps=60, max_prompt_chars=200)
# The tiny request every test and the benchmark uses.
TINY = dict(steps=3, frames=8, height=64, width=64, seed=7, intensity=8.0, action="smiles")
PROMPT = "a person talking to the camera"


def face_image() -> np.ndarray:
    """A real portrait shipped with scikit-image (RGB uint8), cut to the head and shoulders."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[0:256, 96:352])


def request(**values):
    """A getter over request inputs like the backend's: arrays of shape [1, 1] (a batch of one;
    list values [1, n]), None when absent."""
    from motioncharacter.serving.request_args import INPUTS

    def get(name):
        if name not in values:
            return None
        _, dtype, _, _ = INPUTS[name]
        v = values[name]
        v = v if isinstance(v, list) else [v]
        return np.array([[x.encode() if isinstance(x, str) else x for x in v]], dtype=dtype)
    return get


def export_tiny(dest: Path, **overrides) -> Path:
    from motioncharacter.serving.repository import DeployOptions, export_repository
    from motioncharacter.serving.request_args import Limits

    opts = DeployOptions(**{"preset": "tiny", "max_batch_size": 2, "limits": Limits(**LIMITS), **overrides})
    export_repository(str(dest), opts)
    return dest


def wait_for_log(path: Path, needle: str, timeout_s: float = 60.0) -> str:
    """The first log line containing ``needle`` (the server writes asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not in {path} after {timeout_s} s")


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    """A tritonserver serving the tiny repository; stopped (cleanly) after the session."""
    from motioncharacter.serving.server import TritonServer

    root = tmp_path_factory.mktemp("triton")
    repo = export_tiny(root / "repo")
    server = TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None, log_file=root / "triton.log")
    server.start(timeout_s=300)
    yield server
    assert server.stop() == 0, "tritonserver did not exit cleanly"


@pytest.fixture(scope="session")
def tiny_pipe():
    """The in-process pipeline the served results are compared against."""
    from motioncharacter.model import inference

    return inference, inference.load_pipeline(preset="tiny")


@contextmanager
def repository_restored(server):
    """For a test that deploys to the session's server: afterwards its repository is as the test found
    it (the versions the test added removed, both configs back), so no other test sees its leftovers.
    The test must leave the server serving the version it served before (a rollback does)."""
    import shutil

    from motioncharacter.serving.repository import MODEL, STREAM_MODEL, served_version, versions

    repo = Path(server.repository)
    configs = {m: (repo / m / "config.pbtxt").read_text() for m in (MODEL, STREAM_MODEL)}
    before, served = set(versions(str(repo))), served_version(str(repo))
    yield
    assert served_version(str(repo)) == served, "the test left another version served"
    for v in set(versions(str(repo))) - before:
        for m in (MODEL, STREAM_MODEL):
            shutil.rmtree(repo / m / str(v), ignore_errors=True)
    for m, text in configs.items():
        (repo / m / "config.pbtxt").write_text(text)
