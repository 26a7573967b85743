"""motioncharacter.storage: local paths and s3:// through the real local S3 server."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from motioncharacter import storage
from motioncharacter.stack import free_port
from motioncharacter.storage import StorageError


# ---------------------------------------------------------------- local paths
def test_local_write_is_atomic(tmp_path, monkeypatch):
    f = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(f), b"one")
    storage.write_bytes(str(f), b"two")
    assert storage.read_bytes(str(f)) == b"two"

    def crash(src, dst):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        storage.write_bytes(str(f), b"three")
    with pytest.raises(OSError):
        storage.upload_file(str(f), str(tmp_path / "copy.bin"))
    assert f.read_bytes() == b"two"  # the old content, never a half-written file
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.bin"]  # no temp files left


def test_local_dirs_and_copies(tmp_path):
    src = tmp_path / "src"
    storage.write_bytes(str(src / "x.txt"), b"x")
    storage.write_bytes(str(src / "sub" / "y.txt"), b"y")
    assert [Path(p).relative_to(src).as_posix() for p in storage.list_files(str(src))] == ["sub/y.txt", "x.txt"]
    assert storage.upload_dir(src, str(tmp_path / "mirror")) == 2
    out = storage.download_dir(str(tmp_path / "mirror"), tmp_path / "back")
    assert (out / "sub" / "y.txt").read_bytes() == b"y"
    # a single file given to download_dir lands under its own name
    one = storage.download_dir(str(src / "x.txt"), tmp_path / "one")
    assert (one / "x.txt").read_bytes() == b"x"
    assert storage.local_copy(str(src)) == src
    assert storage.exists(str(src / "x.txt")) and not storage.exists(str(src / "nope"))
    for bad in (lambda: storage.read_bytes(str(src / "nope")), lambda: storage.local_copy(str(src / "nope")),
                lambda: storage.list_files(str(src / "nope")).__next__()):
        with pytest.raises(StorageError, match="does not exist"):
            bad()


def test_s3_without_endpoint_says_what_to_set(monkeypatch):
    for v in ("MOTIONCHARACTER_S3_ENDPOINT", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(StorageError, match="MOTIONCHARACTER_S3_ENDPOINT.*stack up"):
        storage.read_bytes("s3://bucket/key")


def test_unreachable_endpoint_fails_fast_naming_it(monkeypatch):
    ep = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MOTIONCHARACTER_S3_ENDPOINT", ep)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk-not-real")
    with pytest.raises(StorageError, match=rf"{ep} unreachable after {storage.RETRIES} tries"):
        storage.read_bytes("s3://bucket/key")


def test_a_dropping_endpoint_gets_exactly_the_configured_tries(monkeypatch):
    """A server that accepts and hangs up: our RETRIES connections, not urllib3's or minio's own
    retry loops on top (which take minutes to give up)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    ep = f"http://127.0.0.1:{srv.getsockname()[1]}"
    monkeypatch.setenv("MOTIONCHARACTER_S3_ENDPOINT", ep)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk-not-real")
    try:
        with pytest.raises(storage.StoreUnavailable, match=rf"{ep} unreachable after {storage.RETRIES} tries"):
            storage.read_bytes("s3://bucket/key")
    finally:
        srv.close()
    assert len(accepted) == storage.RETRIES


# ---------------------------------------------------------------- the real S3 server
@pytest.mark.services
def test_s3_round_trip(stack, tmp_path):
    base = f"s3://{stack.bucket}/rt-{uuid.uuid4().hex[:8]}"
    storage.write_bytes(f"{base}/a.bin", b"\x00\x01abc")
    assert storage.read_bytes(f"{base}/a.bin") == b"\x00\x01abc"
    assert storage.exists(f"{base}/a.bin") and storage.exists(base) and storage.exists(base + "/")
    assert not storage.exists(f"{base}/missing") and not storage.exists("s3://no-such-bucket-mc/x")
    with pytest.raises(StorageError, match="NoSuchKey"):
        storage.read_bytes(f"{base}/missing")

    src = tmp_path / "src"
    for rel, data in {"x.txt": b"x", "sub/y.txt": b"y" * 10000, "sub/deeper/z.txt": b"z"}.items():
        storage.write_bytes(str(src / rel), data)
    assert storage.upload_dir(src, f"{base}/dir") == 3
    assert list(storage.list_files(f"{base}/dir")) == [
        f"{base}/dir/sub/deeper/z.txt", f"{base}/dir/sub/y.txt", f"{base}/dir/x.txt"]
    assert list(storage.list_files(f"{base}/dir/x.txt")) == [f"{base}/dir/x.txt"]
    assert list(storage.list_files(f"{base}/di")) == []  # a prefix is a folder, not a string prefix

    back = storage.download_dir(f"{base}/dir", tmp_path / "back")
    assert (back / "sub" / "y.txt").read_bytes() == b"y" * 10000
    copy = storage.local_copy(f"{base}/dir", tmp_path / "work")
    assert (copy / "sub" / "deeper" / "z.txt").read_bytes() == b"z"
    single = storage.local_copy(f"{base}/a.bin", tmp_path / "work")
    assert single.read_bytes() == b"\x00\x01abc"
    storage.upload_file(single, f"{base}/up/a.bin")
    assert storage.download_file(f"{base}/up/a.bin", tmp_path / "dl.bin").read_bytes() == b"\x00\x01abc"
    with pytest.raises(StorageError, match="holds no objects"):
        storage.local_copy(f"{base}/nothing-here/")


@pytest.mark.services
def test_s3_bad_input_is_a_storage_error(stack):
    for bad in ("s3://B_ad/x", "s3://b/x"):  # refused by the server, or by minio before sending
        with pytest.raises(StorageError, match="(?i)invalid ?bucket ?name"):
            storage.write_bytes(bad, b"1")
    with pytest.raises(StorageError, match="not an object"):
        storage.write_bytes(f"s3://{stack.bucket}/folder/", b"1")


@pytest.mark.services
def test_wrong_secret_is_rejected_clearly(stack, monkeypatch):
    storage.write_bytes(f"s3://{stack.bucket}/auth/x", b"1")
    wrong = "definitely-not-the-secret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    for op in (lambda: storage.read_bytes(f"s3://{stack.bucket}/auth/x"),
               lambda: storage.write_bytes(f"s3://{stack.bucket}/auth/y", b"2"),
               lambda: list(storage.list_files(f"s3://{stack.bucket}/auth/"))):
        with pytest.raises(StorageError, match="refused the credentials") as e:
            op()
        assert wrong not in str(e.value) and stack.env()["AWS_SECRET_ACCESS_KEY"] not in str(e.value)
