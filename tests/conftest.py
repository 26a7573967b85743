"""Shared fixtures.

``stack``: a real local S3 server + MLflow server (``motioncharacter.stack``), started once per
session in a temporary state dir on free ports; while a test uses it, the environment points
storage and tracking at it (restored afterwards).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads spinning slowed tiny runs 10x on 2 shared cores

import pytest


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
    yield stack_services


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
