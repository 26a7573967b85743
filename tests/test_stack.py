"""`motioncharacter stack`: real SeaweedFS S3 + MLflow servers on loopback."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from motioncharacter import stack as stk
from motioncharacter.stack import CRED_VARS, Stack, StackError, load_stack_env


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "motioncharacter.cli", "stack", *args],
                          capture_output=True, text=True, env=env, timeout=180)


def _clean_env():
    env = dict(os.environ)
    for k in (*CRED_VARS, "MOTIONCHARACTER_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        env.pop(k, None)
    return env


@pytest.mark.services
def test_cli_lifecycle_s3_only(tmp_path):
    """up -> up again (idempotent) -> status -> down (pids gone) -> up keeps the data -> down."""
    d = tmp_path / "st"
    port = stk.free_port()
    env = _clean_env()
    r = _cli("up", "--only", "s3", "--s3-port", str(port), "--state-dir", str(d), env=env)
    assert r.returncode == 0, r.stderr
    assert f"http://127.0.0.1:{port}" in r.stdout and "started" in r.stdout
    creds = stk._read_env_file(d / "credentials.env")
    secret = creds["AWS_SECRET_ACCESS_KEY"]
    assert stat.S_IMODE((d / "credentials.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "s3.json").stat().st_mode) == 0o600
    assert "AWS_SECRET_ACCESS_KEY=****" in r.stdout
    # one identity per workload besides the admin's, each in its own private file, never printed
    workload = {w: stk._read_env_file(d / f"credentials-{w}.env") for w in stk.WORKLOADS}
    assert set(workload) == {"triton", "mlflow", "training", "pipeline"}
    for w, creds in workload.items():
        assert stat.S_IMODE((d / f"credentials-{w}.env").stat().st_mode) == 0o600
        assert creds["AWS_ACCESS_KEY_ID"] != stk._read_env_file(d / "credentials.env")["AWS_ACCESS_KEY_ID"]
    assert "credentials-triton.env" in r.stdout
    logs = "".join(p.read_text() for p in (d / "logs").iterdir())
    for shown in (secret, *(c["AWS_SECRET_ACCESS_KEY"] for c in workload.values())):
        assert shown not in r.stdout + r.stderr + logs + (d / "state.json").read_text() + (d / "stack.env").read_text()
    pid = Stack(d).status()[0].pid
    assert stk.pid_alive(pid)

    r = _cli("up", "--only", "s3", "--state-dir", str(d), "--s3-port", str(stk.free_port()), env=env)
    assert r.returncode == 0 and "already running (`stack down` first" in r.stdout
    assert Stack(d).status()[0].pid == pid
    assert stk._read_env_file(d / "stack.env")["MOTIONCHARACTER_S3_ENDPOINT"] == f"http://127.0.0.1:{port}"

    r = _cli("status", "--state-dir", str(d), env=env)
    assert r.returncode == 3  # mlflow is not running
    assert "s3" in r.stdout and "running, answers" in r.stdout and "stopped" in r.stdout
    assert _cli("status", "--only", "s3", "--state-dir", str(d), env=env).returncode == 0

    # data written now must survive a restart
    s = Stack(d)
    client_env = {**s.env(), "MLFLOW_TRACKING_URI": ""}
    from motioncharacter import storage
    old = {k: os.environ.get(k) for k in client_env}
    os.environ.update(client_env)
    try:
        storage.write_bytes("s3://keep/x.bin", b"persist")
        r = _cli("down", "--state-dir", str(d), env=env)
        assert r.returncode == 0 and "s3      stopped" in r.stdout
        assert not stk.pid_alive(pid) and not stk._group(pid)
        assert not Stack(d).status()[0].running
        assert "not running" in _cli("down", "--state-dir", str(d), env=env).stdout  # idempotent too
        assert Stack(d).up(only="s3") == {"s3": "started"}
        assert Stack(d).s3_port == port  # the recorded port is reused
        assert storage.read_bytes("s3://keep/x.bin") == b"persist"
        # the workloads keep their keys across a restart (a running `serve` or MLflow keeps working)
        assert {w: stk._read_env_file(d / f"credentials-{w}.env") for w in stk.WORKLOADS} == workload
        assert Stack(d).workload_env("triton")["AWS_ACCESS_KEY_ID"] == workload["triton"]["AWS_ACCESS_KEY_ID"]
    finally:
        Stack(d).down()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert not any(st.running for st in Stack(d).status())


@pytest.mark.services
def test_session_stack_is_up_and_idempotent(stack):
    before = {s.name: s.pid for s in stack.status()}
    assert all(s.running and s.healthy for s in stack.status())
    assert stack.up() == {"s3": "already running", "mlflow": "already running"}
    assert {s.name: s.pid for s in stack.status()} == before


@pytest.mark.services
def test_load_stack_env_only_fills_unset_vars(stack_services, monkeypatch):
    for k in stack_services.env():
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    names = load_stack_env(stack_services.dir)
    assert "MLFLOW_TRACKING_URI" not in names
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://elsewhere:5000"
    expected = stack_services.env()
    for k in ("MOTIONCHARACTER_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL", *CRED_VARS):
        assert os.environ[k] == expected[k]


def test_load_stack_env_does_nothing_without_a_running_stack(tmp_path, monkeypatch):
    for k in ("MOTIONCHARACTER_S3_ENDPOINT", "MLFLOW_TRACKING_URI", *CRED_VARS):
        monkeypatch.delenv(k, raising=False)
    assert load_stack_env(tmp_path / "none") == []
    assert "MOTIONCHARACTER_S3_ENDPOINT" not in os.environ


def test_busy_port_is_refused_with_its_name(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StackError, match=rf"port {port}.*--s3-port"):
            Stack(tmp_path, s3_port=port).up(only="s3")


def test_a_port_it_picked_that_is_taken_by_start_time_is_picked_again(tmp_path):
    """Port 0 picks a free port when the Stack is made; if something binds it before the server starts
    (the S3 server's own internal servers did, in the suite), up() picks another instead of failing."""
    s = Stack(tmp_path, s3_port=0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", s.s3_port))
        busy.listen()
        taken = s.s3_port
        try:
            assert s.up(only="s3") == {"s3": "started"}
            assert s.s3_port != taken and s.status()[0].running
        finally:
            s.down()


def test_mlflow_alone_needs_s3(tmp_path):
    with pytest.raises(StackError, match="S3 server, which is not running"):
        Stack(tmp_path, s3_port=0, mlflow_port=0).up(only="mlflow")


def test_failed_start_shows_the_log_tail(tmp_path, monkeypatch):
    fake = tmp_path / "fake-weed"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MOTIONCHARACTER_WEED_BIN", str(fake))
    with pytest.raises(StackError, match=r"(?s)exited with code 3.*boom: cannot start"):
        Stack(tmp_path / "st", s3_port=0).up(only="s3")
    assert not Stack(tmp_path / "st").status()[0].running
