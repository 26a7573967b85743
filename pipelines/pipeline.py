"""The Kubeflow Pipelines v2 pipeline: prepare -> train -> evaluate -> (gate) deploy -> smoke test,
with the paper's ablations trained and evaluated in parallel into the same MLflow experiments.

Components are lightweight Python components that import the project from its container
image (``IMAGE``); all real work is in ``motioncharacter.pipelines.steps``. Kubernetes settings
(Secrets as env, GPUs, retries, caching) are applied with kfp-kubernetes at compile time;
``kfp.local`` ignores them, and local credentials come from the environment.
"""

from kfp import dsl, kubernetes

from motioncharacter.images import GPU_IMAGE, IMAGE  # noqa: F401 (re-exported: steps, launch and tests use them)
# the pipeline's own MinIO user (k8s/base/minio.yaml, pipeline.json): writes run data and model
# repositories; Triton, MLflow and training have users of their own
S3_SECRET = "s3-pipeline"               # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (k8s/secrets)
MLFLOW_SECRET = "mlflow-client"          # MLFLOW_TRACKING_USERNAME / _PASSWORD (k8s/secrets)
ENDPOINTS = "motioncharacter-endpoints"  # ConfigMap: MOTIONCHARACTER_S3_ENDPOINT, MLFLOW_TRACKING_URI, ...


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard_plan(count: int) -> list:
    from motioncharacter.pipelines.steps import shard_indices

    return shard_indices(count)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_shard(data_uri: str, work_uri: str, index: int, count: int, overrides: list) -> str:
    from motioncharacter.pipelines.steps import prepare_shard_step, stage_uri

    return prepare_shard_step(data_uri, stage_uri(work_uri, "prepared"), index, count, overrides)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(data_uri: str, work_uri: str, shards: int, overrides: list) -> str:
    """Merges the shards into the dataset's manifest (``data_uri`` keys the cache)."""
    from motioncharacter.pipelines.steps import merge_step, stage_uri

    return merge_step(stage_uri(work_uri, "prepared"), shards, overrides)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train(manifest_uri: str, work_uri: str, preset: str, weights: str, steps: int, ablation: str,
          overrides: list, train_nodes: int, gpus_per_node: int, train_processes: int, keep_train_job: bool,
          image: str, train_engine: str) -> str:
    from motioncharacter.pipelines.steps import stage_uri, train_step

    manifest_uri = manifest_uri or stage_uri(work_uri, "prepared", "manifest.jsonl")
    return train_step(manifest_uri, stage_uri(work_uri, "train", ablation), preset, weights, steps, ablation,
                      overrides, train_nodes=train_nodes, gpus_per_node=gpus_per_node,
                      train_processes=train_processes, keep_train_job=keep_train_job, image=image,
                      train_engine=train_engine)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(weights_uri: str, eval_set: str, work_uri: str, ablation: str, limit: int, overrides: list) -> str:
    from motioncharacter.pipelines.steps import evaluate_step, stage_uri

    return evaluate_step(weights_uri, eval_set, stage_uri(work_uri, "eval", ablation), limit, overrides,
                         run_name=f"evaluate-{ablation}")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def quality_gate(summary: str, thresholds: dict, champion_rule: str) -> bool:
    import json

    from motioncharacter.pipelines.steps import gate, gate_aliases

    result = json.loads(summary)
    passed, why = gate(result.get("metrics", {}), thresholds)
    print(f"evaluation gate {'passed' if passed else 'failed'}: {why}")
    print(gate_aliases(result, passed, thresholds, champion_rule))  # registry aliases challenger / champion
    return passed


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(weights_uri: str, model_repository: str, serving_target: str, canary_percent: int) -> str:
    from motioncharacter.pipelines.steps import deploy_step

    return deploy_step(weights_uri, model_repository, target=serving_target, canary_percent=canary_percent)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def smoke_test(model_repository: str, triton_url: str, work_uri: str, options: dict) -> str:
    from motioncharacter.pipelines.steps import smoke_step, stage_uri

    return smoke_step(model_repository, triton_url, stage_uri(work_uri, "smoke"), "a person talking to the camera",
                      "talking", 8.0, options)


def _cluster_settings(task, gpu: bool = False, retries: int = 1):
    """Secrets and endpoints as env, GPU requests, retries; ignored by the local runner."""
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env={
        "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
    kubernetes.use_secret_as_env(task, secret_name=MLFLOW_SECRET, secret_key_to_env={  # basic-auth user
        "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
    kubernetes.use_config_map_as_env(task, config_map_name=ENDPOINTS, config_map_key_to_env={
        "MOTIONCHARACTER_S3_ENDPOINT": "MOTIONCHARACTER_S3_ENDPOINT",
        "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"})
    if gpu:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
        task.set_memory_limit("64G").set_cpu_limit("8")
    task.set_retry(num_retries=retries, backoff_duration="60s", backoff_factor=2.0)
    return task


@dsl.pipeline(name="motioncharacter", description="prepare -> train -> evaluate -> deploy MotionCharacter")
def motioncharacter_pipeline(
    data_uri: str = "fixtures",
    work_uri: str = "s3://pipelines/motioncharacter/run",
    preset: str = "tiny",
    weights: str = "",
    train_steps: int = 4,
    eval_set: str = "fixtures",
    eval_limit: int = 2,
    # {metric: minimum} or {metric: {"min": a, "max": b}}; names as `motioncharacter evaluate` reports them
    thresholds: dict = {"motion_smoothness_flowinterp": 0.5},
    # a passing version becomes @challenger; @champion when this rule says it beats the champion:
    # "auto" (the first threshold's metric), "METRIC", "METRIC:lower", or "manual" (`registry promote`)
    champion_rule: str = "auto",
    ablations: list = [],
    prepare_overrides: list = ["filters.ocr=false"],
    train_overrides: list = [],
    eval_overrides: list = [],
    model_repository: str = "s3://models/motioncharacter",
    triton_url: str = "",
    # extra Triton inputs for the smoke video: ID-Animator / DreaMoving modes and weights
    generation_options: dict = {},
    # data preparation fans out over this many slices of the input listing, one pod each, then merges
    prepare_shards: int = 1,
    # > 1 node or GPU: each train step launches a cluster job of that size (pipelines/launch.py):
    # train_engine "trainjob" (Kubeflow Trainer v2, runtime torch-distributed) or "pytorchjob" (the
    # Training Operator v1); train_processes > 1 runs that many processes in the step itself
    # (torchrun; what `pipeline run --local` can do); keep_train_job leaves the finished job
    train_nodes: int = 1,
    gpus_per_node: int = 1,
    train_processes: int = 1,
    keep_train_job: bool = False,
    train_image: str = GPU_IMAGE,
    train_engine: str = "trainjob",
    # "triton": a new version in model_repository, which the Triton Deployment polls; "kserve": the
    # @challenger version's own repository and a KServe InferenceService (model_repository-kserve/
    # inferenceservice.yaml) serving it as a canary with kserve_canary_percent of the traffic (0: all)
    serving_target: str = "triton",
    kserve_canary_percent: int = 10,
):
    plan = shard_plan(count=prepare_shards)
    plan.set_caching_options(True)
    # Each shard writes its records into the one prepared/ folder; its output stays in the loop
    # (kfp.local replaces task outputs entering a ParallelFor), the merge below waits for all.
    with dsl.ParallelFor(items=plan.output, name="prepare-shards") as shard:
        part = _cluster_settings(prepare_shard(data_uri=data_uri, work_uri=work_uri, index=shard,
                                               count=prepare_shards, overrides=prepare_overrides))
        part.set_caching_options(True)  # same inputs, same shard
    prep = _cluster_settings(prepare(data_uri=data_uri, work_uri=work_uri, shards=prepare_shards,
                                     overrides=prepare_overrides))
    prep.after(part)
    prep.set_caching_options(True)  # same inputs, same dataset: reuse it
    launch = {"train_nodes": train_nodes, "gpus_per_node": gpus_per_node, "train_processes": train_processes,
              "keep_train_job": keep_train_job, "image": train_image, "train_engine": train_engine}
    main = _cluster_settings(train(manifest_uri=prep.output, work_uri=work_uri, preset=preset, weights=weights,
                                   steps=train_steps, ablation="full", overrides=train_overrides, **launch),
                             gpu=True, retries=3)
    main.set_caching_options(False)
    ev = _cluster_settings(evaluate(weights_uri=main.output, eval_set=eval_set, work_uri=work_uri, ablation="full",
                                    limit=eval_limit, overrides=eval_overrides), gpu=True)
    ev.set_caching_options(False)
    # a separate single-output step: kfp.local resolves conditions on a task's `Output` only
    ok = quality_gate(summary=ev.output, thresholds=thresholds, champion_rule=champion_rule)
    ok.set_caching_options(False)
    with dsl.If(ok.output == True, name="evaluation-gate"):  # noqa: E712 (a kfp condition)
        dep = _cluster_settings(deploy(weights_uri=main.output, model_repository=model_repository,
                                       serving_target=serving_target, canary_percent=kserve_canary_percent))
        dep.set_caching_options(False)
        smoke = _cluster_settings(smoke_test(model_repository=dep.output, triton_url=triton_url, work_uri=work_uri,
                                             options=generation_options))
        smoke.set_caching_options(False)
    # Inside the loop the manifest is found from work_uri (ordered with .after): kfp.local replaces
    # every task output entering a ParallelFor with the loop item (kfp 2.17), so none may enter.
    with dsl.ParallelFor(items=ablations, name="ablations") as variant:
        t = _cluster_settings(train(manifest_uri="", work_uri=work_uri, preset=preset, weights=weights,
                                    steps=train_steps, ablation=variant, overrides=train_overrides, **launch),
                              gpu=True, retries=3)
        t.after(prep)
        t.set_caching_options(False)
        e = _cluster_settings(evaluate(weights_uri=t.output, eval_set=eval_set, work_uri=work_uri, ablation=variant,
                                       limit=eval_limit, overrides=eval_overrides), gpu=True)
        e.set_caching_options(False)
