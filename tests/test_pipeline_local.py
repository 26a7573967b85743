"""The whole pipeline run locally (kfp.local SubprocessRunner) on the tiny preset against the real
local S3 and MLflow servers: artifacts land in the object store, runs in MLflow, and a video comes
back from a real Triton server started on the deployed model repository."""
from __future__ import annotations

import pytest

from motioncharacter import storage


@pytest.mark.services
@pytest.mark.slow
def test_local_pipeline_run(stack, tmp_path, capsys):
    import mlflow

    from motioncharacter.pipelines.run import run_local

    work = f"s3://{stack.bucket}/pipeline-test"
    repo = f"s3://{stack.bucket}/pipeline-test/model_repository"
    run_local({"work_uri": work, "model_repository": repo, "train_steps": 2, "eval_limit": 2,
               "ablations": ["no_region_aware"]}, str(tmp_path / "kfp"), log_dir=str(tmp_path / "logs"))
    # a console a person can read: one line per step start and end; the executor's detail in logs
    console = capsys.readouterr().out.splitlines()
    assert "[prepare] running ..." in console and any(x.startswith("[train-2] done in ") for x in console)
    assert len(console) <= 30 and not any("executor_input" in x for x in console), console
    assert "executor_input" in (tmp_path / "logs" / "train.log").read_text()

    for rel in ("prepared/manifest.jsonl", "prepared/contact_sheet.png",
                "train/full/adapter/diffusion_pytorch_model.safetensors",
                "train/no_region_aware/adapter/diffusion_pytorch_model.safetensors",
                "train/full/weights/unet/config.json", "eval/full/summary.json",
                "eval/no_region_aware/summary.json", "smoke/smoke.mp4"):
        assert storage.exists(f"{work}/{rel}"), rel
    assert storage.exists(f"{repo}/motioncharacter/config.pbtxt")
    assert len(storage.read_bytes(f"{work}/smoke/smoke.mp4")) > 1000

    client = mlflow.MlflowClient()
    train_runs = client.search_runs([client.get_experiment_by_name("motioncharacter-train").experiment_id])
    assert {r.data.tags.get("ablation") for r in train_runs} >= {"full", "no_region_aware"}
    eval_runs = client.search_runs([client.get_experiment_by_name("motioncharacter-eval").experiment_id])
    assert {r.info.run_name for r in eval_runs} >= {"evaluate-full", "evaluate-no_region_aware"}
    assert client.get_experiment_by_name("motioncharacter-data") is not None
