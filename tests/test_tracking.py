"""motioncharacter.tracking: embedded default, fail-fast on a dead server, params without secrets,
and a run logged through the real MLflow server with its artifacts landing in the S3 bucket."""
from __future__ import annotations

import os

import pytest

from motioncharacter import storage, tracking
from motioncharacter.stack import free_port


def test_flatten_and_secret_filter(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    params = tracking.safe_params({
        "data": {"fps": 4, "frames": 16, "sizes": [512, 256]},
        "s3": {"endpoint": "http://x", "secret_key": "abc", "access_key_id": "AK"},
        "db_password": "pw", "hf_token": "t", "api-key": "k",
        "text": {"max_tokens": 77, "tokenizer": "clip"}, "keyframes": 3,
        "innocent_name": "s3cr3t-value",  # a secret's value under any name is dropped too
        "layers": [{"dim": 8}],
    })
    assert params == {"data.fps": "4", "data.frames": "16", "data.sizes": "[512, 256]", "s3.endpoint": "http://x",
                      "text.max_tokens": "77", "text.tokenizer": "clip", "keyframes": "3", "layers.0.dim": "8"}


def test_secrets_of_any_credential_variable_and_inside_urls_are_kept_out(monkeypatch):
    monkeypatch.setenv("MOTIONCHARACTER_VLM_API_KEY", "vlm-k3y-123456")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-abcdef-987")  # any name that reads like a credential
    params = tracking.safe_params({
        "caption": {"url": "http://vlm:8000/v1", "header": "Bearer vlm-k3y-123456"},
        "other": "x tok-abcdef-987 y",
        "store": "s3://alice:hunter2-pw@minio:9000/bucket", "here": os.getcwd(),
    })
    assert params == {"caption.url": "http://vlm:8000/v1", "store": "s3://alice:***@minio:9000/bucket",
                      "here": os.getcwd()}  # PWD is a path, not a password


def test_embedded_default_is_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.run("unit", run_name="local") as r:
        tracking.log_params({"a": {"b": 1}})
    import mlflow

    assert mlflow.get_run(r.info.run_id).data.params == {"a.b": "1"}
    assert (tmp_path / "mlflow.db").is_file()


def test_unreachable_server_fails_fast_with_advice(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    started = []
    monkeypatch.setattr(mlflow, "start_run", lambda *a, **k: started.append(1))
    with pytest.raises(tracking.TrackingError, match=rf"{uri} is unreachable.*motioncharacter stack up"):
        with tracking.run("unit"):
            pass
    assert not started  # refused before MLflow's own client, which retries for minutes, is used


def test_a_silent_server_is_given_up_at_the_check_timeout():
    import socket

    srv = socket.socket()  # listens (the kernel accepts) but never answers
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    try:
        with pytest.raises(tracking.TrackingError, match="unreachable.*timed out"):
            tracking.check_server(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout=0.5)
    finally:
        srv.close()


@pytest.mark.services
def test_run_through_server_lands_in_s3(stack, tmp_path):
    import mlflow

    (tmp_path / "report.txt").write_text("hello artifact")
    folder = tmp_path / "sheets"
    folder.mkdir()
    (folder / "sheet.png").write_bytes(b"\x89PNG fake")
    secret = stack.env()["AWS_SECRET_ACCESS_KEY"]
    with tracking.run("stack-test", run_name="rt") as r:
        logged = tracking.log_params({"prepare": {"fps": 4}, "aws_secret_access_key": secret,
                                      "endpoint_pw": secret, "storage": {"password": "x"}})
        tracking.log_metrics({"kept": 3, "dropped": {"resolution": 1}})
        tracking.log_artifact(tmp_path / "report.txt")
        tracking.log_artifact(folder, "sheets")
    assert logged == {"prepare.fps": "4"}

    run = mlflow.get_run(r.info.run_id)
    assert mlflow.get_tracking_uri() == stack.mlflow_uri
    assert run.data.params == {"prepare.fps": "4"}
    assert run.data.metrics == {"kept": 3.0, "dropped.resolution": 1.0}
    assert secret not in str(run.data.params) + str(run.data.tags)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server

    # the server stored the artifacts in the S3 bucket, under the run's id
    files = [f for f in storage.list_files(f"s3://{stack.bucket}/mlflow/") if r.info.run_id in f]
    assert sorted(f.rsplit("/artifacts/", 1)[1] for f in files) == ["report.txt", "sheets/sheet.png"]
    report = next(f for f in files if f.endswith("report.txt"))
    assert storage.read_bytes(report) == b"hello artifact"
