"""Compile, run locally (kfp.local) and submit the pipeline."""
from __future__ import annotations

import os
from pathlib import Path

LOCAL_DEFAULTS = {"work_uri": "outputs/pipeline", "model_repository": "outputs/pipeline/model_repository"}


def compile_pipeline(path: str = "pipeline.yaml") -> str:
    from kfp import compiler

    from .pipeline import motioncharacter_pipeline

    compiler.Compiler().compile(motioncharacter_pipeline, package_path=path)
    return path


def local_defaults() -> dict:
    """Where a local run writes: into the running stack's bucket when there is one, else ./outputs."""
    if os.environ.get("MOTIONCHARACTER_S3_ENDPOINT"):
        bucket = os.environ.get("MOTIONCHARACTER_BUCKET", "motioncharacter")
        return {"work_uri": f"s3://{bucket}/pipeline", "model_repository": f"s3://{bucket}/model_repository"}
    return {k: str(Path(v).resolve()) for k, v in LOCAL_DEFAULTS.items()}


class StepFailed(RuntimeError):
    """A pipeline step failed (after its retries); names the step and the log to read."""


def run_local(params: dict, pipeline_root: str = "outputs/kfp", log_dir: str | None = None,
              containers: bool = False) -> dict:
    """Run every step in subprocesses of this Python (no containers), like a cluster run; with
    ``containers``, every step in the project's image through kfp's DockerRunner and the smoke test
    against the CPU Triton image (pipelines/containers.py).

    With ``log_dir``, the console gets one line per step and kfp's detail goes to
    ``log_dir/pipeline.log`` and ``log_dir/<step>.log``; a failed step raises StepFailed naming its log."""
    import contextlib

    from kfp import local

    from .pipeline import motioncharacter_pipeline

    root = str(Path(pipeline_root).resolve())
    args = {**local_defaults(), **params}
    with contextlib.ExitStack() as stack:
        if containers:
            from motioncharacter.images import TRITON_CPU_IMAGE

            from .containers import container_run

            runner = stack.enter_context(container_run(args, root, TRITON_CPU_IMAGE))
        else:
            runner = local.SubprocessRunner(use_venv=False)
        local.init(runner=runner, pipeline_root=root, raise_on_error=True)
        task = _run_pipeline(motioncharacter_pipeline, args, log_dir)
    return {"state": "SUCCEEDED", "params": args, "outputs": getattr(task, "outputs", None) and dict(task.outputs)}


def _run_pipeline(pipeline, args: dict, log_dir: str | None):
    import contextlib

    from .local_console import step_console

    with (step_console(log_dir) if log_dir else contextlib.nullcontext()) as console:
        try:
            return pipeline(**args)
        except RuntimeError as e:
            if console is None or not console.failed:
                raise
            step = console.failed[-1]
            raise StepFailed(f"pipeline step '{step}' failed; its log: {console.step_log_path(step)} "
                             f"(all steps: {console.dir / 'pipeline.log'})") from e


def submit(host: str, params: dict, experiment: str = "motioncharacter", namespace: str | None = None) -> str:
    import kfp

    from .pipeline import motioncharacter_pipeline

    from motioncharacter.faults import is_transient

    try:
        client = kfp.Client(host=host, namespace=namespace)
        run = client.create_run_from_pipeline_func(motioncharacter_pipeline, arguments=params,
                                                   experiment_name=experiment, enable_caching=True)
    except Exception as e:
        if not is_transient(e):
            raise
        from motioncharacter.cli import UserError

        raise UserError(f"cannot reach Kubeflow Pipelines at {host}: {type(e).__name__}: {str(e)[:300]}") from e
    return run.run_id
