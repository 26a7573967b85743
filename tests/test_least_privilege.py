"""Least privilege in the object store, checked against a real S3 server (SeaweedFS, which
enforces the same IAM policy language as MinIO).

Triton runs model.py from its model repository and DeepSpeed resume unpickles checkpoints, so
whatever identity can write those can run code in serving or training. Each workload therefore
has its own identity, allowed only its own buckets/prefixes:

- the local stack (motioncharacter/stack.py ``WORKLOADS``): prefixes of the stack's one bucket;
- Kubernetes (k8s/base/minio.yaml, ConfigMap ``minio-policies``): a bucket per kind of data.
  The exact policy files are loaded into a SeaweedFS server here, and Triton itself loads a
  model repository with the Triton user's keys.
"""
from __future__ import annotations

import io
import json
import secrets
import stat
from pathlib import Path

import pytest
import yaml

from motioncharacter.stack import CRED_VARS, WORKLOADS, Stack, _read_env_file

ROOT = Path(__file__).resolve().parents[1]
OK = "ok"


def _client(endpoint: str, keys: tuple[str, str]):
    from minio import Minio

    return Minio(endpoint.split("://", 1)[1], access_key=keys[0], secret_key=keys[1], secure=False,
                 region="us-east-1")


def attempt(client, op: str, bucket: str, key: str) -> str:
    """'ok', or the S3 error code the server answered (AccessDenied when a policy refuses)."""
    from minio.error import S3Error

    try:
        if op == "read":
            r = client.get_object(bucket, key)
            r.read(), r.close(), r.release_conn()
        elif op == "write":
            client.put_object(bucket, key, io.BytesIO(b"written"), 7)
        elif op == "delete":
            client.remove_object(bucket, key)
        elif op == "list":
            list(client.list_objects(bucket, prefix=key, recursive=True))
        elif op == "create-bucket":
            client.make_bucket(bucket)
        else:
            raise ValueError(op)
        return OK
    except S3Error as e:
        return e.code


def check(endpoint: str, keys: dict[str, tuple[str, str]], cases: list[tuple]) -> None:
    """Run every (identity, op, bucket, key, expected) and report all mismatches at once."""
    wrong = []
    for who, op, bucket, key, expected in cases:
        got = attempt(_client(endpoint, keys[who]), op, bucket, key)
        if got != expected:
            wrong.append(f"{who} {op} {bucket}/{key}: {got}, expected {expected}")
    assert not wrong, "\n".join(wrong)


# --- the local stack: one identity per workload, each on its own prefixes ------------------------

def _local_keys(stack: Stack) -> dict[str, tuple[str, str]]:
    out = {}
    for name in WORKLOADS:
        creds = _read_env_file(stack.workload_file(name))
        out[name] = (creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
    return out


@pytest.mark.services
def test_stack_writes_a_private_credentials_file_per_workload(stack_services):
    s = stack_services
    keys = _local_keys(s)
    admin = (s.env()["AWS_ACCESS_KEY_ID"], s.env()["AWS_SECRET_ACCESS_KEY"])
    assert set(keys) == {"triton", "mlflow", "training", "pipeline"}
    assert len({*keys.values(), admin}) == len(keys) + 1, "identities share keys"
    for name in keys:
        assert stat.S_IMODE(s.workload_file(name).stat().st_mode) == 0o600, name
        assert s.workload_env(name)["AWS_SECRET_ACCESS_KEY"] == keys[name][1]  # what the server was given
    # never written anywhere else (state, endpoints file, logs)
    public = (s.dir / "state.json").read_text() + (s.dir / "stack.env").read_text() + \
        "".join(p.read_text(errors="replace") for p in (s.dir / "logs").iterdir())
    assert not any(secret in public for _, secret in keys.values())
    # the admin identity is still the one `stack env` / load_stack_env hand to the developer's CLI
    assert _read_env_file(s.cred_file)["AWS_ACCESS_KEY_ID"] == admin[0]


@pytest.mark.services
def test_local_workload_identities_are_enforced(stack_services):
    """Triton reads the model repository and is refused writing it; MLflow cannot read the data;
    training writes only checkpoints; the pipeline cannot touch MLflow's artifacts or checkpoints."""
    s = stack_services
    b = s.bucket
    admin = _client(s.s3_endpoint, (s.env()["AWS_ACCESS_KEY_ID"], s.env()["AWS_SECRET_ACCESS_KEY"]))
    objects = {p: f"{p}lp/object.bin" for p in ("models/", "clips/", "checkpoints/", "mlflow/", "pipelines/")}
    for key in objects.values():
        admin.put_object(b, key, io.BytesIO(b"seed"), 4)
    model, clip, ckpt, art, run = (objects[p] for p in ("models/", "clips/", "checkpoints/", "mlflow/", "pipelines/"))
    denied = "AccessDenied"
    check(s.s3_endpoint, _local_keys(s), [
        ("triton", "read", b, model, OK),
        ("triton", "list", b, "models/lp/", OK),
        ("triton", "write", b, model, denied),  # its model.py would run in serving
        ("triton", "delete", b, model, denied),
        ("triton", "write", b, "models/lp/new/1/model.py", denied),
        ("triton", "read", b, clip, denied),
        ("triton", "read", b, ckpt, denied),
        ("mlflow", "read", b, art, OK),
        ("mlflow", "write", b, "mlflow/lp/new.txt", OK),
        ("mlflow", "delete", b, "mlflow/lp/new.txt", OK),
        ("mlflow", "read", b, clip, denied),  # not the data
        ("mlflow", "read", b, model, denied),
        ("mlflow", "write", b, model, denied),
        ("mlflow", "write", b, ckpt, denied),
        ("training", "read", b, clip, OK),
        ("training", "read", b, model, OK),  # base weights
        ("training", "write", b, "checkpoints/lp/step-1/state.pt", OK),
        ("training", "read", b, "checkpoints/lp/step-1/state.pt", OK),  # resume
        ("training", "write", b, model, denied),
        ("training", "write", b, clip, denied),
        ("training", "read", b, art, denied),
        ("pipeline", "read", b, clip, OK),
        ("pipeline", "read", b, ckpt, OK),
        ("pipeline", "write", b, "pipelines/lp/prepared/manifest.jsonl", OK),
        ("pipeline", "write", b, "models/lp/deployed/config.pbtxt", OK),  # deploy publishes
        ("pipeline", "write", b, ckpt, denied),  # training resumes from these
        ("pipeline", "read", b, art, denied),
        ("pipeline", "write", b, art, denied),
        *[(who, "create-bucket", f"lp-{who}", "", denied) for who in WORKLOADS],
        # a key outside every prefix belongs to nobody but the admin
        *[(who, "write", b, "lp-elsewhere.bin", denied) for who in WORKLOADS],
    ])


@pytest.mark.services
def test_training_identity_works_through_the_storage_layer(stack_services, monkeypatch):
    """The project's own client (HeadBucket before a write, GetBucketLocation without a region)
    gets along with the narrow policy, and its refusal is a clear StorageError."""
    from motioncharacter import storage

    s = stack_services
    for k, v in s.workload_env("training").items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    storage.write_bytes(f"s3://{s.bucket}/checkpoints/lp-storage/latest", b"step-3")
    assert storage.read_bytes(f"s3://{s.bucket}/checkpoints/lp-storage/latest") == b"step-3"
    with pytest.raises(storage.StorageError, match="AccessDenied"):
        storage.write_bytes(f"s3://{s.bucket}/models/lp-storage/1/model.py", b"import os")


@pytest.mark.services
def test_stack_mlflow_server_uses_the_mlflow_identity(stack, tmp_path):
    """The stack's MLflow server runs with the mlflow identity, not the admin one, and that is
    enough for it to store and serve artifacts."""
    import mlflow

    pid = stack._load()["services"]["mlflow"]["pid"]
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    mlflow_key = stack.workload_env("mlflow")["AWS_ACCESS_KEY_ID"]
    assert environ["AWS_ACCESS_KEY_ID"] == mlflow_key != stack.env()["AWS_ACCESS_KEY_ID"]
    assert environ["AWS_SECRET_ACCESS_KEY"] != stack.env()["AWS_SECRET_ACCESS_KEY"]

    f = tmp_path / "note.txt"
    f.write_text("through the server")
    with mlflow.start_run(run_name="least-privilege") as run:
        mlflow.log_artifact(str(f), "lp")
    got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="lp/note.txt",
                                              dst_path=str(tmp_path / "dl"))
    assert Path(got).read_text() == "through the server"


# --- the Kubernetes policies, enforced by a real server ---------------------------------------

def k8s_policies() -> dict[str, dict]:
    """The MinIO policy files minio-setup creates (ConfigMap minio-policies)."""
    docs = yaml.safe_load_all((ROOT / "k8s/base/minio.yaml").read_text())
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "minio-policies")
    return {name.removesuffix(".json"): json.loads(text) for name, text in cm["data"].items()}


class K8sPolicyStack(Stack):
    """The stack's S3 server with the Kubernetes users instead of the local ones: one identity per
    minio-policies file, bound to that exact policy document."""

    k8s_keys: dict[str, tuple[str, str]] = {}

    def s3_config(self, access, secret, workload_keys):
        config = super().s3_config(access, secret, {})  # the admin identity only
        for name, policy in k8s_policies().items():
            config["policies"].append({"name": f"k8s-{name}", "content": json.dumps(policy)})
            key, sec = self.k8s_keys[name]
            config["identities"].append({"name": f"k8s-{name}", "credentials": [{"accessKey": key, "secretKey": sec}],
                                         "policyNames": [f"k8s-{name}"]})
        return config


K8S_BUCKETS = ("clips", "checkpoints", "models", "mlflow", "pipelines")  # minio-setup's BUCKETS


@pytest.fixture(scope="module")
def k8s_store(tmp_path_factory):
    """(stack, keys): a real S3 server holding minio-setup's buckets and the k8s users."""
    s = K8sPolicyStack(tmp_path_factory.mktemp("k8s-policies"), s3_port=0, mlflow_port=0, bucket="pipelines")
    s.k8s_keys = {name: (f"{name}-{secrets.token_hex(4)}", secrets.token_urlsafe(24)) for name in k8s_policies()}
    with pytest.MonkeyPatch.context() as mp:
        for var in CRED_VARS:
            mp.delenv(var, raising=False)
        s.up(only="s3")
    try:
        admin = _client(s.s3_endpoint, (s.env()["AWS_ACCESS_KEY_ID"], s.env()["AWS_SECRET_ACCESS_KEY"]))
        for bucket in K8S_BUCKETS:
            if not admin.bucket_exists(bucket):
                admin.make_bucket(bucket)
        yield s, s.k8s_keys
    finally:
        s.down()


@pytest.mark.services
def test_k8s_policies_are_enforced(k8s_store):
    s, keys = k8s_store
    assert set(keys) == {"triton", "mlflow", "training", "pipeline"}
    admin = _client(s.s3_endpoint, (s.env()["AWS_ACCESS_KEY_ID"], s.env()["AWS_SECRET_ACCESS_KEY"]))
    seeds = [("models", "triton/echo/1/model.py"), ("models", "triton-cpu/echo/1/model.py"),
             ("models", "sd15-animatediff/unet/config.json"), ("clips", "prepared/v1/manifest.jsonl"),
             ("checkpoints", "motioncharacter-train/latest"), ("mlflow", "1/run/artifacts/a.txt"),
             ("pipelines", "motioncharacter/run/prepared/manifest.jsonl")]
    for bucket, key in seeds:
        admin.put_object(bucket, key, io.BytesIO(b"seed"), 4)
    denied = "AccessDenied"
    check(s.s3_endpoint, keys, [
        # Triton: read-only on the repositories it serves
        ("triton", "read", "models", "triton/echo/1/model.py", OK),
        ("triton", "read", "models", "triton-cpu/echo/1/model.py", OK),
        ("triton", "list", "models", "triton/", OK),
        ("triton", "write", "models", "triton/echo/1/model.py", denied),
        ("triton", "delete", "models", "triton/echo/1/model.py", denied),
        ("triton", "write", "models", "triton-cpu/evil/1/model.py", denied),
        ("triton", "read", "models", "sd15-animatediff/unet/config.json", denied),
        ("triton", "read", "checkpoints", "motioncharacter-train/latest", denied),
        ("triton", "list", "clips", "", denied),
        # MLflow: its artifact bucket only
        ("mlflow", "read", "mlflow", "1/run/artifacts/a.txt", OK),
        ("mlflow", "write", "mlflow", "1/run/artifacts/b.txt", OK),
        ("mlflow", "delete", "mlflow", "1/run/artifacts/b.txt", OK),
        ("mlflow", "read", "clips", "prepared/v1/manifest.jsonl", denied),
        ("mlflow", "list", "clips", "", denied),
        ("mlflow", "write", "models", "triton/echo/1/model.py", denied),
        ("mlflow", "read", "checkpoints", "motioncharacter-train/latest", denied),
        # training: data and base weights in, checkpoints in and out
        ("training", "read", "clips", "prepared/v1/manifest.jsonl", OK),
        ("training", "read", "models", "sd15-animatediff/unet/config.json", OK),
        ("training", "read", "checkpoints", "motioncharacter-train/latest", OK),
        ("training", "write", "checkpoints", "motioncharacter-train/step-2/mp_rank_00_model_states.pt", OK),
        ("training", "write", "models", "triton/echo/1/model.py", denied),
        ("training", "write", "models", "sd15-animatediff/unet/config.json", denied),
        ("training", "read", "models", "triton/echo/1/model.py", denied),
        ("training", "write", "clips", "prepared/v1/manifest.jsonl", denied),
        ("training", "read", "mlflow", "1/run/artifacts/a.txt", denied),
        # pipeline: run data and model repositories out; not base weights, checkpoints, MLflow
        ("pipeline", "read", "clips", "prepared/v1/manifest.jsonl", OK),
        ("pipeline", "read", "models", "sd15-animatediff/unet/config.json", OK),
        ("pipeline", "read", "checkpoints", "motioncharacter-train/latest", OK),
        ("pipeline", "write", "pipelines", "motioncharacter/run/train/full/weights/x", OK),
        ("pipeline", "write", "models", "triton/echo/1/model.py", OK),
        ("pipeline", "write", "models", "motioncharacter/echo/1/model.py", OK),
        ("pipeline", "write", "models", "sd15-animatediff/unet/config.json", denied),
        ("pipeline", "write", "checkpoints", "motioncharacter-train/latest", denied),
        ("pipeline", "write", "clips", "prepared/v1/manifest.jsonl", denied),
        ("pipeline", "read", "mlflow", "1/run/artifacts/a.txt", denied),
        *[(who, "create-bucket", f"new-{who}", "", denied) for who in keys],
    ])


@pytest.mark.services
def test_triton_serves_its_repository_with_the_read_only_k8s_user(k8s_store, tmp_path, monkeypatch):
    """Triton's own S3 client loads the local overlay's MODEL_REPOSITORY with nothing but the
    Triton user's policy (list the bucket, get objects), through `motioncharacter serve`'s code."""
    import urllib.request

    from test_k8s import ECHO_CONFIG, ECHO_MODEL

    from motioncharacter.serving.server import TritonServer

    s, keys = k8s_store
    overlay = (ROOT / "k8s/overlays/local/kustomization.yaml").read_text()
    repo = "s3://models/triton-cpu"  # what the local overlay's triton-config names (test_k8s checks it)
    assert "/models/triton-cpu" in overlay
    admin = _client(s.s3_endpoint, (s.env()["AWS_ACCESS_KEY_ID"], s.env()["AWS_SECRET_ACCESS_KEY"]))
    for obj in admin.list_objects("models", prefix="triton-cpu/", recursive=True):  # only the echo model
        admin.remove_object("models", obj.object_name)
    for key, text in {"echo/config.pbtxt": ECHO_CONFIG, "echo/1/model.py": ECHO_MODEL}.items():
        admin.put_object("models", f"triton-cpu/{key}", io.BytesIO(text.encode()), len(text.encode()))

    monkeypatch.setenv("MOTIONCHARACTER_S3_ENDPOINT", s.s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["triton"][0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["triton"][1])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # as the endpoints ConfigMap gives the pod
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    # ready (--strict-readiness by default) means every model loaded from the store
    with TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None,
                      log_file=tmp_path / "triton.log") as server:
        body = json.dumps({"inputs": [{"name": "IN", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]})
        req = urllib.request.Request(f"{server.http_url}/v2/models/echo/infer", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["outputs"][0]["data"] == [2.0, 4.0]
    # the same keys cannot replace the model.py Triton just ran
    assert attempt(_client(s.s3_endpoint, keys["triton"]), "write", "models", "triton-cpu/echo/1/model.py") \
        == "AccessDenied"


# --- the pipeline reads the pipeline's Secret -------------------------------------------------

def test_compiled_pipeline_steps_use_the_pipeline_user(tmp_path):
    """Every step of the compiled pipeline takes AWS_* from s3-pipeline (not Triton's, not a shared
    one), which the pipeline ServiceAccount may read and minio-setup creates with its policy."""
    from motioncharacter.pipelines.run import compile_pipeline

    path = tmp_path / "pipeline.yaml"
    compile_pipeline(str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) >= 5
    for name, ex in executors.items():
        # object-store keys from s3-pipeline only; the MLflow login (basic-auth) from mlflow-client
        assert {s["secretName"] for s in ex["secretAsEnv"]} == {"s3-pipeline", "mlflow-client"}, name
        aws = {s["secretName"] for s in ex["secretAsEnv"] for k in s["keyToEnv"] if k["envVar"].startswith("AWS_")}
        assert aws == {"s3-pipeline"}, name
    rbac = list(yaml.safe_load_all((ROOT / "k8s/base/rbac.yaml").read_text()))
    role = next(d for d in rbac if d["kind"] == "Role")
    rule = next(r for r in role["rules"] if r["resources"] == ["secrets"])
    assert "s3-pipeline" in rule["resourceNames"] and "s3-triton" not in rule["resourceNames"]
    assert "pipeline.json" in (ROOT / "k8s/base/minio.yaml").read_text()
