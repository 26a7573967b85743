"""The work of each pipeline step as plain functions (the kfp components are thin wrappers).

Steps pass URIs (local paths or s3://), never data: clips, checkpoints and model
repositories live in the object store, as on a cluster.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from motioncharacter import storage

log = logging.getLogger(__name__)

# The paper's ablations (Table 2): training-config overrides per variant.
ABLATIONS: dict[str, list[str]] = {
    "full": [],
    "no_region_aware": ["loss.region_aware=false"],
    "no_id_loss": ["loss.id_loss=false"],
    "no_motion_control": ["model.motion_control=false"],
}


def stage_uri(work_uri: str, *parts: str) -> str:
    return storage.join(work_uri, *parts)


def _cli(argv: list[str]) -> None:
    from motioncharacter.cli import main

    rc = main(argv)
    if rc:
        raise RuntimeError(f"`motioncharacter {' '.join(argv)}` failed with exit status {rc}")


def prepare_step(data_uri: str, output_uri: str, overrides: list[str]) -> str:
    """Data preparation; ``data_uri="fixtures"`` generates the project's demo clips first."""
    if data_uri == "fixtures":
        from motioncharacter.fixtures import write_fixtures

        data_uri = str(write_fixtures(Path(tempfile.gettempdir()) / "motioncharacter-fixtures"))
    args = ["data", "prepare", data_uri, "--output", output_uri, "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    _cli(args)
    return storage.join(output_uri, "manifest.jsonl")


def shard_indices(count: int) -> list[int]:
    """The items of the pipeline's shard loop."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"prepare_shards={count!r}: must be an integer >= 1")
    return list(range(count))


def prepare_shard_step(data_uri: str, output_uri: str, index: int, count: int, overrides: list[str]) -> str:
    """One shard of data preparation into the shared ``output_uri``; returns its results file."""
    from motioncharacter.components.prepare.stage import shard_file

    if data_uri == "fixtures":  # the same files in a folder of its own: kfp.local runs the shards at once
        from motioncharacter.fixtures import write_fixtures

        data_uri = str(write_fixtures(Path(tempfile.gettempdir()) / f"motioncharacter-fixtures-{index}-of-{count}"))
    args = ["data", "prepare", data_uri, "--output", output_uri, "--no-progress", "--shard", f"{index}/{count}"]
    for o in overrides:
        args += ["--set", o]
    _cli(args)
    return shard_file(output_uri, index, count)


def merge_step(output_uri: str, count: int, overrides: list[str]) -> str:
    """The manifest over all shards (resampling weights over the whole dataset), the MLflow run."""
    args = ["data", "merge", output_uri, "--shards", str(count)]
    for o in overrides:
        args += ["--set", o]
    _cli(args)
    return storage.join(output_uri, "manifest.jsonl")


def assemble_weights(train_output: str, preset: str, base_weights: str, dest: str) -> str:
    """A full weights folder (diffusers layout + what training exported), so generate, evaluate and
    deploy all take one ``--weights`` URI (``model.trained.assemble``)."""
    from motioncharacter.model.trained import assemble

    return assemble(train_output, preset, base_weights, dest)


def train_args(manifest_uri: str, output_uri: str, preset: str, weights: str, steps: int, ablation: str,
               overrides: list[str]) -> list[str]:
    """``motioncharacter train ...`` of one variant, the same in every branch (in-step, torchrun, PyTorchJob)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; one of {', '.join(ABLATIONS)}")
    args = ["train", "--data", manifest_uri, "--output", output_uri, "--steps", str(steps), "--resume",
            "--set", f"ablation={ablation}"]
    args += ["--preset", preset] if preset else ["--weights", weights]
    for o in ABLATIONS[ablation] + list(overrides):
        args += ["--set", o]
    return args


def train_step(manifest_uri: str, output_uri: str, preset: str, weights: str, steps: int, ablation: str,
               overrides: list[str], train_nodes: int = 1, gpus_per_node: int = 1, train_processes: int = 1,
               keep_train_job: bool = False, image: str = "", train_engine: str = "trainjob") -> str:
    """Train one variant (resuming if a checkpoint exists); returns a full weights URI.

    One process here by default; ``train_processes`` > 1 runs them under torchrun in this step;
    ``train_nodes`` or ``gpus_per_node`` > 1 launch a cluster job of that size (pipelines/launch.py):
    a Trainer v2 TrainJob (``train_engine="trainjob"``) or a Training Operator PyTorchJob ("pytorchjob")."""
    from . import launch

    launch.engine(train_engine)  # a misspelt engine fails here, not only on a cluster
    args = train_args(manifest_uri, output_uri, preset, weights, steps, ablation, overrides)
    mode = launch.plan(train_nodes, gpus_per_node, train_processes)
    log.info("training %s: %s (nodes %d, GPUs per node %d, processes %d)", ablation, mode, train_nodes,
             gpus_per_node, train_processes)
    if mode == launch.IN_STEP:
        _cli(args)
    elif mode == launch.LOCAL:
        launch.run_torchrun(train_processes, args)
    else:
        launch.launch_job(launch.job_manifest(train_job_spec(args, output_uri, manifest_uri, train_nodes,
                                                             gpus_per_node, image, engine=train_engine)),
                          keep=keep_train_job)
    return assemble_weights(output_uri, preset, weights, storage.join(output_uri, "weights"))


def train_job_spec(args: list[str], output_uri: str, manifest_uri: str, nodes: int, gpus_per_node: int,
                   image: str, namespace: str = "", engine: str = "trainjob") -> "launch.JobSpec":
    """The cluster job for ``args``, in this step's namespace, with the pipeline's identity and endpoints."""
    from . import launch, pipeline

    for what, uri in (("the manifest", manifest_uri), ("the training output", output_uri)):
        if not storage.is_s3(uri):
            raise ValueError(f"{what} {uri!r} is a local path, which the cluster job's pods cannot see: "
                             "give the pipeline an s3:// work_uri")
    return launch.JobSpec(name=launch.job_name(output_uri), namespace=namespace or launch.current_namespace(),
                          image=image or pipeline.GPU_IMAGE, train_args=args, nodes=nodes,
                          gpus_per_node=gpus_per_node, engine=engine, s3_secret=pipeline.S3_SECRET,
                          endpoints=pipeline.ENDPOINTS, mlflow_secret=pipeline.MLFLOW_SECRET)


def evaluate_step(weights_uri: str, eval_set: str, output_uri: str, limit: int, overrides: list[str],
                  run_name: str | None = None) -> str:
    """Evaluate; returns the summary as JSON (the quality gate reads its ``metrics``)."""
    from motioncharacter.components.evaluate.settings import EvalConfig
    from motioncharacter.components.evaluate.stage import evaluate
    from motioncharacter.config import load

    if eval_set == "fixtures":
        from motioncharacter.fixtures import write_fixtures

        d = Path(tempfile.gettempdir()) / "motioncharacter-evalset"
        fx = write_fixtures(Path(tempfile.gettempdir()) / "motioncharacter-fixtures")
        d.mkdir(exist_ok=True)
        shutil.copy(fx / "portrait_astronaut.png", d / "astronaut.png")
        eval_set = str(d)
    cfg = load(EvalConfig, "evaluate.yaml", overrides=overrides)
    summary = evaluate(eval_set, output_uri, cfg, weights=weights_uri, limit=limit or None, progress=False,
                       run_name=run_name)
    return json.dumps(summary, default=str)


def _value(metric) -> float | None:
    if isinstance(metric, dict):
        metric = metric.get("value")
    return float(metric) if isinstance(metric, (int, float)) else None


def gate(metrics: dict, thresholds: dict) -> tuple[bool, str]:
    """All thresholds met? ``{metric: minimum}`` or ``{metric: {"min": a, "max": b}}``.
    A metric that was not computed fails the gate, with the reason."""
    problems = []
    for name, bound in thresholds.items():
        lo, hi = (bound.get("min"), bound.get("max")) if isinstance(bound, dict) else (bound, None)
        v = _value(metrics.get(name))
        if v is None:
            problems.append(f"{name} not computed")
        elif lo is not None and v < float(lo):
            problems.append(f"{name} {v:.3f} < {lo}")
        elif hi is not None and v > float(hi):
            problems.append(f"{name} {v:.3f} > {hi}")
    return not problems, "; ".join(problems) or "all thresholds met"


def gate_aliases(summary: dict, passed: bool, thresholds: dict, champion_rule: str) -> str:
    """After the gate: the evaluated registered version becomes @challenger when it passed, and
    @champion when ``champion_rule`` says it beats the champion (registry.ChampionRule.parse)."""
    version = summary.get("registered_model")
    if not version:
        return "the evaluated weights are not a registered version: no alias set"
    if not passed:
        return f"{version['uri']} did not pass: aliases unchanged"
    from motioncharacter import registry

    rule = registry.ChampionRule.parse(champion_rule, thresholds)
    return registry.gate_passed(version["name"], int(version["version"]), rule)


def deploy_step(weights_uri: str, model_repository: str, triton_url: str = "", target: str = "triton",
                canary_percent: int = 10) -> str:
    """Write the weights as the repository's next model version; with ``triton_url``, that server
    (explicit model control, admin key in MOTIONCHARACTER_TRITON_ADMIN_KEY) loads, warms up and
    then serves it. The smoke step checks the version served.

    ``target="kserve"``: the registry drives it. The version the gate just made @challenger gets its
    own repository (MODEL_REPOSITORY-kserve/vN) and MODEL_REPOSITORY-kserve/inferenceservice.yaml
    serves it as a canary with ``canary_percent`` of the traffic (0: all of it). The step writes the
    manifest; applying it is left to an account allowed to change InferenceServices (the pipeline's
    is not). Returns the repository the smoke step should check."""
    if target == "kserve":
        from motioncharacter import registry
        from motioncharacter.serving import kserve

        v = registry.registered_version_of(weights_uri)
        if not v:
            raise ValueError(f"serving_target=kserve serves registered versions (@challenger after the gate): "
                             f"{weights_uri} holds no registered adapter")
        ref = f"{registry.PREFIX}{v['name']}@challenger"
        _cli(["deploy", "--target", "kserve", "--model", ref, "--model-repository", model_repository,
              "--copy-weights", "--manifest", storage.join(kserve.kserve_root(model_repository), "inferenceservice.yaml"),
              *(["--canary-percent", str(canary_percent)] if canary_percent else [])])
        return kserve.storage_uri(model_repository, registry.resolve(ref).version)
    if target != "triton":
        raise ValueError(f"serving_target={target!r}: must be triton (the Triton Deployment) or kserve")
    _cli(["deploy", "--weights", weights_uri, "--model-repository", model_repository, "--copy-weights",
          *(["--url", triton_url] if triton_url else [])])
    return model_repository


def smoke_step(model_repository: str, triton_url: str, output_uri: str, prompt: str, action: str,
               intensity: float, options: dict | None = None, version_wait_s: float = 300.0) -> str:
    """Generate one video through Triton: the given endpoint, or a local server on the repository.

    ``options`` are further Triton inputs (see serving/request_args.py), e.g. ID-Animator's
    ``{"mode": "id-animator"}`` or DreaMoving's ``{"mode": "dreamoving", "face_weight": 0.5}``;
    the defaults suit the tiny preset (8 frames of 64x64, 4 steps).

    With a ``model_repository``, the endpoint must serve the version the repository names (the
    deploy's; a polling server gets ``version_wait_s`` to pick it up), and the request goes to
    that version only."""
    import contextlib

    from motioncharacter.fixtures import package_face
    from motioncharacter.serving.client import MotionCharacterClient
    from motioncharacter.serving.repository import served_version
    from motioncharacter.serving.server import TritonServer
    from motioncharacter.video import encode_video

    params = {"frames": 8, "steps": 4, "height": 64, "width": 64, "seed": 0, "action": action,
              "intensity": intensity, **(options or {})}
    if params.get("mode", "motioncharacter") != "motioncharacter":
        params.pop("action")  # ID-Animator and DreaMoving have no motion control: the action is in the prompt
    ctx = contextlib.nullcontext(None) if triton_url else TritonServer(
        model_repository, http_port=None, grpc_port=None, metrics_port=None)
    expected = served_version(model_repository) if model_repository else None
    with ctx as server:
        url = triton_url or server.http_url
        with MotionCharacterClient(url, timeout_s=600, version=expected or 0) as client:
            if expected:
                client.wait_for_version(expected, timeout_s=version_wait_s)
            frames = client.generate(package_face("grace_hopper"), prompt, **params).frames
    target = storage.join(output_uri, "smoke.mp4")
    storage.write_bytes(target, encode_video(frames, "mp4", 8.0))
    log.info("video generated through Triton at %s (model version %s): %s", url, expected or "any", target)
    return target
