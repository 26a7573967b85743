"""Where the pipeline's training runs: in the step's own process, as N processes under torchrun in
the step (``train_processes``, the local branch: CPU and gloo here), or as a Kubeflow Training
Operator ``PyTorchJob`` (kubeflow.org/v1) of ``train_nodes`` x ``gpus_per_node`` that the step
creates through the Kubernetes API, follows (status and the master's log), waits for and, unless
asked to keep it, deletes.

The job has the shape of ``k8s/training/base/pytorchjob.yaml`` (Master + Workers, container
``pytorch``, ``torchrun --no-python motioncharacter train``, the same locked-down pod), with
the pipeline's own object-store identity and endpoints, since it reads and writes the pipeline's
``work_uri``. Its name derives from the output URI, so a retried step finds its job again instead
of starting a second one.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

IN_STEP, LOCAL, CLUSTER = "in-step", "torchrun", "pytorchjob"
GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# env of every rank, as in k8s/training/base/pytorchjob.yaml
RANK_ENV = {"NCCL_DEBUG": "WARN", "NCCL_SOCKET_IFNAME": "eth0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "4", "HOME": "/tmp",
            "TORCH_EXTENSIONS_DIR": "/tmp/torch_extensions", "MOTIONCHARACTER_CACHE": "/tmp/motioncharacter-cache",
            "PYTHONUNBUFFERED": "1"}
ENDPOINT_KEYS = ("MOTIONCHARACTER_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")


class JobFailed(RuntimeError):
    """The launched training failed; the message carries the job's (or the processes') reason."""


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def plan(train_nodes: int = 1, gpus_per_node: int = 1, train_processes: int = 1, cluster: bool | None = None) -> str:
    """Which branch trains: IN_STEP (one process), LOCAL (``train_processes`` under torchrun in the
    step) or CLUSTER (a PyTorchJob of ``train_nodes`` x ``gpus_per_node``)."""
    for name, v in (("train_nodes", train_nodes), ("gpus_per_node", gpus_per_node),
                    ("train_processes", train_processes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an integer >= 1")
    job = train_nodes > 1 or gpus_per_node > 1
    if job and train_processes > 1:
        raise ValueError(f"train_processes={train_processes} runs processes inside the step; with train_nodes="
                         f"{train_nodes}, gpus_per_node={gpus_per_node} the PyTorchJob runs one process per GPU: "
                         "set one or the other")
    if job:
        if not (in_cluster() if cluster is None else cluster):
            raise ValueError(f"train_nodes={train_nodes}, gpus_per_node={gpus_per_node} launch a PyTorchJob, which "
                             "needs a Kubernetes cluster with the Kubeflow Training Operator (this step is not "
                             "running in one); on this machine use train_processes=N")
        return CLUSTER
    return LOCAL if train_processes > 1 else IN_STEP


# ---- the local branch: torchrun in the step ------------------------------------------------------

def torchrun_command(nproc: int, train_args: list[str]) -> list[str]:
    """``motioncharacter train`` as ``nproc`` processes on this node (a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "motioncharacter.cli", *train_args]


def torchrun_env(base: dict | None = None) -> dict[str, str]:
    """A clean launcher environment: no rank variables inherited, DeepSpeed on its CPU
    accelerator (gloo) where there is no GPU, one OpenMP thread per rank unless set."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_torchrun(nproc: int, train_args: list[str], env: dict | None = None, out=None) -> None:
    """Run and stream the ranks' output (to the step's log); JobFailed with the tail on failure."""
    out = out or sys.stdout
    tail: list[str] = []
    errors: list[str] = []  # the ranks' own error lines: torchrun's traceback that follows says only "failed"
    p = subprocess.Popen(torchrun_command(nproc, train_args), env=torchrun_env(env), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        out.write(line)
        tail = (tail + [line.rstrip()])[-15:]
        if re.search(r"\berror\b|Error\b", line) and not re.search(r"torch/distributed|ChildFailedError", line):
            errors = (errors + [line.rstrip()])[-10:]
    if p.wait():
        raise JobFailed(f"torchrun of {nproc} training process(es) exited with status {p.returncode}; errors:\n"
                        + "\n".join(errors or ["(none printed)"]) + "\nlast lines:\n" + "\n".join(tail))


# ---- the cluster branch: a PyTorchJob ------------------------------------------------------------

def job_name(output_uri: str) -> str:
    """Stable per output: a retried step reattaches to its job (DNS-1035, the operator's Services use it)."""
    return "mc-train-" + hashlib.sha256(output_uri.encode()).hexdigest()[:12]


@dataclass
class JobSpec:
    name: str
    namespace: str
    image: str
    train_args: list[str]           # after ``motioncharacter``: ["train", "--data=...", ...]
    nodes: int = 1
    gpus_per_node: int = 1
    s3_secret: str = "s3-pipeline"
    mlflow_secret: str = ""          # MLFLOW_TRACKING_USERNAME / _PASSWORD, when MLflow asks for them
    mlflow_secret: str = "mlflow-client"  # MLflow's basic-auth user
    endpoints: str = "motioncharacter-endpoints"
    backoff_limit: int = 3
    cpu_per_gpu: int = 4
    memory_per_gpu_gi: int = 48


def _pod_template(spec: JobSpec) -> dict:
    g = spec.gpus_per_node
    env = [{"name": k, "value": v} for k, v in RANK_ENV.items()]
    env += [{"name": k, "valueFrom": {"configMapKeyRef": {"name": spec.endpoints, "key": k}}} for k in ENDPOINT_KEYS]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": k}}}
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if spec.mlflow_secret:
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.mlflow_secret, "key": k}}}
                for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.mlflow_secret, "key": k}}}
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")]
    labels = {"app.kubernetes.io/name": "motioncharacter-train", "app.kubernetes.io/component": "training",
              "app.kubernetes.io/part-of": "motioncharacter"}
    return {
        "metadata": {"labels": labels},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 300,  # SIGTERM saves a checkpoint: time to upload it
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{
                "name": "pytorch",  # the operator finds the container by this name
                "image": spec.image,
                "command": ["torchrun"],  # reads PET_NNODES, PET_NODE_RANK, ... set by the operator
                "args": ["--no-python", "motioncharacter", *spec.train_args],
                "env": env,
                "ports": [{"name": "pytorchjob-port", "containerPort": 23456}],
                "resources": {
                    "requests": {"cpu": str(spec.cpu_per_gpu * g), "memory": f"{spec.memory_per_gpu_gi * g}Gi",
                                 "nvidia.com/gpu": g},
                    "limits": {"memory": f"{2 * spec.memory_per_gpu_gi * g}Gi", "nvidia.com/gpu": g}},
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},  # NCCL, loader workers
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Gi"}},  # checkpoint staging, the download cache
            ],
        },
    }


def pytorchjob_manifest(spec: JobSpec) -> dict:
    """The PyTorchJob: one Master and ``nodes - 1`` Workers, ``gpus_per_node`` processes (and GPUs) each."""
    replica = {"restartPolicy": "OnFailure", "template": _pod_template(spec)}
    replicas = {"Master": {"replicas": 1, **replica}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, **replica}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace,
                     "labels": {"app.kubernetes.io/name": "motioncharacter-train",
                                "app.kubernetes.io/part-of": "motioncharacter"}},
        "spec": {"nprocPerNode": str(spec.gpus_per_node),
                 # pods stay until the job is deleted, so a failure's logs can still be read
                 "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit},
                 "pytorchReplicaSpecs": replicas},
    }


def job_state(job: dict) -> tuple[str, str]:
    """(state, why) from the job's status conditions: the newest true one of Created, Running,
    Restarting, Suspended, Succeeded, Failed; "Pending" before the operator reports any."""
    conds = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for final in ("Failed", "Succeeded"):  # a final condition wins over a stale Running
        for c in conds:
            if c.get("type") == final:
                return final, ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
    if not conds:
        return "Pending", "no status from the training operator yet"
    c = conds[-1]
    return c.get("type", "Unknown"), ": ".join(x for x in (c.get("reason"), c.get("message")) if x)


def current_namespace(default: str = "default") -> str:
    try:
        with open(SA_NAMESPACE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def _apis():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def _stream_master_log(core, namespace: str, name: str, out, stop: threading.Event) -> None:
    """Follow the master pod's log into ``out`` once it runs (ended by the pod, or by ``stop``)."""
    selector = f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
    try:
        while not stop.is_set():
            pods = core.list_namespaced_pod(namespace, label_selector=selector).items
            running = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
            if running:
                resp = core.read_namespaced_pod_log(running[0].metadata.name, namespace, container="pytorch",
                                                    follow=True, _preload_content=False)
                for chunk in resp.stream():
                    out.write(chunk.decode(errors="replace"))
                    if stop.is_set():
                        break
                return
            stop.wait(5)
    except Exception as e:  # noqa: BLE001 - the log is a convenience: the job's status decides the step
        out.write(f"(no more log from the master of {name}: {type(e).__name__}: {e})\n")


def launch_job(manifest: dict, keep: bool = False, poll_s: float = 10.0, timeout_s: float | None = None,
               out=None) -> str:
    """Create (or find again) the PyTorchJob, report each state change and the master's log, wait
    for it to end; JobFailed with the job's reason. Deletes the job afterwards unless ``keep``."""
    from kubernetes.client.exceptions import ApiException

    out = out or sys.stdout
    custom, core = _apis()
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    what = f"PyTorchJob {ns}/{name}"
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
        out.write(f"created {what}\n")
    except ApiException as e:
        if e.status != 409:
            raise
        state, _ = job_state(custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
        if state == "Failed":  # an earlier try's job: start over (training resumes from its checkpoint)
            _delete(custom, ns, name, wait=True)
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
            out.write(f"re-created {what} (the previous one had failed)\n")
        else:
            out.write(f"{what} exists ({state}): following it\n")
    stop = threading.Event()
    logs = threading.Thread(target=_stream_master_log, args=(core, ns, name, out, stop), daemon=True)
    logs.start()
    t0, last = time.monotonic(), None
    try:
        while True:
            state, why = job_state(custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name))
            if (state, why) != last:
                out.write(f"{what}: {state}{' (' + why + ')' if why else ''} after {time.monotonic() - t0:.0f} s\n")
                last = (state, why)
            if state == "Succeeded":
                return name
            if state == "Failed":
                raise JobFailed(f"{what} failed: {why or 'no reason given'}")
            if timeout_s and time.monotonic() - t0 > timeout_s:
                raise JobFailed(f"{what} still {state} after {timeout_s:.0f} s")
            time.sleep(poll_s)
    finally:
        stop.set()
        logs.join(10)
        if keep:
            out.write(f"kept {what} (delete it with: kubectl delete pytorchjob -n {ns} {name})\n")
        else:
            _delete(custom, ns, name)
            out.write(f"deleted {what}\n")


def _delete(custom, ns: str, name: str, wait: bool = False) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground")
    except ApiException as e:
        if e.status != 404:
            raise
    while wait:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(2)
