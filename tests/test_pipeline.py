"""The Kubeflow pipeline: compiled IR (every component, the gate, the ablation loop, Kubernetes
settings), the evaluation gate, and the submit path up to the client call (no KFP runs here)."""
from __future__ import annotations

import pytest
import yaml

from motioncharacter.pipelines.cli import parse_params
from motioncharacter.pipelines.run import compile_pipeline
from motioncharacter.pipelines.steps import ABLATIONS, gate


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    compile_pipeline(str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_ir_has_every_component(ir):
    spec, _ = ir
    comps = set(spec["components"])
    for name in ("comp-prepare", "comp-train", "comp-evaluate", "comp-quality-gate", "comp-deploy", "comp-smoke-test"):
        assert name in comps
    tasks = spec["root"]["dag"]["tasks"]
    assert {"prepare", "train", "evaluate", "quality-gate", "condition-2", "for-loop-3"} <= set(tasks)
    assert "pipelinechannel--quality-gate-Output" in tasks["condition-2"]["triggerPolicy"]["condition"]
    loop = tasks["for-loop-3"]  # for-loop-1 is the prepare shards' (tests/test_launch.py)
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--ablations"
    # the ablation loop waits for the data, and no task output enters it (see pipeline.py)
    assert loop["dependentTasks"] == ["prepare"]
    assert all("taskOutputParameter" not in p for p in loop["inputs"]["parameters"].values())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/motioncharacter/motioncharacter:0.1.0", "ghcr.io/motioncharacter/motioncharacter:0.1.0-cuda"}


def test_ir_kubernetes_settings(ir):
    spec, platform = ir
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) >= 5
    for ex in executors.values():
        secrets = {s["secretName"]: {kv["secretKey"] for kv in s["keyToEnv"]} for s in ex["secretAsEnv"]}
        assert secrets == {"s3-pipeline": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                           "mlflow-client": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}}
        assert any(c["configMapName"] == "motioncharacter-endpoints" for c in ex["configMapAsEnv"])
    gpu = [e["container"] for n, e in spec["deploymentSpec"]["executors"].items()
           if "train" in n or "evaluate" in n]
    assert gpu and all(c["resources"]["accelerator"]["resourceCount"] == "1" for c in gpu)
    assert all(c["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu" for c in gpu)
    train_task = spec["root"]["dag"]["tasks"]["train"]
    assert train_task["retryPolicy"]["maxRetryCount"] == 3
    assert spec["root"]["dag"]["tasks"]["prepare"]["cachingOptions"]["enableCache"] is True


def test_gate():
    assert gate({"face_sim_sface": {"value": 0.5}}, {"face_sim_sface": 0.4}) == (True, "all thresholds met")
    ok, why = gate({"face_sim_sface": {"value": 0.3}}, {"face_sim_sface": 0.4})
    assert not ok and "0.300 < 0.4" in why
    ok, why = gate({"clip_t": {"value": None, "reason": "no CLIP weights"}}, {"clip_t": 0.2})
    assert not ok and "clip_t not computed" in why
    assert gate({"intensity_mae": 3.0}, {"intensity_mae": {"max": 2.0}}) == (False, "intensity_mae 3.000 > 2.0")
    assert gate({"intensity_mae": 1.0}, {"intensity_mae": {"min": 0.5, "max": 2.0}})[0]


def test_ablation_switches_are_real_training_settings():
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import load

    for name, overrides in ABLATIONS.items():
        cfg = load(TrainConfig, "train.yaml", overrides=overrides)
        assert (cfg.loss.region_aware, cfg.loss.id_loss, cfg.model.motion_control).count(False) == len(overrides)


def test_params_parse():
    assert parse_params(["train_steps=8", 'ablations=["no_id_loss"]', "work_uri=s3://b/x"]) == {
        "train_steps": 8, "ablations": ["no_id_loss"], "work_uri": "s3://b/x"}
    with pytest.raises(ValueError):
        parse_params(["nonsense"])


def test_submit_reaches_the_client_call():
    """No KFP API runs here: submitting to a closed port must fail at the HTTP call, with the host named."""
    from motioncharacter.cli import UserError, main
    from motioncharacter.faults import is_transient
    from motioncharacter.pipelines.run import submit

    with pytest.raises(UserError, match=r"cannot reach Kubeflow Pipelines at http://127\.0\.0\.1:9: ") as e:
        submit("http://127.0.0.1:9", {"train_steps": 1})
    assert is_transient(e.value.__cause__)  # the HTTP client's connection failure, kept as the cause
    assert main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--param", "train_steps=1"]) == 1
