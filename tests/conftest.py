"""Shared fixtures.

``stack``: a real local S3 server + MLflow server (``motioncharacter.stack``), started once per
session in a temporary state dir on free ports; while a test uses it, the environment points
storage and tracking at it (restored afterwards).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads spinning slowed tiny runs 10x on 2 shared cores

import tempfile

import pytest

# Nothing the user has running or lying in the folder reaches a test: a stack left up by
# `motioncharacter demo` (./.motioncharacter), its exported endpoints and credentials, a tracking
# server, a trained mini model. Tests that need services get the session's own `stack`.
USER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MOTIONCHARACTER_S3_ENDPOINT", "MOTIONCHARACTER_BUCKET",
            "MOTIONCHARACTER_MINI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")
for _var in USER_ENV:
    os.environ.pop(_var, None)
_session_dir = tempfile.mkdtemp(prefix="mc-test-")
os.environ["MOTIONCHARACTER_STATE_DIR"] = os.path.join(_session_dir, "stack")
# the embedded default store would be ./mlflow.db in the working directory: the session's own instead
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.path.join(_session_dir, 'mlflow.db')}"

# One tritonserver per session for every suite that uses it: a fixture imported into each test module
# would be a separate fixture per module, each starting its own server.
from serving_fixtures import tiny_pipe, triton  # noqa: E402, F401


@pytest.fixture(scope="session")
def stack_services(tmp_path_factory):
    """The session's running Stack (no environment changes; use ``stack`` in tests)."""
    from motioncharacter.stack import CRED_VARS, Stack

    s = Stack(tmp_path_factory.mktemp("stack"), s3_port=0, mlflow_port=0, bucket="mc-test")
    with pytest.MonkeyPatch.context() as mp:
        for var in CRED_VARS:  # fresh dev credentials, never the developer's own
            mp.delenv(var, raising=False)
        s.up()
    yield s
    s.down()
    assert not any(st.running for st in s.status()), "stack processes survived `down`"


@pytest.fixture
def stack(stack_services, monkeypatch):
    """The running stack, with its endpoints and dev credentials set in os.environ for this test.

    Attributes: s3_endpoint, mlflow_uri, bucket, dir (state dir), env() (includes the secret).
    """
    for k, v in stack_services.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert os.environ["MOTIONCHARACTER_S3_ENDPOINT"] == stack_services.s3_endpoint
    # mlflow.set_tracking_uri is process-global and wins over MLFLOW_TRACKING_URI: an earlier
    # in-process run (e.g. demo --learn's embedded sqlite) must not be what this test's client reads
    import mlflow

    # set_tracking_uri / set_experiment also write MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID into
    # os.environ: monkeypatch records both first, so they come back after the test
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(stack_services.mlflow_uri)
    mlflow.set_experiment("Default")  # and so is the active experiment, whose id belongs to that store
    yield stack_services
    restore_mlflow_globals()


def restore_mlflow_globals() -> None:
    """MLflow's process-global tracking URI and active experiment back to "unset": the next test reads
    MLFLOW_TRACKING_URI again (the session's own sqlite store unless it sets another)."""
    import mlflow

    from mlflow.tracking import fluent

    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # (this also unsets MLFLOW_TRACKING_URI; the test's monkeypatch restores it)
    fluent._active_experiment_id = None


@pytest.fixture(scope="session")
def s3_only_stack(tmp_path_factory):
    """A real S3 server alone (SeaweedFS, no MLflow), bucket ``models``, fresh dev credentials;
    the environment is left alone: use ``.env()`` for the endpoint and credentials."""
    from motioncharacter.stack import CRED_VARS, Stack

    s = Stack(tmp_path_factory.mktemp("s3-only"), s3_port=0, mlflow_port=0, bucket="models")
    with pytest.MonkeyPatch.context() as mp:
        for var in CRED_VARS:
            mp.delenv(var, raising=False)
        s.up(only="s3")
    yield s
    s.down()


@pytest.fixture(autouse=True)
def _mlflow_globals_restored():
    """After every test: MLflow's process-global tracking URI and experiment unset again, and the
    MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_ID it writes into os.environ as before the test."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    yield
    if "mlflow" not in sys.modules:
        return
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    if utils._tracking_uri is not None or fluent._active_experiment_id is not None:
        restore_mlflow_globals()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
