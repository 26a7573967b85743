"""The Kubernetes manifests: every overlay renders and validates offline, and the
properties that matter in production hold in what is rendered (not in the source
files, so overlay patches are checked too)."""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"

_spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
kv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kv)

SERVICE_OVERLAYS = ["overlays/local", "overlays/production"]
PYTORCHJOB_OVERLAYS = ["training/overlays/local", "training/overlays/production"]  # Trainer v1 (legacy)
TRAINJOB_OVERLAYS = ["training/trainjob/overlays/local", "training/trainjob/overlays/production"]  # Trainer v2
TRAINING_OVERLAYS = TRAINJOB_OVERLAYS + PYTORCHJOB_OVERLAYS
PROJECT_IMAGE = "ghcr.io/motioncharacter/motioncharacter"
TRITON_IMAGE = "ghcr.io/motioncharacter/motioncharacter-triton:0.1.0"  # docker/Dockerfile.triton
SECRET_NAME_RE = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.I)
# each workload's own MinIO user (k8s/base/minio.yaml: ConfigMap minio-policies, Job minio-setup)
WORKLOAD_SECRETS = {"triton": "s3-triton", "mlflow": "s3-mlflow", "training": "s3-training",
                    "pipeline": "s3-pipeline"}


def _tools_or_skip():
    try:
        kv.find_tool("kubectl")
        kv.find_tool("kubernetes-validate")
    except kv.ToolMissing as e:
        if os.environ.get("CI"):  # the project installs them (setup.sh): missing in CI is a broken setup
            pytest.fail(f"offline Kubernetes validation needs its tools, which setup.sh installs: {e}")
        pytest.skip(f"offline Kubernetes validation needs its tools: {e}")


_renders: dict[str, list[dict]] = {}


def rendered(overlay: str) -> list[dict]:
    _tools_or_skip()
    if overlay not in _renders:
        _renders[overlay] = kv.documents(kv.render(overlay))
    return copy.deepcopy(_renders[overlay])


def find(docs, kind, name=None):
    out = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert out, f"no {kind} {name or ''} in render"
    return out[0] if name else out


def pod_specs(docs):
    """(owner, pod spec) for every workload, PyTorchJob replicas and TrainJob nodes included."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "PyTorchJob":
            for r, spec in d["spec"]["pytorchReplicaSpecs"].items():
                yield f"PyTorchJob/{d['metadata']['name']}/{r}", spec["template"]["spec"]
        elif d["kind"] == "TrainJob":
            yield f"TrainJob/{d['metadata']['name']}/node", trainjob_pod(d)


def trainjob_pod(job):
    """The pod Trainer makes of a TrainJob on torch-distributed, as far as the TrainJob decides it: its
    runtime patch of ReplicatedJob "node", with the trainer's image, command, resources and env in the
    container, and the token setting of the account it runs as (the namespace's default account)."""
    (node,) = [rj for p in job["spec"]["runtimePatches"]
               for rj in p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"] if rj["name"] == "node"]
    pod = copy.deepcopy(node["template"]["spec"]["template"]["spec"])
    t = job["spec"]["trainer"]
    (c,) = pod["containers"]
    c.update(image=t["image"], command=t["command"], args=t["args"], resources=t["resourcesPerNode"], env=t["env"])
    default_sa = find(rendered("overlays/production"), "ServiceAccount", "default")
    pod["automountServiceAccountToken"] = default_sa.get("automountServiceAccountToken")
    return pod


def containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def volume(spec, name):
    return next(v for v in spec["volumes"] if v["name"] == name)


def mount_path(container, name):
    return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == name)


def env(container):
    return {e["name"]: e for e in container.get("env", [])}


# --- offline validation ---------------------------------------------------------------

def test_validate_script_passes_every_overlay():
    """The exact command CI runs: render + strict schema validation of all overlays."""
    _tools_or_skip()
    out = subprocess.run([sys.executable, str(K8S / "validate.py")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for overlay in kv.OVERLAYS:
        assert f"ok   {overlay}:" in out.stdout


def test_validator_rejects_unknown_fields_unknown_kinds_and_bad_pytorchjobs():
    """The check is not a no-op: each kind of mistake it exists for is caught."""
    docs = rendered("overlays/local")
    deploy = find(docs, "Deployment", "triton")
    deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    problems, _ = kv.kubernetes_validate([deploy])
    assert any("httpGett" in p for p in problems)

    # kubernetes-validate alone only warns about kinds it has no schema for
    problems, _ = kv.kubernetes_validate([{"apiVersion": "apps/v1", "kind": "Deploymnet",
                                           "metadata": {"name": "x"}}])
    assert any("Couldn't find schema" in p for p in problems)

    # custom resources against their projects' published CRDs (k8s/crds): wrong types, unknown fields
    job = find(rendered("training/overlays/local"), "PyTorchJob", "motioncharacter-train")
    job["spec"]["runPolicy"]["backoffLimit"] = "three"
    job["spec"]["runPolicy"]["backofLimit"] = 3
    problems = kv.check_custom(job)
    assert any("'three' is not of type 'integer'" in p for p in problems)
    assert any("backofLimit" in p for p in problems)
    tj = find(rendered("training/trainjob/overlays/local"), "TrainJob", "motioncharacter-train")
    tj["spec"]["trainer"]["numNodes"] = "2"
    tj["spec"]["runtimeRef"]["nmae"] = "torch-distributed"
    problems = kv.check_custom(tj)
    assert any("numNodes" in p for p in problems) and any("nmae" in p for p in problems)
    # a vendored CRD that is not the published one is refused
    assert set(kv.recorded_sha256()) == set(kv.CRDS.values())

    # a broken pod template inside the PyTorchJob is caught by the core schema
    tpl = kv._pod_templates(job)[0]
    tpl["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountpath"] = "/x"
    problems, _ = kv.kubernetes_validate([tpl])
    assert any("mountpath" in p for p in problems)


# --- the PyTorchJob the pipeline's train step launches (pipelines/launch.py) -----------------

@pytest.mark.parametrize("nodes, gpus", [(1, 2), (2, 8)])
def test_launched_pytorchjob_validates_offline_in_the_shape_of_k8s_training(nodes, gpus):
    from motioncharacter.pipelines import launch
    from motioncharacter.pipelines.steps import train_args, train_job_spec

    out, data = "s3://pipelines/motioncharacter/run/train/full", "s3://pipelines/motioncharacter/run/prepared/m.jsonl"
    args = train_args(data, out, "", "s3://models/sd15-animatediff", 100, "no_id_loss", [])
    job = launch.pytorchjob_manifest(train_job_spec(args, out, data, nodes, gpus, "", namespace="motioncharacter"))
    assert kv.check_custom(job) == []
    templates = kv._pod_templates(job)
    problems, passed = kv.kubernetes_validate(templates)  # each replica's pod, strictly
    assert problems == [] and len(passed) == len(templates) == (2 if nodes > 1 else 1)
    bad = copy.deepcopy(job)
    bad["spec"]["nprocPerNode"] = gpus  # the operator's field is a string
    assert any("nprocPerNode" in p for p in kv.check_custom(bad))

    # the same pod as k8s/training's job: locked down, GPU nodes, the operator's port and container name
    base = find(rendered("training/overlays/production"), "PyTorchJob", "motioncharacter-train")[
        "spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    mine = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    for key in ("securityContext", "terminationGracePeriodSeconds", "automountServiceAccountToken", "nodeSelector",
                "tolerations"):
        assert mine["spec"][key] == base["spec"][key], key
    (bc,), (mc,) = base["spec"]["containers"], mine["spec"]["containers"]
    for key in ("name", "command", "securityContext", "ports"):
        assert mc[key] == bc[key], key
    assert mc["args"][:3] == bc["args"][:3] and volume(mine["spec"], "dshm") == volume(base["spec"], "dshm")
    assert set(env(bc)) <= set(env(mc))
    # ...but the pipeline's object-store identity: it reads and writes the pipeline's work_uri
    assert env(mc)["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-pipeline"
    pipeline_policy = _policies()["pipeline"]
    assert allows(pipeline_policy, "s3:GetObject", _obj(data)) and allows(pipeline_policy, "s3:PutObject", _obj(out))
    assert allows(pipeline_policy, "s3:GetObject", _obj("s3://models/sd15-animatediff"))
    # and the labels that open the training-peers NetworkPolicy between its pods
    peers = next(p for p in rendered("overlays/production")
                 if p["kind"] == "NetworkPolicy" and p["metadata"]["name"] == "training-peers")
    assert _selects(peers["spec"]["podSelector"], mine["metadata"]["labels"])


# --- Triton -------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_triton_deployment(overlay):
    docs = rendered(overlay)
    spec = find(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == TRITON_IMAGE

    shm = volume(spec, "dshm")["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert mount_path(c, "dshm") == "/dev/shm"
    assert "emptyDir" in volume(spec, "tmp") and mount_path(c, "tmp") == "/tmp"

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/models/motioncharacter/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert "--strict-readiness=true" in c["args"]

    assert spec["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True

    # model repository in MinIO, read by Triton itself: s3://host:port/bucket/path
    assert "--model-repository=$(MODEL_REPOSITORY)" in c["args"]
    repo = find(docs, "ConfigMap", "triton-config")["data"]["MODEL_REPOSITORY"]
    assert re.fullmatch(r"s3://minio\.motioncharacter\.svc\.cluster\.local:9000/models/[\w-]+", repo)
    e = env(c)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert e[key]["valueFrom"]["secretKeyRef"] == {"name": "s3-triton", "key": key}  # read-only user

    svc = find(docs, "Service", "triton")
    assert {p["port"] for p in svc["spec"]["ports"]} == {8000, 8001, 8002}


RESTRICTED_APIS = {"model-repository", "shared-memory", "trace", "logging"}


def triton_lockdown_problems(c) -> list[str]:
    """What a Triton container lacks of the production lockdown: the admin APIs restricted over HTTP
    and gRPC to a key that comes from the Secret triton-admin, and Triton's own request-size cap."""
    args, problems = c.get("command", []) + c.get("args", []), []
    e = env(c)
    for flag in ("--http-restricted-api", "--grpc-restricted-protocol"):
        values = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
        if not values:
            problems.append(f"no {flag}")
            continue
        apis, _, header = values[0].partition(":")
        if not RESTRICTED_APIS <= set(apis.split(",")):
            problems.append(f"{flag} leaves {sorted(RESTRICTED_APIS - set(apis.split(',')))} open")
        m = re.fullmatch(r"triton-admin-key=\$\((\w+)\)", header)
        ref = e.get(m.group(1), {}).get("valueFrom", {}).get("secretKeyRef", {}) if m else {}
        if ref.get("name") != "triton-admin":
            problems.append(f"{flag}'s key {header!r} is not from the Secret triton-admin")
    sizes = [int(a.split("=", 1)[1]) for a in args if a.startswith("--http-max-input-size=")]
    if not sizes or sizes[0] > 64 * 1024 * 1024:
        problems.append(f"HTTP request size not capped by Triton at 64 MiB or less: {sizes}")
    return problems


def triton_containers(docs):
    for d in docs:
        if d["kind"] == "InferenceService":
            yield f"InferenceService/{d['metadata']['name']}", d["spec"]["predictor"]["model"]
        for owner, spec in pod_specs([d]):
            for c in containers(spec):
                if "triton" in c.get("image", "") or "tritonserver" in c.get("command", []):
                    yield f"{owner}/{c['name']}", c


def test_every_triton_container_in_every_overlay_is_locked_down_and_current():
    """Renders every kustomization (kubectl kustomize) and the KServe predictor `deploy --target
    kserve` writes: each Triton container restricts the admin APIs and runs the image built on a
    Triton release with the 2026 fixes (docker/Dockerfile.triton)."""
    from motioncharacter.serving import kserve

    seen = []
    docs = [kserve.inference_service("m", "motioncharacter", "s3://models/m-kserve/v1", gpus=1)]
    for overlay in kv.OVERLAYS:
        docs += rendered(overlay)
    for owner, c in triton_containers(docs):
        seen.append(owner)
        assert triton_lockdown_problems(c) == [], owner
        assert c["image"].startswith("ghcr.io/motioncharacter/motioncharacter-triton:"), owner
    assert {"Deployment/triton/triton", "InferenceService/m"} <= set(seen)
    base = re.search(r"^FROM nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", (ROOT / "docker" / "Dockerfile.triton")
                     .read_text(), re.M).groups()
    assert tuple(map(int, base)) >= (26, 7)  # past NVIDIA's bulletins 5828 (r26.03) ... 5875 (r26.07)
    # the check is not a no-op: each missing piece is named
    (c,) = find(rendered("overlays/production"), "Deployment", "triton")["spec"]["template"]["spec"]["containers"]
    c["args"] = [a for a in c["args"] if not a.startswith("--grpc-restricted")]
    assert triton_lockdown_problems(c) == ["no --grpc-restricted-protocol"]
    c["env"] = [x for x in c["env"] if x["name"] != "MOTIONCHARACTER_TRITON_ADMIN_KEY"]
    assert any("not from the Secret triton-admin" in p for p in triton_lockdown_problems(c))


def test_production_triton_is_on_gpus_and_autoscaled():
    docs = rendered("overlays/production")
    spec = find(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert volume(spec, "dshm")["emptyDir"]["sizeLimit"] == "8Gi"

    hpa = find(docs, "HorizontalPodAutoscaler", "triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "triton_queue_time_us_per_request"
    assert "replicas" not in find(docs, "Deployment", "triton")["spec"]  # the HPA owns it


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_replicated_services_have_disruption_budgets(overlay):
    """A drain takes at most one Triton or MLflow pod at a time, and still drains a single replica."""
    docs = rendered(overlay)
    for name in ("triton", "mlflow"):
        pdb = find(docs, "PodDisruptionBudget", name)
        assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
        pods = find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pods.items()


def test_local_triton_is_cpu_only_single_replica_without_autoscaler():
    docs = rendered("overlays/local")
    deploy = find(docs, "Deployment", "triton")
    assert deploy["spec"]["replicas"] == 1
    spec = deploy["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(spec)
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert find(docs, "ConfigMap", "triton-config")["data"]["MODEL_REPOSITORY"].endswith("/models/triton-cpu")


# --- MinIO and MLflow --------------------------------------------------------------------

@pytest.mark.parametrize("overlay,minio_size,db_size", [("overlays/local", "5Gi", "1Gi"),
                                                        ("overlays/production", "2Ti", "50Gi")])
def test_minio_and_mlflow(overlay, minio_size, db_size):
    docs = rendered(overlay)
    minio = find(docs, "StatefulSet", "minio")
    assert minio["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == minio_size
    pg = find(docs, "StatefulSet", "mlflow-postgres")
    assert pg["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == db_size

    (c,) = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"{PROJECT_IMAGE}:0.1.0"  # the CPU image, on every cluster
    assert "--serve-artifacts" in c["args"] and "--artifacts-destination=s3://mlflow" in c["args"]
    e = env(c)
    # the database URL is assembled from Secret values by Kubernetes, never written down
    assert e["MLFLOW_BACKEND_STORE_URI"]["value"] == \
        "postgresql://$(DB_USER):$(DB_PASSWORD)@mlflow-postgres:5432/$(DB_NAME)"
    names = list(e)
    assert names.index("DB_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")  # $(VAR) needs the order
    assert e["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["key"] == "MLFLOW_S3_ENDPOINT_URL"
    endpoints = find(docs, "ConfigMap", "motioncharacter-endpoints")["data"]
    assert endpoints["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.motioncharacter.svc.cluster.local:9000"
    assert endpoints["MLFLOW_TRACKING_URI"] == "http://mlflow.motioncharacter.svc.cluster.local:5000"
    # MLflow 3 answers only the Host headers it allows: the in-cluster service names
    allowed = e["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert "mlflow.motioncharacter.svc.cluster.local:5000" in allowed and "mlflow:5000" in allowed


# --- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", PYTORCHJOB_OVERLAYS)
def test_pytorchjob(overlay):
    docs = rendered(overlay)
    job = find(docs, "PyTorchJob", "motioncharacter-train")
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    production = overlay.endswith("production")
    nproc = int(job["spec"]["nprocPerNode"])
    for r in ("Master", "Worker"):
        spec = replicas[r]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["name"] == "pytorch"  # the operator finds the container by this name
        assert c["command"] == ["torchrun"]
        args = c["args"]
        assert args[:3] == ["--no-python", "motioncharacter", "train"]
        assert "--config=/etc/motioncharacter/train.yaml" in args
        assert any(a.startswith("--data=s3://") for a in args)
        assert any(a.startswith("--output=s3://") for a in args)
        assert mount_path(c, "config") == "/etc/motioncharacter"
        assert volume(spec, "config")["configMap"]["name"] in config_maps
        assert volume(spec, "dshm")["emptyDir"]["medium"] == "Memory"
        assert mount_path(c, "dshm") == "/dev/shm"
        e = env(c)
        assert "NCCL_DEBUG" in e and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in e
        assert e["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-training"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["terminationGracePeriodSeconds"] >= 60  # time to checkpoint on SIGTERM
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        if production:
            assert c["image"] == f"{PROJECT_IMAGE}:0.1.0-cuda"
            assert gpus == nproc == 8  # one process per GPU
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        else:
            assert c["image"] == f"{PROJECT_IMAGE}:0.1.0"
            assert gpus is None and nproc == 1
            assert e["DS_ACCELERATOR"]["value"] == "cpu"
    train_yaml = yaml.safe_load(config_maps["motioncharacter-train-config"]["data"]["train.yaml"])
    assert isinstance(train_yaml, dict)
    # a valid training config: resumes after preemption and names base weights
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import load

    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(train_yaml, f)
        f.flush()
        cfg = load(TrainConfig, "train.yaml", f.name)
    assert cfg.train.resume and cfg.model.weights.startswith("s3://")


@pytest.mark.parametrize("overlay", TRAINJOB_OVERLAYS)
def test_trainjob(overlay):
    """Trainer v2's form: the stock torch-distributed runtime, nodes x processes per node, the same
    command, config, identity and locked-down pod as the PyTorchJob."""
    docs = rendered(overlay)
    job = find(docs, "TrainJob", "motioncharacter-train")
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "torch-distributed"}
    t = job["spec"]["trainer"]
    pod = trainjob_pod(job)
    (c,) = pod["containers"]
    assert c["name"] == "node"  # the runtime's container, which the patch must name
    assert t["command"] == ["torchrun"] and t["args"][:3] == ["--no-python", "motioncharacter", "train"]
    assert "--config=/etc/motioncharacter/train.yaml" in t["args"]
    assert volume(pod, "config")["configMap"]["name"] == "motioncharacter-train-config"
    assert find(docs, "ConfigMap", "motioncharacter-train-config")
    assert mount_path(c, "dshm") == "/dev/shm" and volume(pod, "dshm")["emptyDir"]["medium"] == "Memory"
    e = env(c)
    assert e["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-training"
    gpus = t["resourcesPerNode"].get("limits", {}).get("nvidia.com/gpu")
    assert t["numNodes"] == 2
    if overlay.endswith("production"):
        assert t["image"] == f"{PROJECT_IMAGE}:0.1.0-cuda" and gpus == t["numProcPerNode"] == 8
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert volume(pod, "tmp")["emptyDir"]["sizeLimit"] == "64Gi"
    else:
        assert t["image"] == f"{PROJECT_IMAGE}:0.1.0" and gpus is None and t["numProcPerNode"] == 1
        assert e["DS_ACCELERATOR"]["value"] == "cpu"
    # the same job the pipeline's train step creates, but for its identity and paths
    from motioncharacter.pipelines import launch

    mine = launch.trainjob_manifest(launch.JobSpec(name="x", namespace="motioncharacter", image="i",
                                                   train_args=["train"], nodes=2, gpus_per_node=8))
    assert mine["spec"]["runtimeRef"] == job["spec"]["runtimeRef"]
    mpod = trainjob_pod(mine)
    for key in ("securityContext", "tolerations", "nodeSelector"):
        assert mpod.get(key) == pod.get(key) or not overlay.endswith("production"), key
    assert mpod["securityContext"] == pod["securityContext"]
    assert mpod["containers"][0]["securityContext"] == c["securityContext"]
    assert set(env(c)) - {"DS_ACCELERATOR"} <= set(env(mpod["containers"][0]))


# --- the web page (k8s/components/ui) -------------------------------------------------------

# Pod Security Standards, "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_problems(spec: dict) -> list[str]:
    """What in a pod spec breaks the restricted profile (empty: it passes)."""
    problems = [f"spec.{k}" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    problems += [f"volume {v['name']}" for v in spec.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    pod_sc = spec.get("securityContext", {})
    for c in containers(spec):
        sc = c.get("securityContext", {})
        name = c["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or set(sc.get("capabilities", {}).get("add", [])) - {
                "NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems


def test_restricted_check_catches_each_rule():
    spec = find(rendered("overlays/local"), "Deployment", "motioncharacter-ui")["spec"]["template"]["spec"]
    assert restricted_problems(spec) == []
    bad = copy.deepcopy(spec)
    del bad["securityContext"]["seccompProfile"], bad["containers"][0]["securityContext"]["seccompProfile"]
    bad["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True, capabilities={"add": ["SYS_ADMIN"]})
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    bad["hostNetwork"] = True
    assert len(restricted_problems(bad)) == 5, restricted_problems(bad)


def test_ui_is_on_in_the_local_overlay_only():
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered("overlays/local")}
    ui = {("Deployment", "motioncharacter-ui"), ("Service", "motioncharacter-ui"),
          ("NetworkPolicy", "motioncharacter-ui")}
    assert ui <= names
    production = {(d["kind"], d["metadata"]["name"]) for d in rendered("overlays/production")}
    assert not ui & production and not [n for _, n in production if "ui" in n.split("-")]


def test_ui_runs_the_page_against_the_triton_service_restricted_and_behind_a_login():
    from motioncharacter.cli import build_parser
    from motioncharacter.serving import ui

    docs = rendered("overlays/local")
    deploy = find(docs, "Deployment", "motioncharacter-ui")
    spec = deploy["spec"]["template"]["spec"]
    assert restricted_problems(spec) == []
    (c,) = spec["containers"]
    assert c["image"] == f"{PROJECT_IMAGE}:0.1.0"
    # the arguments are the real command's (renaming a flag breaks this, not the pod)
    args = build_parser().parse_args([*c["command"][1:], *c["args"]])
    assert c["command"] == ["motioncharacter"] and args.func is ui._run
    triton = find(docs, "Service", "triton")
    grpc = next(p["port"] for p in triton["spec"]["ports"] if p["name"] == "grpc")
    assert args.url == f"grpc://triton.motioncharacter.svc.cluster.local:{grpc}"
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert args.host == "0.0.0.0" and args.port == port and args.concurrency >= 1 and args.queue_size >= 1
    assert env(c)[ui.AUTH_ENV]["valueFrom"]["secretKeyRef"] == {"name": "ui-auth", "key": ui.AUTH_ENV}
    assert "emptyDir" in volume(spec, "tmp") and mount_path(c, "tmp") == "/tmp"  # uploads, read-only root
    svc = find(docs, "Service", "motioncharacter-ui")
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]


def test_ui_network_policy_lets_in_only_its_clients_and_out_only_to_triton_and_dns():
    docs = rendered("overlays/local")
    labels = find(docs, "Deployment", "motioncharacter-ui")["spec"]["template"]["metadata"]["labels"]
    policy = find(docs, "NetworkPolicy", "motioncharacter-ui")
    assert _selects(policy["spec"]["podSelector"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": 7860}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"motioncharacter.io/ui-client": "true"}}}]
    to_triton, to_dns = policy["spec"]["egress"]
    triton_labels = find(docs, "Deployment", "triton")["spec"]["template"]["metadata"]["labels"]
    (peer,) = to_triton["to"]
    assert set(peer) == {"podSelector"} and _selects(peer["podSelector"], triton_labels)
    assert {p["port"] for p in to_triton["ports"]} == {8000, 8001}
    assert {p["port"] for p in to_dns["ports"]} == {53}
    assert to_dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    # and Triton's own policy lets the page in on gRPC
    triton_policy = find(docs, "NetworkPolicy", "triton-clients-and-metrics")
    assert any(8001 in {p["port"] for p in r["ports"]} and any(
        f.get("podSelector") == {} or _selects(f.get("podSelector", {"matchLabels": {"x": "y"}}), labels)
        for f in r["from"]) for r in triton_policy["spec"]["ingress"])


# --- security properties across every workload ------------------------------------------

@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS + TRAINING_OVERLAYS)
def test_every_pod_is_non_root_and_locked_down(overlay):
    docs = rendered(overlay)
    seen = 0
    for owner, spec in pod_specs(docs):
        seen += 1
        assert spec["securityContext"]["runAsNonRoot"] is True, owner
        assert spec["securityContext"]["runAsUser"] != 0, owner
        assert spec.get("automountServiceAccountToken") is False, owner
        # what the namespace's warn/audit labels hold every pod to (k8s/base/namespace.yaml)
        assert restricted_problems(spec) == [], owner
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, owner
            assert sc["capabilities"]["drop"] == ["ALL"], owner
            assert sc["readOnlyRootFilesystem"] is True, owner
            assert c["resources"]["requests"], owner
            image, _, tag = c["image"].rpartition(":")
            assert image and tag and tag != "latest" and "/" not in tag, (owner, c["image"])
    assert seen >= (1 if "trainjob" in overlay else 2 if "training" in overlay else 5)


def _secret_templates() -> dict[str, dict]:
    out = {}
    for f in sorted((K8S / "secrets").glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        out[doc["metadata"]["name"]] = doc
    return out


def test_secret_templates_hold_only_placeholders():
    templates = _secret_templates()
    assert set(templates) == {*WORKLOAD_SECRETS.values(), "minio-root", "mlflow-db", "mlflow-admin", "mlflow-client",
                              "triton-admin", "ui-auth"}
    for name, doc in templates.items():
        assert doc["kind"] == "Secret" and "data" not in doc, name
        assert doc["metadata"]["annotations"]["motioncharacter.io/template"] == "true"
        assert doc["stringData"] and set(doc["stringData"].values()) == {"CHANGE_ME"}, name
        text = (K8S / "secrets" / f"{name}.yaml").read_text()
        assert text.startswith("# TEMPLATE ONLY"), name


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS + TRAINING_OVERLAYS)
def test_secrets_are_referenced_never_rendered(overlay):
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "a render must not carry Secret objects"
    assert "CHANGE_ME" not in yaml.safe_dump_all(docs)
    templates = _secret_templates()
    refs = 0
    for owner, spec in pod_specs(docs):
        for c in containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs += 1
                    # every reference has a template, so `create-secrets.sh` or a filled
                    # template satisfies it
                    assert ref["key"] in templates[ref["name"]]["stringData"], (owner, ref)
                elif SECRET_NAME_RE.search(e["name"]):
                    pytest.fail(f"{owner}: {e['name']} is set literally, not from a Secret")
    assert refs >= 2


def test_config_map_references_resolve():
    base = rendered("overlays/production")
    for overlay in SERVICE_OVERLAYS + TRAINING_OVERLAYS:
        docs = rendered(overlay)
        # training runs beside the services, so it may use their ConfigMaps
        maps = {d["metadata"]["name"]: d["data"] for d in docs + base if d["kind"] == "ConfigMap"}
        for owner, spec in pod_specs(docs):
            for c in containers(spec):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("configMapKeyRef")
                    if ref:
                        assert ref["key"] in maps[ref["name"]], (overlay, owner, ref)


# --- least privilege in the object store (one MinIO user and policy per workload) -------------

def secret_refs(spec) -> set[str]:
    """Names of every Secret a pod spec reads: env, envFrom and volumes."""
    names = set()
    for c in containers(spec):
        names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                  if "secretKeyRef" in e.get("valueFrom", {})}
        names |= {f["secretRef"]["name"] for f in c.get("envFrom", []) if "secretRef" in f}
    for v in spec.get("volumes", []):
        names |= {v["secret"]["secretName"]} if "secret" in v else set()
        names |= {s["secret"]["name"] for s in v.get("projected", {}).get("sources", []) if "secret" in s}
    return names


# every workload reads the S3 credentials of its own user only; MinIO's root only MinIO and the Job
# that creates the users, which in turn needs every user's keys
EXPECTED_SECRETS = {
    "StatefulSet/minio": {"minio-root"},
    "Job/minio-setup": {"minio-root", *WORKLOAD_SECRETS.values()},
    "StatefulSet/mlflow-postgres": {"mlflow-db"},
    "Deployment/mlflow": {"mlflow-db", "s3-mlflow", "mlflow-admin"},
    "Job/mlflow-setup": {"mlflow-admin", "mlflow-client"},
    "Deployment/triton": {"s3-triton", "triton-admin"},
    "Deployment/motioncharacter-ui": {"ui-auth"},  # its login; no object store, no MLflow
    "PyTorchJob/motioncharacter-train/Master": {"s3-training", "mlflow-client"},
    "PyTorchJob/motioncharacter-train/Worker": {"s3-training", "mlflow-client"},
    "TrainJob/motioncharacter-train/node": {"s3-training", "mlflow-client"},
}


# whose S3 user each object-store client's AWS_* come from
S3_USER = {"Deployment/triton": "s3-triton", "Deployment/mlflow": "s3-mlflow",
           "PyTorchJob/motioncharacter-train/Master": "s3-training",
           "PyTorchJob/motioncharacter-train/Worker": "s3-training",
           "TrainJob/motioncharacter-train/node": "s3-training"}


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS + TRAINING_OVERLAYS)
def test_each_workload_reads_only_its_own_secrets(overlay):
    """No shared object-store user: each client's AWS_* come from its own Secret, and MinIO's root
    account (minio-root) reaches no pod but MinIO and minio-setup."""
    seen = 0
    for owner, spec in pod_specs(rendered(overlay)):
        assert secret_refs(spec) == EXPECTED_SECRETS[owner], owner
        if owner in S3_USER:
            seen += 1
            (c,) = spec["containers"]
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env(c)[key]["valueFrom"]["secretKeyRef"] == {"name": S3_USER[owner], "key": key}, owner
        if "minio-root" in secret_refs(spec):
            assert owner in ("StatefulSet/minio", "Job/minio-setup"), owner
    assert seen == (1 if "trainjob" in overlay else 2), overlay  # Triton + MLflow, the training replicas or nodes


def _policies(docs=None) -> dict[str, dict]:
    import json

    data = find(docs or rendered("overlays/production"), "ConfigMap", "minio-policies")["data"]
    return {name.removesuffix(".json"): json.loads(text) for name, text in data.items()}


def allows(policy: dict, action: str, resource: str) -> bool:
    """IAM evaluation for Allow-only policies without conditions (what minio-policies holds):
    some statement names the action and a resource pattern (`*` wildcards) matches."""
    import fnmatch

    assert all(st["Effect"] == "Allow" and not st.get("Condition") for st in policy["Statement"])
    return any(action in st["Action"] and any(fnmatch.fnmatchcase(resource, r) for r in st["Resource"])
               for st in policy["Statement"])


def _obj(uri: str) -> str:
    """arn of an object below an s3:// prefix."""
    return f"arn:aws:s3:::{uri.removeprefix('s3://').rstrip('/')}/x"


def test_triton_policy_is_read_only_on_the_model_repository():
    """Triton runs model.py from the repository: its user may only list the model bucket and get
    objects under the repositories the overlays serve; no write, no other bucket."""
    triton = _policies()["triton"]
    for st in triton["Statement"]:
        assert set(st["Action"]) <= {"s3:GetObject", "s3:ListBucket"}, st
        assert all(r == "arn:aws:s3:::models" or r.startswith("arn:aws:s3:::models/") for r in st["Resource"]), st
    for overlay in SERVICE_OVERLAYS:
        repo = find(rendered(overlay), "ConfigMap", "triton-config")["data"]["MODEL_REPOSITORY"]
        bucket_path = repo.split("/", 3)[3]  # s3://HOST:PORT/BUCKET/PATH
        assert allows(triton, "s3:GetObject", _obj("s3://" + bucket_path)), overlay
        assert allows(triton, "s3:ListBucket", "arn:aws:s3:::models")
        assert not allows(triton, "s3:PutObject", _obj("s3://" + bucket_path))
    assert not allows(triton, "s3:GetObject", _obj("s3://models/sd15-animatediff"))
    assert not allows(triton, "s3:GetObject", _obj("s3://checkpoints/run"))


def test_every_workload_policy_covers_what_its_manifest_names_and_no_more():
    """The paths each workload is configured with are inside its policy, and the writes that would
    let it run code elsewhere are outside (model repositories, checkpoints, base weights)."""
    pol = _policies()
    assert set(pol) == set(WORKLOAD_SECRETS)
    # MLflow: artifacts in its bucket, nothing else
    (c,) = find(rendered("overlays/production"), "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    dest = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--artifacts-destination="))
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert allows(pol["mlflow"], action, _obj(dest))
    for uri in ("s3://clips/raw", "s3://models/triton", "s3://checkpoints/run", "s3://pipelines/run"):
        assert not allows(pol["mlflow"], "s3:GetObject", _obj(uri)), uri
    # training: reads its --data and base weights, writes its --output, never the model repositories
    for overlay in TRAINING_OVERLAYS:
        docs = rendered(overlay)
        (_, pod), *_ = [p for p in pod_specs(docs) if "motioncharacter-train" in p[0]]
        args = pod["containers"][0]["args"]
        opt = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
        weights = yaml.safe_load(find(docs, "ConfigMap", "motioncharacter-train-config")["data"]["train.yaml"])[
            "model"]["weights"]
        assert allows(pol["training"], "s3:GetObject", _obj(opt["--data"]))
        assert allows(pol["training"], "s3:GetObject", _obj(weights))
        assert allows(pol["training"], "s3:PutObject", _obj(opt["--output"]))
        assert allows(pol["training"], "s3:GetObject", _obj(opt["--output"]))  # resume
    for uri in ("s3://models/triton", "s3://models/sd15-animatediff", "s3://clips/raw", "s3://mlflow/1"):
        assert not allows(pol["training"], "s3:PutObject", _obj(uri)), uri
    # pipeline: writes its run data and publishes model repositories, not base weights or checkpoints
    import inspect

    from motioncharacter.pipelines.pipeline import motioncharacter_pipeline

    defaults = {k: p.default for k, p in inspect.signature(motioncharacter_pipeline.pipeline_func).parameters.items()}
    assert allows(pol["pipeline"], "s3:PutObject", _obj(defaults["work_uri"]))
    assert allows(pol["pipeline"], "s3:PutObject", _obj(defaults["model_repository"]))
    assert allows(pol["pipeline"], "s3:PutObject", _obj("s3://models/triton"))
    # KServe: the pipeline publishes each version's repository beside model_repository; Triton's user
    # (which KServe's storage initializer reads as) only reads them
    from motioncharacter.serving import kserve

    served_by_kserve = kserve.storage_uri(defaults["model_repository"], 3)
    assert allows(pol["pipeline"], "s3:PutObject", _obj(served_by_kserve))
    assert allows(pol["triton"], "s3:GetObject", _obj(served_by_kserve))
    assert not allows(pol["triton"], "s3:PutObject", _obj(served_by_kserve))
    for uri in ("s3://models/sd15-animatediff", "s3://checkpoints/run", "s3://clips/raw", "s3://mlflow/1"):
        assert not allows(pol["pipeline"], "s3:PutObject", _obj(uri)), uri
    assert not allows(pol["pipeline"], "s3:GetObject", _obj("s3://mlflow/1"))
    # nobody but minio-setup (root) creates buckets or administers MinIO
    for name, p in pol.items():
        actions = {a for st in p["Statement"] for a in st["Action"]}
        assert not any("*" in a or a.startswith("admin:") for a in actions), name
        assert "s3:CreateBucket" not in actions and "s3:DeleteBucket" not in actions, name


def test_minio_setup_creates_one_user_per_workload_without_secrets_on_command_lines():
    docs = rendered("overlays/production")
    spec = find(docs, "Job", "minio-setup")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    script = c["args"][0]
    e = env(c)
    # the root credentials reach mc through its alias variable, expanded by the kubelet from the
    # Secret refs defined before it (order matters for $(VAR))
    assert e["MC_HOST_store"]["value"] == "http://$(MINIO_ROOT_USER):$(MINIO_ROOT_PASSWORD)@minio:9000"
    names = list(e)
    assert names.index("MINIO_ROOT_PASSWORD") < names.index("MC_HOST_store")
    assert "mc alias set" not in script and "MINIO_ROOT_PASSWORD" not in script
    # a user's secret key goes to `mc admin user add` through stdin: two arguments, never three
    add = [line.strip() for line in script.splitlines() if "mc admin user add" in line]
    assert add and all(a.startswith("""printf '%s\\n' "$3" | mc admin user add store "$2" >""") for a in add), add
    for w, secret in WORKLOAD_SECRETS.items():
        W = w.upper()
        assert e[f"{W}_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "AWS_ACCESS_KEY_ID"}
        assert e[f"{W}_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "AWS_SECRET_ACCESS_KEY"}
        assert f'add_user {w} "${W}_ACCESS_KEY" "${W}_SECRET_KEY"' in script
    # policies come from the ConfigMap, mounted where the script reads them
    assert 'mc admin policy create store "motioncharacter-$1" "/policies/$1.json"' in script
    assert 'mc admin policy attach store "motioncharacter-$1" --user "$2"' in script
    assert volume(spec, "policies")["configMap"]["name"] == "minio-policies"
    assert mount_path(c, "policies") == "/policies"
    assert set(_policies(docs)) == set(WORKLOAD_SECRETS)
    # no shared user any more, and the setup refuses a user that holds more than its own policy
    assert "readwrite" not in script and "s3-credentials" not in yaml.safe_dump_all(docs)
    assert '[ "$policies" != "motioncharacter-$1" ]' in script


FAKE_MC = """#!/bin/sh
# records every call (argv, and stdin where mc would read it) and answers like mc does
state="$FAKE_MC_DIR"
printf '%s\\n' "$*" >> "$state/argv"
case "$1 $2 $3" in
  "admin user add") read -r secret; printf '%s %s\\n' "$5" "$secret" >> "$state/users" ;;
  "admin policy attach") printf '%s\\n' "$5" > "$state/policy-$7" ;;
  "admin user info") printf 'AccessKey: %s\\nStatus: enabled\\nPolicyName: %s\\n' "$5" "$(cat "$state/policy-$5")" ;;
esac
exit 0
"""


def test_minio_setup_script_passes_no_secret_as_an_argument(tmp_path):
    """Run the Job's script with a stand-in `mc` on PATH: every user is created with its secret on
    stdin and its own policy attached, and no secret value is ever an argument."""
    (c,) = find(rendered("overlays/local"), "Job", "minio-setup")["spec"]["template"]["spec"]["containers"]
    mc = tmp_path / "bin" / "mc"
    mc.parent.mkdir()
    mc.write_text(FAKE_MC)
    mc.chmod(0o755)
    run_env = {"PATH": f"{mc.parent}:/usr/bin:/bin", "FAKE_MC_DIR": str(tmp_path)}
    for e in c["env"]:
        run_env[e["name"]] = e.get("value", "")
    secrets_ = {}
    for w in WORKLOAD_SECRETS:
        run_env[f"{w.upper()}_ACCESS_KEY"] = f"{w}-key"
        run_env[f"{w.upper()}_SECRET_KEY"] = secrets_[w] = f"{w}-secret-value"
    run_env["MINIO_ROOT_PASSWORD"] = "root-secret-value"
    out = subprocess.run([*c["command"], c["args"][0]], env=run_env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = (tmp_path / "argv").read_text()
    assert not any(v in argv for v in [*secrets_.values(), "root-secret-value"]), argv
    assert (tmp_path / "users").read_text().splitlines() == [f"{w}-key {secrets_[w]}" for w in WORKLOAD_SECRETS]
    for w in WORKLOAD_SECRETS:
        assert (tmp_path / f"policy-{w}-key").read_text().strip() == f"motioncharacter-{w}"
    # a user that also holds another policy (the old shared `readwrite`) makes the Job fail
    mc.write_text(FAKE_MC.replace('"$(cat "$state/policy-$5")"', '"$(cat "$state/policy-$5"),readwrite"'))
    out = subprocess.run([*c["command"], c["args"][0]], env=run_env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "readwrite" in out.stderr


# --- network policies and RBAC ---------------------------------------------------------------

def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_network_policies_deny_by_default_and_open_each_service(overlay):
    docs = rendered(overlay)
    policies = find(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"]

    # default deny must not silently cut a Service off: each port is allowed by a policy
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in find(docs, "Service"):
        pods = [w for w in workloads
                if _selects({"matchLabels": svc["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])]
        assert pods, svc["metadata"]["name"]
        labels = pods[0]["spec"]["template"]["metadata"]["labels"]
        target_ports = {p["name"]: p["containerPort"] for c in pods[0]["spec"]["template"]["spec"]["containers"]
                        for p in c["ports"]}
        allowed = {pt["port"] for p in policies if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], labels)
                   for rule in p["spec"].get("ingress", []) for pt in rule.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert target_ports[port["targetPort"]] in allowed, (svc["metadata"]["name"], port)

    # the database only from MLflow
    (pg,) = [p for p in policies if _selects(p["spec"]["podSelector"], {"app.kubernetes.io/name": "mlflow-postgres"})
             and p["spec"]["podSelector"]]
    assert pg["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    # training pods reach each other on any port (NCCL picks its own)
    train = next(p for p in policies if p["metadata"]["name"] == "training-peers")
    assert "ports" not in train["spec"]["ingress"][0]
    pt_labels = find(rendered("training/overlays/production"), "PyTorchJob")[0]["spec"]["pytorchReplicaSpecs"][
        "Worker"]["template"]["metadata"]["labels"]
    assert _selects(train["spec"]["podSelector"], pt_labels)


def test_pipeline_rbac_is_least_privilege():
    docs = rendered("overlays/production")
    role = find(docs, "Role", "motioncharacter-pipeline")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    secrets = rules[(("",), ("secrets",))]
    assert secrets["verbs"] == ["get"] and secrets["resourceNames"]
    # the pipeline's own object-store user, none of the other workloads' and not MinIO's root
    assert set(secrets["resourceNames"]) == {"s3-pipeline", "mlpipeline-minio-artifact"}
    # no pod create (a created pod could mount any Secret) and no pod patch (an image swap in a
    # pod holding another workload's Secret): read-only on pods
    assert set(rules[(("",), ("pods",))]["verbs"]) == {"get", "list", "watch"}
    assert "create" in rules[(("",), ("persistentvolumeclaims",))]["verbs"]
    # the train step launches, follows and deletes its PyTorchJob (pipelines/launch.py); no update/patch
    assert set(rules[(("kubeflow.org",), ("pytorchjobs",))]["verbs"]) == {"get", "list", "watch", "create", "delete"}
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in role["rules"])
    binding = find(docs, "RoleBinding", "motioncharacter-pipeline")
    assert binding["roleRef"]["name"] == "motioncharacter-pipeline"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "motioncharacter-pipeline",
                                    "namespace": "motioncharacter"}]
    find(docs, "ServiceAccount", "motioncharacter-pipeline")


def test_no_role_bound_to_the_pipeline_account_can_create_pods_or_read_other_secrets():
    """Over every Role and ClusterRole bound to the pipeline account: no pod create/patch/update,
    no pods/exec, secrets only by name and only its own, no escalate/bind/impersonate."""
    docs = rendered("overlays/production")
    subject = {"kind": "ServiceAccount", "name": "motioncharacter-pipeline", "namespace": "motioncharacter"}
    bound = [b["roleRef"] for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
             and subject in b.get("subjects", [])]
    assert bound
    for ref in bound:
        role = find(docs, ref["kind"], ref["name"])
        for r in role["rules"]:
            res, verbs = set(r["resources"]), set(r["verbs"])
            assert "*" not in verbs | res | set(r["apiGroups"]), r
            assert not ({"pods", "pods/exec", "pods/attach", "pods/ephemeralcontainers"} & res
                        and {"create", "update", "patch"} & verbs), r
            assert not ({"escalate", "bind", "impersonate"} & verbs), r
            assert not ({"deployments", "statefulsets", "jobs", "cronjobs", "replicasets", "daemonsets"} & res), r
            if "secrets" in res:
                assert verbs == {"get"} and set(r["resourceNames"]) == {"s3-pipeline", "mlpipeline-minio-artifact"}


def test_trainjobs_from_the_pipeline_are_held_to_its_own_secrets():
    """A TrainJob from the pipeline account: its own Secrets only, in the trainer's env and in the
    runtime patch's pods, the default account (which mounts no token), a cluster runtime only."""
    docs = rendered("overlays/production")
    policy = find(docs, "ValidatingAdmissionPolicy", "motioncharacter-pipeline-trainjobs")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "motioncharacter-pipeline-trainjobs")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["trainer.kubeflow.org"] and rule["resources"] == ["trainjobs"]
    text = " ".join(v["expression"] for v in policy["spec"]["validations"] + policy["spec"]["variables"])
    for field in ("trainer.env", "runtimePatches", "secretKeyRef", "v.secret", "projected", "initContainers",
                  "serviceAccountName", "ClusterTrainingRuntime"):
        assert field in text, field
    assert "['s3-pipeline', 'mlflow-client']" in text
    assert find(docs, "ServiceAccount", "default")["automountServiceAccountToken"] is False
    role = find(docs, "Role", "motioncharacter-pipeline")
    assert any(r["apiGroups"] == ["trainer.kubeflow.org"] and r["resources"] == ["trainjobs"] for r in role["rules"])
    from motioncharacter.pipelines import launch

    job = launch.trainjob_manifest(launch.JobSpec(name="t", namespace="motioncharacter", image="i",
                                                  train_args=["train"], nodes=2, gpus_per_node=1))
    pod = trainjob_pod(job)
    assert pod.get("serviceAccountName", "default") == "default"
    assert secret_refs(pod) == {"s3-pipeline", "mlflow-client"}
    assert job["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"


def test_pytorchjobs_from_the_pipeline_are_held_to_its_own_secret():
    """The one way the pipeline starts pods, a PyTorchJob, is checked at admission for exactly
    the pipeline account: its own Secret only, the default ServiceAccount."""
    docs = rendered("overlays/production")
    policy = find(docs, "ValidatingAdmissionPolicy", "motioncharacter-pipeline-pytorchjobs")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "motioncharacter-pipeline-pytorchjobs")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["pytorchjobs"] and set(rule["operations"]) == {"CREATE", "UPDATE"}
    (cond,) = policy["spec"]["matchConditions"]
    assert "system:serviceaccount:motioncharacter:motioncharacter-pipeline" in cond["expression"]
    text = " ".join(v["expression"] for v in policy["spec"]["validations"] + policy["spec"]["variables"])
    for field in ("secretKeyRef", "envFrom", "secretRef", "v.secret", "projected", "initContainers",
                  "serviceAccountName"):
        assert field in text, field
    assert "['s3-pipeline', 'mlflow-client']" in text
    # what the train step launches passes the policy's own conditions
    from motioncharacter.pipelines import launch

    job = launch.pytorchjob_manifest(launch.JobSpec(name="t", namespace="motioncharacter", image="i",
                                                    train_args=["train"], nodes=2, gpus_per_node=1))
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod.get("serviceAccountName", "default") == "default"
        refs = secret_refs(pod)
        assert refs == {"s3-pipeline", "mlflow-client"}, refs


@pytest.mark.parametrize("overlay", SERVICE_OVERLAYS)
def test_mlflow_is_behind_basic_auth_with_credentials_from_secrets(overlay):
    import configparser

    docs = rendered(overlay)
    (c,) = containers(find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"])
    assert "--app-name=basic-auth" in c["args"] and c["command"] == ["sh", "-c"]
    e = env(c)
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert e[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin", var
    assert e["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/tmp/basic_auth.ini"
    assert "/tmp/basic_auth.ini" in c["args"][0] and "$MLFLOW_BACKEND_STORE_URI" in c["args"][0]
    ini = configparser.ConfigParser()
    ini.read_string(find(docs, "ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"])
    assert ini["mlflow"]["default_permission"] == "READ" and ini["mlflow"]["database_uri"] == "@DATABASE_URI@"
    assert "admin_password" not in ini["mlflow"]  # never in a ConfigMap
    setup = containers(find(docs, "Job", "mlflow-setup")["spec"]["template"]["spec"])[0]
    assert "create_user" in setup["args"][0]
    assert {k: v["valueFrom"]["secretKeyRef"]["name"] for k, v in env(setup).items() if "valueFrom" in v
            and "secretKeyRef" in v["valueFrom"]} == {"ADMIN_USERNAME": "mlflow-admin", "ADMIN_PASSWORD": "mlflow-admin",
                                                       "CLIENT_USERNAME": "mlflow-client",
                                                       "CLIENT_PASSWORD": "mlflow-client"}


def test_mlflow_clients_log_in_from_their_environment_and_the_names_count_as_secrets():
    from motioncharacter import tracking

    pt = find(rendered("training/overlays/production"), "PyTorchJob")[0]
    for role in ("Master", "Worker"):
        e = env(containers(pt["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"])[0])
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert e[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-client", "key": var}
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "mlflow.tracking_username"):
        assert tracking.is_secret_key(var.lower()), var
    assert "MLFLOW_TRACKING_PASSWORD" in tracking._SECRET_ENV


def test_everything_lives_in_the_namespace():
    for overlay in SERVICE_OVERLAYS + TRAINING_OVERLAYS:
        for d in rendered(overlay):
            if d["kind"] == "Namespace":
                assert d["metadata"]["name"] == "motioncharacter"
            else:
                assert d["metadata"]["namespace"] == "motioncharacter", (overlay, d["kind"], d["metadata"]["name"])


# --- Triton reads the s3:// model repository exactly as the Deployment tells it to -----------

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 2 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x * 2)]))
        return out
"""


@pytest.mark.services
def test_triton_loads_the_s3_repository_named_in_the_manifest(s3_only_stack, tmp_path):
    """The Triton build the project pins (2.51, the release in tritonserver:24.10) loads a model
    repository from the object store given the local overlay's MODEL_REPOSITORY with only the
    host:port swapped, credentials from AWS_* in the environment as the Secret provides them; the
    wrong secret key leaves the server unready."""
    import json
    import urllib.request

    import io

    from minio import Minio

    from motioncharacter.serving.server import backend_dir, free_port, server_env, tritonserver_binary

    repo = find(rendered("overlays/local"), "ConfigMap", "triton-config")["data"]["MODEL_REPOSITORY"]
    hostport = s3_only_stack.s3_endpoint.split("://", 1)[1]
    repo = repo.replace("minio.motioncharacter.svc.cluster.local:9000", hostport)
    bucket, prefix = repo.split("/", 3)[3].split("/", 1)
    creds = s3_only_stack.env()
    client = Minio(hostport, access_key=creds["AWS_ACCESS_KEY_ID"], secret_key=creds["AWS_SECRET_ACCESS_KEY"],
                   secure=False)
    for key, text in {"echo/config.pbtxt": ECHO_CONFIG, "echo/1/model.py": ECHO_MODEL}.items():
        data = text.encode()
        client.put_object(bucket, f"{prefix}/{key}", io.BytesIO(data), len(data))

    def run(secret: str, log_name: str):
        http = free_port()
        env = server_env({k: v for k, v in os.environ.items() if not k.startswith("AWS_")})
        env.update(AWS_ACCESS_KEY_ID=creds["AWS_ACCESS_KEY_ID"], AWS_SECRET_ACCESS_KEY=secret,
                   AWS_DEFAULT_REGION="us-east-1", TMPDIR=str(tmp_path))
        cmd = [str(tritonserver_binary()), f"--model-repository={repo}", f"--backend-directory={backend_dir()}",
               "--http-address=127.0.0.1", f"--http-port={http}", f"--grpc-port={free_port()}",
               f"--metrics-port={free_port()}", "--strict-readiness=true", "--exit-on-error=true",
               "--exit-timeout-secs=5"]
        log = open(tmp_path / log_name, "wb")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc, http, log

    def ready(http):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(proc, log):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()

    proc, http, log = run(creds["AWS_SECRET_ACCESS_KEY"], "good.log")
    try:
        deadline = time.monotonic() + 120
        while not ready(http):
            assert proc.poll() is None, (tmp_path / "good.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "Triton not ready in 120 s"
            time.sleep(0.25)
        body = json.dumps({"inputs": [{"name": "IN", "shape": [2], "datatype": "FP32", "data": [1.5, -2.0]}]})
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/echo/infer", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())["outputs"][0]
        assert out["name"] == "OUT" and out["data"] == [3.0, -4.0]
    finally:
        stop(proc, log)

    proc, http, log = run("not-the-secret", "bad.log")
    try:
        # until it exits (pytest's timeout is the hang guard): never ready with a wrong key, then a failure
        while proc.poll() is None:
            assert not ready(http), "Triton became ready with a wrong secret key"
            time.sleep(0.25)
        assert proc.returncode != 0, "with a wrong key Triton should fail to load and exit (--exit-on-error)"
    finally:
        stop(proc, log)
