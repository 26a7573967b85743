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


def _staged(uri: str):
    """(local dir to write into, function that publishes it to ``uri``)."""
    if not storage.is_s3(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        return Path(uri), lambda: None
    d = Path(tempfile.mkdtemp(prefix="mc-step-", dir=storage.cache_dir()))
    return d, lambda: storage.upload_dir(d, uri)


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


def assemble_weights(train_output: str, preset: str, base_weights: str, dest: str) -> str:
    """A full weights folder (diffusers layout + adapter/) from the base and a trained adapter,
    so generate, evaluate and deploy all take one ``--weights`` URI."""
    local, publish = _staged(dest)
    if preset:
        from motioncharacter.model.presets import save_tiny_weights

        save_tiny_weights(local, with_adapter=False)
    else:
        storage.download_dir(base_weights, local) if storage.is_s3(base_weights) else \
            shutil.copytree(base_weights, local, dirs_exist_ok=True)
    adapter = local / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    storage.download_dir(storage.join(train_output, "adapter"), adapter)
    publish()
    return dest


def train_step(manifest_uri: str, output_uri: str, preset: str, weights: str, steps: int, ablation: str,
               overrides: list[str]) -> str:
    """Train one variant (resuming if a checkpoint exists); returns a full weights URI."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; one of {', '.join(ABLATIONS)}")
    args = ["train", "--data", manifest_uri, "--output", output_uri, "--steps", str(steps), "--resume",
            "--set", f"ablation={ablation}"]
    args += ["--preset", preset] if preset else ["--weights", weights]
    for o in ABLATIONS[ablation] + list(overrides):
        args += ["--set", o]
    _cli(args)
    return assemble_weights(output_uri, preset, weights, storage.join(output_uri, "weights"))


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


def deploy_step(weights_uri: str, model_repository: str) -> str:
    _cli(["deploy", "--weights", weights_uri, "--model-repository", model_repository, "--copy-weights"])
    return model_repository


def smoke_step(model_repository: str, triton_url: str, output_uri: str, prompt: str, action: str,
               intensity: float, options: dict | None = None) -> str:
    """Generate one video through Triton: the given endpoint, or a local server on the repository.

    ``options`` are further Triton inputs (see serving/request_args.py), e.g. ID-Animator's
    ``{"mode": "id-animator"}`` or DreaMoving's ``{"mode": "dreamoving", "face_weight": 0.5}``;
    the defaults suit the tiny preset (8 frames of 64x64, 4 steps)."""
    import contextlib

    from motioncharacter.fixtures import package_face
    from motioncharacter.serving.client import MotionCharacterClient
    from motioncharacter.serving.server import TritonServer
    from motioncharacter.video import encode_video

    params = {"frames": 8, "steps": 4, "height": 64, "width": 64, "seed": 0, "action": action,
              "intensity": intensity, **(options or {})}
    if params.get("mode", "motioncharacter") != "motioncharacter":
        params.pop("action")  # ID-Animator and DreaMoving have no motion control: the action is in the prompt
    ctx = contextlib.nullcontext(None) if triton_url else TritonServer(
        model_repository, http_port=None, grpc_port=None, metrics_port=None)
    with ctx as server:
        url = triton_url or server.http_url
        with MotionCharacterClient(url, timeout_s=600) as client:
            frames = client.generate(package_face("grace_hopper"), prompt, **params).frames
    target = storage.join(output_uri, "smoke.mp4")
    storage.write_bytes(target, encode_video(frames, "mp4", 8.0))
    log.info("video generated through Triton at %s: %s", url, target)
    return target
