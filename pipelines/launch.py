"""Where the pipeline's training runs: in the step's own process, as N processes under torchrun in
the step (``train_processes``, the local branch: CPU and gloo here), or as a cluster job of
``train_nodes`` x ``gpus_per_node`` that the step creates through the Kubernetes API, follows
(conditions and node 0's log), waits for and, unless asked to keep it, deletes. The cluster job is
a Kubeflow Trainer v2 ``TrainJob`` (trainer.kubeflow.org/v1alpha1) on the stock
``torch-distributed`` runtime by default, or a Training Operator ``PyTorchJob`` (kubeflow.org/v1)
for clusters still on Trainer v1 (``engine="pytorchjob"``).

Both have the shape of ``k8s/training`` (``torchrun --no-python motioncharacter train`` on every
node, which reads the PET_* variables both operators set; the same locked-down pod), with the
pipeline's own object-store identity and endpoints, since it reads and writes the pipeline's
``work_uri``. The name derives from the output URI, so a retried step finds its job again instead
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

IN_STEP, LOCAL, CLUSTER = "in-step", "torchrun", "cluster-job"
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# env of every rank, as in k8s/training/base
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
    step) or CLUSTER (a TrainJob or PyTorchJob of ``train_nodes`` x ``gpus_per_node``)."""
    for name, v in (("train_nodes", train_nodes), ("gpus_per_node", gpus_per_node),
                    ("train_processes", train_processes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r}: must be an integer >= 1")
    job = train_nodes > 1 or gpus_per_node > 1
    if job and train_processes > 1:
        raise ValueError(f"train_processes={train_processes} runs processes inside the step; with train_nodes="
                         f"{train_nodes}, gpus_per_node={gpus_per_node} the cluster job runs one process per GPU: "
                         "set one or the other")
    if job:
        if not (in_cluster() if cluster is None else cluster):
            raise ValueError(f"train_nodes={train_nodes}, gpus_per_node={gpus_per_node} launch a cluster training job, which "
                             "needs a Kubernetes cluster with Kubeflow Trainer (this step is not running in one); on this machine use train_processes=N")
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


# ---- the cluster branch: a TrainJob (Trainer v2) or a PyTorchJob (Training Operator v1) -------

@dataclass(frozen=True)
class Engine:
    """One kind of cluster training job: its API, where its node 0 logs, what success is called."""
    kind: str
    group: str
    version: str
    plural: str
    container: str  # the container the operator runs training in (it finds it by this name)
    node0: str      # label selector of node 0's pod, formatted with the job's name
    done: str       # the condition type that means success

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


ENGINES = {
    # Trainer v2: the TrainJob becomes a JobSet; the torch runtime's ReplicatedJob "node" is one indexed Job
    # of numNodes pods, container "node"; node 0 is completion index 0 (it also hosts the rendezvous)
    "trainjob": Engine("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "node",
                       "jobset.sigs.k8s.io/jobset-name={name},jobset.sigs.k8s.io/replicatedjob-name=node,"
                       "batch.kubernetes.io/job-completion-index=0", "Complete"),
    "pytorchjob": Engine("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "pytorch",
                         "training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master",
                         "Succeeded"),
}
DEFAULT_ENGINE = "trainjob"
# Trainer's stock ClusterTrainingRuntime that runs `torchrun` on every node with PET_NNODES, PET_NODE_RANK,
# PET_NPROC_PER_NODE, PET_MASTER_ADDR/PORT set (why not deepspeed-distributed: k8s/README.md)
RUNTIME = "torch-distributed"
PATCH_MANAGER = "motioncharacter.io/launcher"  # owner of the TrainJob's runtime patch (the pod settings)


def engine(name: str) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"train_engine={name!r}: must be one of {', '.join(ENGINES)} (trainjob: Kubeflow "
                         "Trainer v2; pytorchjob: the Training Operator v1)")
    return ENGINES[name]


def engine_of(manifest: dict) -> Engine:
    for e in ENGINES.values():
        if (manifest.get("apiVersion"), manifest.get("kind")) == (e.api_version, e.kind):
            return e
    raise ValueError(f"{manifest.get('apiVersion')}/{manifest.get('kind')} is not a training job this launcher "
                     f"knows ({', '.join(e.kind for e in ENGINES.values())})")


def job_name(output_uri: str) -> str:
    """Stable per output: a retried step reattaches to its job (DNS-1035, the operators' Services use it)."""
    return "mc-train-" + hashlib.sha256(output_uri.encode()).hexdigest()[:12]


@dataclass
class JobSpec:
    name: str
    namespace: str
    image: str
    train_args: list[str]           # after ``motioncharacter``: ["train", "--data=...", ...]
    nodes: int = 1
    gpus_per_node: int = 1
    engine: str = DEFAULT_ENGINE
    runtime: str = RUNTIME          # the TrainJob's ClusterTrainingRuntime
    s3_secret: str = "s3-pipeline"
    mlflow_secret: str = "mlflow-client"  # MLFLOW_TRACKING_USERNAME / _PASSWORD (MLflow's basic-auth user); "" none
    endpoints: str = "motioncharacter-endpoints"
    backoff_limit: int = 3
    cpu_per_gpu: int = 4
    memory_per_gpu_gi: int = 48


LABELS = {"app.kubernetes.io/name": "motioncharacter-train", "app.kubernetes.io/part-of": "motioncharacter"}
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
GPU_NODES = {"nodeSelector": {"nvidia.com/gpu.present": "true"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
MOUNTS = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
VOLUMES = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},  # NCCL, loader workers
           {"name": "tmp", "emptyDir": {"sizeLimit": "64Gi"}}]  # checkpoint staging, the download cache


def _env(spec: JobSpec) -> list[dict]:
    env = [{"name": k, "value": v} for k, v in RANK_ENV.items()]
    env += [{"name": k, "valueFrom": {"configMapKeyRef": {"name": spec.endpoints, "key": k}}} for k in ENDPOINT_KEYS]
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": k}}}
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    if spec.mlflow_secret:
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": spec.mlflow_secret, "key": k}}}
                for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")]
    return env


def _resources(spec: JobSpec) -> dict:
    g = spec.gpus_per_node
    return {"requests": {"cpu": str(spec.cpu_per_gpu * g), "memory": f"{spec.memory_per_gpu_gi * g}Gi",
                         "nvidia.com/gpu": g},
            "limits": {"memory": f"{2 * spec.memory_per_gpu_gi * g}Gi", "nvidia.com/gpu": g}}


def _command(spec: JobSpec) -> tuple[list[str], list[str]]:
    # torchrun reads PET_NNODES, PET_NODE_RANK, ... set by either operator
    return ["torchrun"], ["--no-python", "motioncharacter", *spec.train_args]


def _pod_template(spec: JobSpec) -> dict:
    command, args = _command(spec)
    return {
        "metadata": {"labels": {**LABELS, "app.kubernetes.io/component": "training"}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 300,  # SIGTERM saves a checkpoint: time to upload it
            "securityContext": POD_SECURITY, **GPU_NODES,
            "containers": [{
                "name": ENGINES["pytorchjob"].container, "image": spec.image, "command": command, "args": args,
                "env": _env(spec), "ports": [{"name": "pytorchjob-port", "containerPort": 23456}],
                "resources": _resources(spec), "securityContext": CONTAINER_SECURITY, "volumeMounts": MOUNTS}],
            "volumes": VOLUMES,
        },
    }


def pytorchjob_manifest(spec: JobSpec) -> dict:
    """The PyTorchJob: one Master and ``nodes - 1`` Workers, ``gpus_per_node`` processes (and GPUs) each."""
    replica = {"restartPolicy": "OnFailure", "template": _pod_template(spec)}
    replicas = {"Master": {"replicas": 1, **replica}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, **replica}
    e = ENGINES["pytorchjob"]
    return {
        "apiVersion": e.api_version, "kind": e.kind,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(LABELS)},
        "spec": {"nprocPerNode": str(spec.gpus_per_node),
                 # pods stay until the job is deleted, so a failure's logs can still be read
                 "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": spec.backoff_limit},
                 "pytorchReplicaSpecs": replicas},
    }


def trainjob_manifest(spec: JobSpec) -> dict:
    """The TrainJob: ``nodes`` nodes of ``gpus_per_node`` processes (and GPUs) on the ``torch-distributed``
    runtime, our image and command; the pod settings the runtime lacks go in as a runtime patch (the
    fields Trainer lets a TrainJob patch: security contexts, GPU node placement, volumes and mounts)."""
    e = ENGINES["trainjob"]
    command, args = _command(spec)
    pod = {"securityContext": POD_SECURITY, **GPU_NODES, "volumes": VOLUMES,
           "containers": [{"name": e.container, "securityContext": CONTAINER_SECURITY, "volumeMounts": MOUNTS}]}
    node = {"name": "node", "template": {"spec": {"template": {
        "metadata": {"labels": {**LABELS, "app.kubernetes.io/component": "training"}}, "spec": pod}}}}
    return {
        "apiVersion": e.api_version, "kind": e.kind,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": dict(LABELS)},
        "spec": {
            "runtimeRef": {"apiGroup": e.group, "kind": "ClusterTrainingRuntime", "name": spec.runtime},
            "trainer": {"image": spec.image, "command": command, "args": args, "env": _env(spec),
                        "numNodes": spec.nodes, "numProcPerNode": spec.gpus_per_node,
                        "resourcesPerNode": _resources(spec)},
            "runtimePatches": [{"manager": PATCH_MANAGER,
                                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}}}],
        },
    }


def job_manifest(spec: JobSpec) -> dict:
    """The cluster job for ``spec.engine``."""
    engine(spec.engine)  # a clear error for an unknown one
    return {"trainjob": trainjob_manifest, "pytorchjob": pytorchjob_manifest}[spec.engine](spec)


def job_state(job: dict) -> tuple[str, str]:
    """(state, why) from a TrainJob's or PyTorchJob's status: "Succeeded" (a PyTorchJob's Succeeded,
    a TrainJob's Complete) or "Failed" once either is true, else the newest true condition (Created,
    Running, Restarting, Suspended), "Running" for a TrainJob whose jobs have active pods, and
    "Pending" before the operator reports anything."""
    status = job.get("status") or {}
    conds = [c for c in status.get("conditions") or [] if c.get("status") == "True"]
    why = lambda c: ": ".join(x for x in (c.get("reason"), c.get("message")) if x)  # noqa: E731
    for final, state in (("Failed", "Failed"), ("Succeeded", "Succeeded"), ("Complete", "Succeeded")):
        for c in conds:  # a final condition wins over a stale Running
            if c.get("type") == final:
                return state, why(c)
    if conds:
        return conds[-1].get("type", "Unknown"), why(conds[-1])
    active = sum(j.get("active") or 0 for j in status.get("jobsStatus") or [])
    if active:
        return "Running", f"{active} node(s) active"
    return "Pending", "no status from the training operator yet"


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


def _stream_node0_log(core, namespace: str, name: str, e: Engine, out, stop: threading.Event) -> None:
    """Follow node 0's (the master's) log into ``out`` once it runs (ended by the pod, or by ``stop``)."""
    try:
        while not stop.is_set():
            pods = core.list_namespaced_pod(namespace, label_selector=e.node0.format(name=name)).items
            running = [p for p in pods if p.status.phase in ("Running", "Succeeded", "Failed")]
            if running:
                resp = core.read_namespaced_pod_log(running[0].metadata.name, namespace, container=e.container,
                                                    follow=True, _preload_content=False)
                for chunk in resp.stream():
                    out.write(chunk.decode(errors="replace"))
                    if stop.is_set():
                        break
                return
            stop.wait(5)
    except Exception as ex:  # noqa: BLE001 - the log is a convenience: the job's status decides the step
        out.write(f"(no more log from node 0 of {name}: {type(ex).__name__}: {ex})\n")


def launch_job(manifest: dict, keep: bool = False, poll_s: float = 10.0, timeout_s: float | None = None,
               out=None, apis=None) -> str:
    """Create (or find again) the TrainJob or PyTorchJob, report each state change and node 0's log,
    wait for it to end; JobFailed with the job's reason. Deletes the job afterwards unless ``keep``.
    ``apis``: (CustomObjectsApi, CoreV1Api); by default from the pod's service account or kubeconfig."""
    from kubernetes.client.exceptions import ApiException

    out = out or sys.stdout
    e = engine_of(manifest)
    custom, core = apis or _apis()
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    what = f"{e.kind} {ns}/{name}"
    api = (e.group, e.version, ns, e.plural)
    try:
        custom.create_namespaced_custom_object(*api, manifest)
        out.write(f"created {what}\n")
    except ApiException as ex:
        if ex.status != 409:
            raise
        state, _ = job_state(custom.get_namespaced_custom_object(*api, name))
        if state == "Failed":  # an earlier try's job: start over (training resumes from its checkpoint)
            _delete(custom, api, name, wait=True, poll_s=poll_s)
            custom.create_namespaced_custom_object(*api, manifest)
            out.write(f"re-created {what} (the previous one had failed)\n")
        else:
            out.write(f"{what} exists ({state}): following it\n")
    stop = threading.Event()
    logs = threading.Thread(target=_stream_node0_log, args=(core, ns, name, e, out, stop), daemon=True)
    logs.start()
    t0, last = time.monotonic(), None
    try:
        while True:
            state, why = job_state(custom.get_namespaced_custom_object(*api, name))
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
            out.write(f"kept {what} (delete it with: kubectl delete {e.plural}.{e.group} -n {ns} {name})\n")
        else:
            _delete(custom, api, name)
            out.write(f"deleted {what}\n")


def _delete(custom, api: tuple, name: str, wait: bool = False, poll_s: float = 2.0) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom.delete_namespaced_custom_object(*api, name, propagation_policy="Foreground")
    except ApiException as ex:
        if ex.status != 404:
            raise
    while wait:
        try:
            custom.get_namespaced_custom_object(*api, name)
        except ApiException as ex:
            if ex.status == 404:
                return
            raise
        time.sleep(poll_s)
