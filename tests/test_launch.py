"""Where the pipeline's training runs (pipelines/launch.py): which branch the parameters choose,
the TrainJob (Trainer v2) and PyTorchJob (Training Operator v1) the cluster branch creates, each
validated against the CRD its project publishes (k8s/crds), how a job's conditions are read,
launch_job against a fake Kubernetes API (the one test double here: no cluster can run on this
machine), the compiled pipeline's wiring of the launch and shard parameters, and the local branch
for real: two processes under torchrun on CPU (gloo)."""
from __future__ import annotations

import copy
import importlib.util
import io
import re
import threading
from pathlib import Path

import pytest
import yaml
from train_fixtures import FAST, prepared, train_env

from motioncharacter import storage
from motioncharacter.pipelines import launch, pipeline
from motioncharacter.pipelines.pipeline import ENDPOINTS, GPU_IMAGE, MLFLOW_SECRET, S3_SECRET
from motioncharacter.pipelines.steps import train_args, train_job_spec, train_step

MANIFEST, OUT = "s3://pipelines/motioncharacter/run/prepared/manifest.jsonl", "s3://pipelines/motioncharacter/run/train/full"
_spec = importlib.util.spec_from_file_location("k8s_validate", Path(__file__).resolve().parents[1] / "k8s" / "validate.py")
kv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kv)


@pytest.mark.parametrize("nodes, gpus, procs, cluster, want", [
    (1, 1, 1, False, launch.IN_STEP),   # today's path
    (1, 1, 1, True, launch.IN_STEP),    # on a cluster too: one GPU needs no job
    (1, 1, 2, False, launch.LOCAL),     # `pipeline run --local --param train_processes=2`
    (1, 1, 3, True, launch.LOCAL),      # processes in the step's own pod
    (2, 1, 1, True, launch.CLUSTER),
    (1, 8, 1, True, launch.CLUSTER),
    (4, 8, 1, True, launch.CLUSTER),
])
def test_plan_picks_the_branch(nodes, gpus, procs, cluster, want):
    assert launch.plan(nodes, gpus, procs, cluster=cluster) == want


def test_plan_refuses_what_cannot_run_and_names_it(monkeypatch):
    with pytest.raises(ValueError, match="needs a Kubernetes cluster .* use train_processes"):
        launch.plan(2, 1, 1, cluster=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # off-cluster by default here
    with pytest.raises(ValueError, match="needs a Kubernetes cluster"):
        launch.plan(1, 2, 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # what a pod sees
    assert launch.plan(1, 2, 1) == launch.CLUSTER
    with pytest.raises(ValueError, match="train_processes=2 .* set one or the other"):
        launch.plan(2, 1, 2, cluster=True)
    for bad in ({"train_nodes": 0}, {"gpus_per_node": "2"}, {"train_processes": True}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            launch.plan(**bad, cluster=True)


def test_torchrun_command_and_environment():
    cmd = launch.torchrun_command(2, ["train", "--data", "m.jsonl"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6:] == ["-m", "motioncharacter.cli", "train", "--data", "m.jsonl"]
    env = launch.torchrun_env({"RANK": "3", "WORLD_SIZE": "8", "MASTER_PORT": "1", "KEEP": "x"})
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(env) and env["KEEP"] == "x"
    assert env["DS_ACCELERATOR"] == "cpu" and env["OMP_NUM_THREADS"] == "1"  # no GPU here: gloo


def test_pytorchjob_manifest_for_the_pipeline_parameters():
    args = train_args(MANIFEST, OUT, "", "s3://models/sd15-animatediff", 12000, "no_id_loss", ["train.lr=1e-5"])
    job = launch.pytorchjob_manifest(train_job_spec(args, OUT, MANIFEST, nodes=3, gpus_per_node=8, image="",
                                                    namespace="team-a"))
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert name == launch.job_name(OUT) != launch.job_name(OUT + "x")  # a retried step finds its job
    assert job["metadata"]["namespace"] == "team-a"
    assert job["spec"]["nprocPerNode"] == "8"  # one process per GPU
    reps = job["spec"]["pytorchReplicaSpecs"]
    assert (reps["Master"]["replicas"], reps["Worker"]["replicas"]) == (1, 2)  # 3 nodes
    for r in reps.values():
        spec = r["template"]["spec"]
        (c,) = spec["containers"]
        assert c["name"] == "pytorch" and c["image"] == GPU_IMAGE
        assert c["command"] == ["torchrun"]
        assert c["args"] == ["--no-python", "motioncharacter", "train", "--data", MANIFEST, "--output", OUT,
                             "--steps", "12000", "--resume", "--set", "ablation=no_id_loss", "--weights",
                             "s3://models/sd15-animatediff", "--set", "loss.id_loss=false", "--set", "train.lr=1e-5"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 8
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": S3_SECRET,
                                                                             "key": "AWS_SECRET_ACCESS_KEY"}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == ENDPOINTS
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == MLFLOW_SECRET
        assert len(env) == len(c["env"]), "a variable is set twice"
        assert env["NCCL_DEBUG"]["value"] == "WARN" and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in env
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    one = launch.pytorchjob_manifest(train_job_spec(args, OUT, MANIFEST, nodes=1, gpus_per_node=4, image="img:1",
                                                    namespace="ns"))
    assert set(one["spec"]["pytorchReplicaSpecs"]) == {"Master"} and one["spec"]["nprocPerNode"] == "4"
    assert one["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] == "img:1"
    with pytest.raises(ValueError, match="'outputs/pipeline/prepared/manifest.jsonl' is a local path"):
        train_job_spec(args, OUT, "outputs/pipeline/prepared/manifest.jsonl", 2, 1, "")


def cond(kind, status="True", reason="", message=""):
    return {"type": kind, "status": status, "reason": reason, "message": message}


def test_job_state_reads_the_operator_conditions():
    assert launch.job_state({})[0] == "Pending"
    assert launch.job_state({"status": {"conditions": [cond("Created", reason="PyTorchJobCreated")]}}) == (
        "Created", "PyTorchJobCreated")
    running = [cond("Created", "False"), cond("Running", reason="PyTorchJobRunning", message="job is running")]
    assert launch.job_state({"status": {"conditions": running}}) == ("Running", "PyTorchJobRunning: job is running")
    failed = running[:1] + [cond("Running", "False"), cond("Failed", reason="PyTorchJobFailed",
                                                           message="master-0 exited with code 1")]
    assert launch.job_state({"status": {"conditions": failed}}) == (
        "Failed", "PyTorchJobFailed: master-0 exited with code 1")
    # a final condition wins even when a stale Running is still listed as true after it
    done = [cond("Succeeded", reason="PyTorchJobSucceeded"), cond("Running")]
    assert launch.job_state({"status": {"conditions": done}})[0] == "Succeeded"


def test_compiled_pipeline_wires_shards_and_launch_parameters(tmp_path):
    from motioncharacter.pipelines.run import compile_pipeline

    spec = next(yaml.safe_load_all(open(compile_pipeline(str(tmp_path / "p.yaml")))))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["prepare_shards"]["defaultValue"] == 1 and params["train_processes"]["defaultValue"] == 1
    assert params["train_image"]["defaultValue"] == GPU_IMAGE and params["keep_train_job"]["defaultValue"] is False
    tasks = spec["root"]["dag"]["tasks"]
    shards = tasks["for-loop-1"]
    assert shards["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--shard-plan-Output"
    assert "prepare-shard" in spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert tasks["prepare"]["dependentTasks"] == ["for-loop-1"]  # the merge waits for every shard
    loop_train = spec["components"]["comp-for-loop-3"]["dag"]["tasks"]["train-2"]["inputs"]["parameters"]
    for t in (tasks["train"]["inputs"]["parameters"], loop_train):  # main run and every ablation
        for p in ("train_nodes", "gpus_per_node", "train_processes", "keep_train_job"):
            assert t[p]["componentInputParameter"].endswith(p), p
        assert t["image"]["componentInputParameter"].endswith("train_image")
        assert t["train_engine"]["componentInputParameter"].endswith("train_engine")
    assert params["train_engine"]["defaultValue"] == "trainjob"


# ---- the local branch, for real ---------------------------------------------------------------

@pytest.mark.slow
def test_two_training_processes_under_torchrun(tmp_path_factory, tmp_path, monkeypatch):
    """train_step with train_processes=2: two ranks (gloo, DeepSpeed CPU) train, checkpoint as a
    world of 2 and the step returns assembled weights, as the in-step branch does."""
    from motioncharacter.components.train import checkpoint as ck

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for k, v in train_env(tmp_path).items():  # the training tests' DeepSpeed op cache (its build takes a minute)
        if k in ("TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS"):
            monkeypatch.setenv(k, v)
    manifest = str(prepared(tmp_path_factory) / "manifest.jsonl")
    out = str(tmp_path / "train" / "no_region_aware")
    weights = train_step(manifest, out, "tiny", "", 2, "no_region_aware", FAST, train_processes=2)
    assert weights == storage.join(out, "weights")
    assert storage.exists(storage.join(weights, "adapter", "diffusion_pytorch_model.safetensors"))
    assert storage.exists(storage.join(weights, "unet", "config.json"))
    state = ck.state(out, ck.latest(out))
    assert state["world_size"] == 2 and state["step"] == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")  # where the ranks logged
    (run,) = client.search_runs([client.get_experiment_by_name("motioncharacter-train").experiment_id])
    assert run.data.tags.get("ablation") == "no_region_aware"
    assert run.data.params.get("loss.region_aware") in ("False", "false")


def test_failed_processes_fail_the_step_with_their_output(tmp_path):
    buf = io.StringIO()
    with pytest.raises(launch.JobFailed, match=r"torchrun of 1 training process\(es\) exited with status \d+; "
                                               r"errors:\nmotioncharacter train: error: the following arguments "
                                               r"are required: --data, --output\nlast lines:"):
        launch.run_torchrun(1, ["train"], out=buf)
    assert "usage: motioncharacter train" in buf.getvalue()  # the ranks' output reached the step's log


# ---- the cluster branch: TrainJob (Trainer v2) and PyTorchJob, against the published CRDs ------

def _job(engine, nodes=2, gpus=8, image=""):
    args = train_args(MANIFEST, OUT, "", "s3://models/sd15-animatediff", 100, "full", [])
    return launch.job_manifest(train_job_spec(args, OUT, MANIFEST, nodes, gpus, image, namespace="team-a",
                                              engine=engine))


def test_trainjob_for_two_nodes_of_eight_gpus_validates_against_trainer_v2s_crd():
    job = _job("trainjob")
    assert kv.check_custom(job) == []  # Trainer v2.2.0's own CRD schema (k8s/crds)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["metadata"]["name"] == launch.job_name(OUT)  # a retried step finds its job
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    t = spec["trainer"]
    assert (t["numNodes"], t["numProcPerNode"]) == (2, 8) and t["image"] == GPU_IMAGE
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == t["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == 8
    assert t["command"] == ["torchrun"] and t["args"][:3] == ["--no-python", "motioncharacter", "train"]
    env = {e["name"]: e for e in t["env"]}
    assert len(env) == len(t["env"]), "a variable is set twice"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == S3_SECRET
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == MLFLOW_SECRET
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == ENDPOINTS
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the torch-distributed runtime's ReplicatedJob
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (c,) = pod["containers"]
    assert c["name"] == "node" and c["securityContext"]["readOnlyRootFilesystem"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # the CRD catches what the operator would refuse
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numProcPerNode"] = "8"
    bad["spec"]["trainer"]["nodes"] = 2
    problems = kv.check_custom(bad)
    assert any("numProcPerNode" in p for p in problems) and any("'nodes' was unexpected" in p for p in problems)


def test_pytorchjob_for_two_nodes_of_eight_gpus_validates_against_the_training_operators_crd():
    job = _job("pytorchjob")
    assert kv.check_custom(job) == []  # the Training Operator v1.9.4's CRD schema
    assert job["kind"] == "PyTorchJob" and job["spec"]["nprocPerNode"] == "8"
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "1"
    bad["spec"]["nprocPerNode"] = 8  # the operator's field is a string
    problems = kv.check_custom(bad)
    assert any("Worker.replicas" in p for p in problems) and any("nprocPerNode" in p for p in problems)


def test_engine_names_are_checked():
    with pytest.raises(ValueError, match="train_engine='trainjobs': must be one of trainjob, pytorchjob"):
        _job("trainjobs")
    with pytest.raises(ValueError, match="train_engine='mpijob'"):
        train_step(MANIFEST, OUT, "tiny", "", 1, "full", [], train_engine="mpijob")


def test_job_state_reads_trainjob_conditions():
    assert launch.job_state({"status": {}}) == ("Pending", "no status from the training operator yet")
    assert launch.job_state({"status": {"jobsStatus": [{"name": "node", "active": 2}]}}) == (
        "Running", "2 node(s) active")
    assert launch.job_state({"status": {"conditions": [cond("Complete", reason="JobSetCompleted")]}}) == (
        "Succeeded", "JobSetCompleted")
    assert launch.job_state({"status": {"conditions": [
        cond("Suspended", "False"), cond("Failed", reason="DeadlineExceeded", message="past activeDeadlineSeconds")]}}) == (
        "Failed", "DeadlineExceeded: past activeDeadlineSeconds")
    assert launch.job_state({"status": {"conditions": [cond("Suspended", reason="Suspended")]}})[0] == "Suspended"


class FakeCluster:
    """A stand-in for the Kubernetes API server (no cluster can run on this machine): custom objects
    kept in a dict, each job's status advanced through ``statuses`` on every read, node 0's pod found
    by the engine's label selector."""

    def __init__(self, statuses, existing=None, log=b"step 1 loss 0.5\n"):
        self.objects = dict(existing or {})
        self.statuses, self.log = list(statuses), log
        self.calls: list[tuple] = []
        self.selectors: list[str] = []
        self.lock = threading.Lock()

    def _api_error(self, status):
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=status, reason={404: "Not Found", 409: "AlreadyExists"}[status])

    # CustomObjectsApi
    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        self.calls.append(("create", group, version, plural, body["metadata"]["name"]))
        key = (plural, ns, body["metadata"]["name"])
        if key in self.objects:
            raise self._api_error(409)
        self.objects[key] = copy.deepcopy(body)

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        key = (plural, ns, name)
        if key not in self.objects:
            raise self._api_error(404)
        with self.lock:
            if self.statuses:
                self.objects[key]["status"] = self.statuses.pop(0)
        return copy.deepcopy(self.objects[key])

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy=None):
        self.calls.append(("delete", group, version, plural, name))
        if self.objects.pop((plural, ns, name), None) is None:
            raise self._api_error(404)

    # CoreV1Api
    def list_namespaced_pod(self, ns, label_selector):
        from types import SimpleNamespace as NS

        self.selectors.append(label_selector)
        pod = NS(metadata=NS(name="node-0"), status=NS(phase="Running"))
        return NS(items=[pod])

    def read_namespaced_pod_log(self, name, ns, container, follow, _preload_content):
        from types import SimpleNamespace as NS

        self.calls.append(("log", name, container))
        return NS(stream=lambda: iter([self.log]))


RUNNING = {"trainjob": {"jobsStatus": [{"name": "node", "active": 2}]},
           "pytorchjob": {"conditions": [cond("Running", reason="PyTorchJobRunning")]}}
DONE = {"trainjob": {"conditions": [cond("Complete", reason="JobSetCompleted")]},
        "pytorchjob": {"conditions": [cond("Succeeded", reason="PyTorchJobSucceeded")]}}
FAILED = {"trainjob": {"conditions": [cond("Failed", reason="FailedJobs", message="node-0 exited with code 1")]},
          "pytorchjob": {"conditions": [cond("Failed", reason="PyTorchJobFailed", message="master-0 exited with code 1")]}}
ENGINES = ["trainjob", "pytorchjob"]


def _run(job, fake, **kw):
    buf = io.StringIO()
    kw = {"poll_s": 0, **kw}
    try:
        return launch.launch_job(job, apis=(fake, fake), out=buf, **kw), buf.getvalue()
    except launch.JobFailed as e:
        e.log = buf.getvalue()
        raise


@pytest.mark.parametrize("engine", ENGINES)
def test_launch_creates_follows_to_success_streams_node0_and_deletes(engine):
    job, e = _job(engine), launch.ENGINES[engine]
    fake = FakeCluster([{}, RUNNING[engine], RUNNING[engine], DONE[engine]])
    name, log = _run(job, fake)
    assert name == job["metadata"]["name"]
    assert fake.calls[0] == ("create", e.group, e.version, e.plural, name)
    assert ("delete", e.group, e.version, e.plural, name) in fake.calls and not fake.objects  # not kept
    assert f"{e.kind} team-a/{name}: Pending" in log and f"{e.kind} team-a/{name}: Running" in log
    assert f"{e.kind} team-a/{name}: Succeeded" in log and f"deleted {e.kind} team-a/{name}" in log
    # node 0's log reached the step's, read from the operator's container on node 0's pod
    assert "step 1 loss 0.5" in log and ("log", "node-0", e.container) in fake.calls
    assert fake.selectors[0] == e.node0.format(name=name)
    if engine == "trainjob":
        assert "batch.kubernetes.io/job-completion-index=0" in fake.selectors[0]
        assert f"jobset.sigs.k8s.io/jobset-name={name}" in fake.selectors[0]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_retried_step_follows_its_running_job_instead_of_creating_a_second(engine):
    job, e = _job(engine), launch.ENGINES[engine]
    key = (e.plural, "team-a", job["metadata"]["name"])
    fake = FakeCluster([RUNNING[engine], RUNNING[engine], DONE[engine]], existing={key: copy.deepcopy(job)})
    _, log = _run(job, fake, keep=True)
    assert [c[0] for c in fake.calls].count("create") == 1  # the 409, then no second job
    assert "exists (Running): following it" in log
    assert key in fake.objects and f"kept {e.kind}" in log and f"kubectl delete {e.plural}.{e.group}" in log


@pytest.mark.parametrize("engine", ENGINES)
def test_a_retried_step_replaces_its_failed_job(engine):
    job, e = _job(engine), launch.ENGINES[engine]
    key = (e.plural, "team-a", job["metadata"]["name"])
    fake = FakeCluster([FAILED[engine], RUNNING[engine], DONE[engine]], existing={key: copy.deepcopy(job)})
    _, log = _run(job, fake)
    kinds = [c[0] for c in fake.calls if c[0] != "log"]
    assert kinds[:3] == ["create", "delete", "create"]  # 409, delete the failed one, start again (it resumes)
    assert "re-created" in log and "the previous one had failed" in log


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failed_job_fails_the_step_with_its_reason(engine):
    job = _job(engine)
    fake = FakeCluster([RUNNING[engine], FAILED[engine]])
    reason = r"failed: (FailedJobs|PyTorchJobFailed): (node|master)-0 exited with code 1"
    with pytest.raises(launch.JobFailed, match=reason) as err:
        _run(job, fake)
    assert not fake.objects and "deleted" in err.value.log  # deleted unless asked to keep it
    fake = FakeCluster([FAILED[engine]])
    with pytest.raises(launch.JobFailed):
        _run(job, fake, keep=True)
    assert len(fake.objects) == 1  # kept: its pods' logs can still be read


@pytest.mark.parametrize("engine", ENGINES)
def test_a_job_that_does_not_finish_in_time_fails_the_step(engine):
    job = _job(engine)
    fake = FakeCluster([RUNNING[engine]] * 10_000)
    with pytest.raises(launch.JobFailed, match=r"still Running after \d+ s"):
        _run(job, fake, timeout_s=0.05, poll_s=0.01)
    assert not fake.objects


def test_launch_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="batch/v1/Job is not a training job"):
        launch.launch_job({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x", "namespace": "y"}},
                          apis=(None, None))
