"""Rollouts on Triton: every deploy is a new model version that the server loads and warms up while
the old one keeps serving; `deploy --rollback` returns to the previous one; the smoke step checks the
version served. Against the session's real tritonserver (serving_fixtures.triton) and a real S3 server."""
from __future__ import annotations

import struct
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from motioncharacter.cli import main
from motioncharacter.serving.client import MotionCharacterClient, VersionMismatch
from motioncharacter.serving.repository import (MODEL, STREAM_MODEL, DeployOptions, rollback, served_version,
                                                versions, warmup_request, write_version)
from motioncharacter.serving.request_args import Limits
from motioncharacter.serving.server import ADMIN_KEY_ENV

from serving_fixtures import PROMPT, face_image, repository_restored  # `triton`, the session's one server: conftest.py

pytestmark = pytest.mark.services

# The options serving_fixtures.export_tiny gives the `triton` fixture's version 1: a new version with
# other limits would change what the serving tests sharing that server see.
DEPLOY_TINY = ["--preset", "tiny", "--max-batch-size", "2", "--max-frames", "8", "--max-resolution", "128",
               "--max-steps", "60", "--max-prompt-chars", "200"]
SMALL = dict(steps=1, frames=2, height=64, width=64, seed=3)


@pytest.fixture(scope="module", autouse=True)
def restored_repository(triton):
    """These tests deploy to the session's server: its repository is put back afterwards."""
    with repository_restored(triton):
        yield


class Traffic:
    """A thread sending small requests back to back (no retries) until the block ends."""

    def __init__(self, url: str):
        self.url, self.done, self.failures = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with MotionCharacterClient(self.url, timeout_s=300, retries=0) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    assert c.generate(face_image(), PROMPT, **SMALL).frames.shape == (2, 64, 64, 3)
                    self.done.append((t0, time.monotonic()))
                except Exception as e:  # noqa: BLE001 - every failure is the finding
                    self.failures.append(repr(e))

    def answered_during(self, t0: float, t1: float) -> int:
        """Requests in flight at some point of [t0, t1] that were answered."""
        return sum(1 for a, b in self.done if a < t1 and b > t0)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        deadline = time.monotonic() + 300  # a hang guard, not a speed requirement
        while not self.done and not self.failures and time.monotonic() < deadline:
            time.sleep(0.2)
        assert self.done, f"no request answered before the swap: {self.failures[:3]}"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(300)


def test_deploy_then_rollback_while_requests_are_answered(triton, monkeypatch, capsys):
    repo, url = triton.repository, triton.http_url
    monkeypatch.setenv(ADMIN_KEY_ENV, triton.admin_key)
    first = served_version(repo)
    with repository_restored(triton), MotionCharacterClient(url, timeout_s=120) as c:
        c.check_version(first)  # the fixture's deploy
        with Traffic(url) as traffic:
            t0 = time.monotonic()
            new = max(versions(repo)) + 1  # a folder another test left unserved does not change what is served
            assert main(["deploy", *DEPLOY_TINY, "--model-repository", repo, "--url", url]) == 0
            t1 = time.monotonic()
            assert versions(repo)[-1] == new and first in versions(repo) and served_version(repo) == new
            c.check_version(new)  # both models: only the new version is loaded, and it is ready
            assert traffic.answered_during(t0, t1) >= 1

            assert main(["deploy", "--rollback", "--model-repository", repo, "--url", url]) == 0
            t2 = time.monotonic()
            assert served_version(repo) == first
            c.check_version(first)
            assert traffic.answered_during(t1, t2) >= 1
        assert traffic.failures == []
        with pytest.raises(VersionMismatch, match=f"serves motioncharacter version\\(s\\) {first}.*expected version {new}"):
            c.check_version(new)
    for model in (MODEL, STREAM_MODEL):  # the config the first version was deployed with, byte for byte
        d = Path(repo, model)
        assert (d / "config.pbtxt").read_text() == (d / str(first) / "deployed.pbtxt").read_text()
    out = capsys.readouterr().out
    assert f"{url} serves version {new}" in out and f"point at version {first} again (was {new})" in out


def test_a_version_that_does_not_load_never_replaces_the_served_one(triton, monkeypatch, tmp_path, capsys):
    """Triton refuses a version whose model cannot load (or whose warmup fails); deploy reports it, and
    the repository points back at the version the server still serves."""
    repo, url = triton.repository, triton.http_url
    monkeypatch.setenv(ADMIN_KEY_ENV, triton.admin_key)
    served = served_version(repo)
    broken = tmp_path / "weights"  # configs only, no tensors: the backend's initialize fails
    for part, cfg in (("unet", '{"sample_size": 8}'), ("vae", '{"block_out_channels": [8, 8, 8, 8]}')):
        (broken / part).mkdir(parents=True)
        (broken / part / "config.json").write_text(cfg)
    new = max(versions(repo)) + 1
    assert main(["deploy", "--weights", str(broken), "--model-repository", repo, "--url", url]) == 1
    err = capsys.readouterr().err
    assert f"did not switch to version {new}" in err and f"it serves version {served} again" in err
    assert served_version(repo) == served and new in versions(repo)
    with MotionCharacterClient(url, timeout_s=120) as c:
        c.check_version(served)
        assert c.ready()  # what the readiness probe asks: the failed version does not take the pod out
        assert c.generate(face_image(), PROMPT, **SMALL).frames.shape == (2, 64, 64, 3)


def test_smoke_step_checks_the_version_it_expects(triton, tmp_path):
    from motioncharacter.pipelines.steps import smoke_step
    from motioncharacter.video import open_video

    out = smoke_step(triton.repository, triton.http_url, str(tmp_path / "ok"), PROMPT, "smiles", 8.0)
    assert len(open_video(out)) == 8
    other = tmp_path / "repo"  # a repository whose deploy this server never loaded
    for _ in range(served_version(triton.repository) + 1):
        write_version(str(other), DeployOptions(preset="tiny", warmup=False))
    with pytest.raises(VersionMismatch, match=f"expected version {served_version(str(other))} only"):
        smoke_step(str(other), triton.http_url, str(tmp_path / "bad"), PROMPT, "smiles", 8.0, version_wait_s=1)


def test_versions_and_rollback_on_s3(s3_only_stack, monkeypatch, capsys):
    from motioncharacter import storage

    for k, v in s3_only_stack.env().items():
        monkeypatch.setenv(k, v)
    uri = f"s3://models/rollout/{time.time_ns()}"
    deploy = ["deploy", "--preset", "tiny", "--model-repository", uri]
    assert main(deploy) == 0 and main(deploy) == 0
    assert versions(uri) == [1, 2] and served_version(uri) == 2

    def config(model=MODEL, version=None):
        return storage.read_bytes(f"{uri}/{model}/{version}/deployed.pbtxt" if version else
                                  f"{uri}/{model}/config.pbtxt").decode()

    for model in (MODEL, STREAM_MODEL):
        assert "version_policy: { specific: { versions: [ 2 ] } }" in config(model)
        assert 'key: "previous_version" value: { string_value: "1" }' in config(model)
        assert config(model) == config(model, 2)
    assert main(deploy + ["--version", "2"]) == 1  # never overwrites a version a server may serve
    assert "version 2 already exists" in capsys.readouterr().err

    assert main(["deploy", "--rollback", "--model-repository", uri]) == 0
    assert served_version(uri) == 1 and config() == config(version=1)
    assert main(["deploy", "--rollback", "--model-repository", uri]) == 1
    assert "nothing to roll back to" in capsys.readouterr().err
    # a deploy after a rollback: version 3, and rolling back from it returns to 1, not to the bad 2
    assert main(deploy) == 0 and versions(uri) == [1, 2, 3] and served_version(uri) == 3
    assert rollback(uri) == (3, 1)
    assert rollback(uri, to_version=3) == (1, 3) and "versions: [ 3 ]" in config(STREAM_MODEL)
    # beyond the newest 3 (the default --keep-versions) the oldest goes, from the bucket too
    assert main(deploy) == 0 and versions(uri) == [2, 3, 4]
    assert not list(storage.list_files(f"{uri}/{MODEL}/1")) and not list(storage.list_files(f"{uri}/{STREAM_MODEL}/1"))


def test_old_versions_are_pruned_but_never_the_one_to_roll_back_to(tmp_path):
    repo = str(tmp_path / "repo")
    opts = DeployOptions(preset="tiny", warmup=False)
    for _ in range(3):
        write_version(repo, opts)
    assert versions(repo) == [1, 2, 3]
    rollback(repo, to_version=1)
    assert write_version(repo, opts) == 4 and versions(repo) == [1, 2, 3, 4]  # 1 is what 4 replaced
    assert write_version(repo, opts) == 5 and versions(repo) == [3, 4, 5]
    assert not (tmp_path / "repo" / MODEL / "1").exists() and not (tmp_path / "repo" / STREAM_MODEL / "2").exists()
    assert rollback(repo) == (5, 4)
    write_version(repo, replace(opts, keep_versions=0))
    write_version(repo, replace(opts, version_policy="latest:2"))  # the user picks what is served: all stay
    assert versions(repo) == [3, 4, 5, 6, 7]
    for bad in (1, -1):
        with pytest.raises(ValueError, match="keep-versions"):
            write_version(repo, replace(opts, keep_versions=bad))


def test_deploy_options_that_cannot_work_are_refused_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    repo = str(tmp_path / "repo")
    assert main(["deploy", "--preset", "tiny", "--model-repository", repo, "--url", "http://127.0.0.1:1"]) == 1
    assert ADMIN_KEY_ENV in capsys.readouterr().err and not (tmp_path / "repo").exists()
    assert main(["deploy", "--rollback", "--preset", "tiny", "--model-repository", repo]) == 1
    assert "--rollback returns to a version already in the repository" in capsys.readouterr().err
    assert main(["deploy", "--model-repository", repo]) == 1
    assert "give one of --weights" in capsys.readouterr().err
    assert main(["deploy", "--rollback", "--model-repository", repo]) == 1
    assert "holds no deployed model" in capsys.readouterr().err


def test_warmup_is_the_smallest_valid_request(tmp_path):
    from motioncharacter.serving.request_args import parse

    req = warmup_request({"height": 512, "width": 384, "frames": 16, "steps": 25}, Limits())
    assert {k: v for k, v in req.items() if k != "image"} == dict(prompt="a person", steps=1, frames=2,
                                                                   height=64, width=64)
    small = warmup_request({"height": 512, "width": 512}, Limits(max_resolution=44, max_frames=1))
    assert (small["height"], small["width"], small["frames"]) == (40, 40, 1)  # 44 -> the multiple of 8 below
    # it passes the server's own request checks
    kw = parse(lambda name: None if name not in req else np.array([[req[name]]], dtype=object if name in
               ("image", "prompt") else np.int32), Limits())
    assert kw["image"].shape == (128, 128, 3) and (kw["steps"], kw["frames"]) == (1, 2)

    repo = tmp_path / "repo"
    write_version(str(repo), DeployOptions(preset="tiny"))
    cfg = (repo / MODEL / "config.pbtxt").read_text()
    assert 'model_warmup [ {\n  name: "smallest_request"\n  batch_size: 1' in cfg
    for model in (MODEL, STREAM_MODEL):
        files = {p.name: p.read_bytes() for p in (repo / model / "warmup").iterdir()}
        assert files["steps_1"] == b"\x01\x00\x00\x00" and files["frames_2"] == b"\x02\x00\x00\x00"
        assert files["height_64"] == files["width_64"] == (64).to_bytes(4, "little")
        image = next(v for k, v in files.items() if k.startswith("image_"))
        (n,) = struct.unpack("<I", image[:4])  # Triton's TYPE_STRING element: length, then the bytes
        assert n == len(image) - 4 and image[4:6] == b"\xff\xd8"  # a JPEG
        prompt = next(v for k, v in files.items() if k.startswith("prompt_"))
        assert prompt == b"\x08\x00\x00\x00a person"
        for name in files:
            assert f'input_data_file: "{name}"' in (repo / model / "config.pbtxt").read_text()


def test_server_model_control_modes(tmp_path, monkeypatch):
    """explicit (deploy --url reloads) loads every model at start; poll rescans the repository."""
    from motioncharacter.serving.server import TritonServer

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    explicit = TritonServer(str(tmp_path), http_port=None, grpc_port=None, metrics_port=None).command()
    assert "--model-control-mode=explicit" in explicit and "--load-model=*" in explicit
    poll = TritonServer(str(tmp_path), model_control="poll", poll_s=2, http_port=None, grpc_port=None,
                        metrics_port=None).command()
    assert "--model-control-mode=poll" in poll and "--repository-poll-secs=2" in poll
    assert not any(a.startswith("--load-model") for a in poll)
    with pytest.raises(ValueError, match="model_control must be one of explicit, poll, got 'none'"):
        TritonServer(str(tmp_path), model_control="none")
