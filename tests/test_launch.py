"""Where the pipeline's training runs (pipelines/launch.py): which branch the parameters choose,
the PyTorchJob the cluster branch would create (no cluster here: its offline validation is in
test_k8s.py), how a job's conditions are read, the compiled pipeline's wiring of the launch and
shard parameters, and the local branch for real: two processes under torchrun on CPU (gloo)."""
from __future__ import annotations

import io
import re

import pytest
import yaml
from train_fixtures import FAST, prepared, train_env

from motioncharacter import storage
from motioncharacter.pipelines import launch, pipeline
from motioncharacter.pipelines.pipeline import ENDPOINTS, GPU_IMAGE, S3_SECRET
from motioncharacter.pipelines.steps import train_args, train_job_spec, train_step

MANIFEST, OUT = "s3://pipelines/motioncharacter/run/prepared/manifest.jsonl", "s3://pipelines/motioncharacter/run/train/full"


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
        mlflow_secret = getattr(pipeline, "MLFLOW_SECRET", "")  # the steps' MLflow login, where there is one
        assert not mlflow_secret or env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == mlflow_secret
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
