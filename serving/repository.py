"""Export a Triton model repository (Python backend) for MotionCharacter.

Layout written to a local folder or an ``s3://`` prefix::

    <repo>/motioncharacter/config.pbtxt          one request -> one response (frames + mp4)
    <repo>/motioncharacter/1/model.py
    <repo>/motioncharacter/weights/...           only with copy_weights
    <repo>/motioncharacter_stream/config.pbtxt   decoupled: per-step progress, then the video
    <repo>/motioncharacter_stream/1/model.py

Both models share one backend implementation (motioncharacter.serving.backend), so the image
that runs Triton must have this package installed; model.py is a two-line shim.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import storage
from .request_args import INPUTS, LIST_INPUTS, Limits

MODEL = "motioncharacter"
STREAM_MODEL = "motioncharacter_stream"

MODEL_PY = '''\
# Written by `motioncharacter deploy`. The implementation lives in the installed package so that
# both models (plain and streaming) and the tests run the same code.
from motioncharacter.serving.backend import TritonPythonModel  # noqa: F401
'''


@dataclass
class DeployOptions:
    weights: str | None = None        # local folder or s3:// URI in the diffusers layout
    preset: str | None = None         # e.g. "tiny" instead of weights
    copy_weights: bool = False        # copy weights into the repository instead of referencing them
    arcface_pack: str | None = None
    base_checkpoint: str | None = None  # community SD1.5 base: diffusers folder or single-file .safetensors
    scheduler: str = ""               # "" = the weights' own (DDIM); ddim | dpm++ | lcm
    default_steps: int = 0            # steps of a request that sends none; 0 = the model's own
    kind: str = "cpu"                 # instance group: "cpu" locally, "gpu" on clusters
    instances: int = 1                # model instances per device (each loads the pipeline once)
    max_batch_size: int = 1           # requests Triton may hand one execute() call (run one by one)
    max_queue_size: int = 16          # requests waiting beyond this are rejected (UNAVAILABLE)
    queue_timeout_s: float = 300.0    # a request waiting longer than this in the queue is rejected
    request_timeout_s: float = 600.0  # a generation running longer than this is aborted
    version: int = 1
    version_policy: str = "latest:1"  # latest:N | all | specific:1,2
    fps: int = 8                      # frame rate of the returned mp4
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        if bool(self.weights) == bool(self.preset):
            raise ValueError("give exactly one of --weights URI or --preset NAME")
        from ..model.schedulers import SCHEDULERS

        if self.scheduler and self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.default_steps < 0:
            raise ValueError(f"--steps must be >= 0 (0 = the model's own), got {self.default_steps}")
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"--kind must be cpu or gpu, got {self.kind!r}")
        for name in ("instances", "max_batch_size", "max_queue_size", "version", "fps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("queue_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        _version_policy(self.version_policy)


def _version_policy(spec: str) -> str:
    kind, _, arg = spec.partition(":")
    if kind == "all" and not arg:
        return "version_policy: { all: { } }"
    if kind == "latest" and arg.isdigit() and int(arg) >= 1:
        return f"version_policy: {{ latest: {{ num_versions: {int(arg)} }} }}"
    if kind == "specific" and arg and all(v.strip().isdigit() for v in arg.split(",")):
        return f"version_policy: {{ specific: {{ versions: [ {', '.join(v.strip() for v in arg.split(','))} ] }} }}"
    raise ValueError(f"version policy {spec!r} is not one of latest:N, all, specific:V1,V2")


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(name: str, opts: DeployOptions, parameters: dict[str, str], decoupled: bool) -> str:
    """The model configuration, in protobuf text format."""
    lines = [f"name: {_q(name)}", 'backend: "python"', f"max_batch_size: {opts.max_batch_size}", "input ["]
    ins = []
    for inp, (ttype, _, optional, _) in INPUTS.items():
        dims = "-1" if inp in LIST_INPUTS else "1"
        ins.append(f"  {{ name: {_q(inp)} data_type: {ttype} dims: [ {dims} ]{' optional: true' if optional else ''} }}")
    lines += [",\n".join(ins), "]", "output ["]
    outs = ['  { name: "frames" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] }',  # (F, H, W, 3) RGB
            '  { name: "video" data_type: TYPE_STRING dims: [ 1 ] }']             # mp4 bytes
    if decoupled:
        outs += ['  { name: "step" data_type: TYPE_INT32 dims: [ 1 ] }',
                 '  { name: "total" data_type: TYPE_INT32 dims: [ 1 ] }']
    lines += [",\n".join(outs), "]"]
    kind = "KIND_GPU" if opts.kind == "gpu" else "KIND_CPU"
    lines.append(f"instance_group [ {{ kind: {kind} count: {opts.instances} }} ]")
    lines.append(_version_policy(opts.version_policy))
    lines += [
        "dynamic_batching {",
        "  max_queue_delay_microseconds: 0",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {int(opts.queue_timeout_s * 1e6)}",
        "    allow_timeout_override: true",
        f"    max_queue_size: {opts.max_queue_size}",
        "  }",
        "}",
    ]
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    for k, v in parameters.items():
        lines.append(f"parameters: {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}")
    return "\n".join(lines) + "\n"


def export_repository(dest: str, opts: DeployOptions) -> str:
    """Write the model repository to ``dest`` (local folder or s3:// prefix); returns ``dest``."""
    opts.check()
    from ..model.inference import weights_defaults

    if opts.weights and not storage.is_s3(opts.weights) and not Path(opts.weights).exists():
        raise FileNotFoundError(f"--weights {opts.weights} does not exist")
    # the model's native size and default frames/steps: clients that send none get these
    native = weights_defaults(opts.weights, opts.preset)
    if opts.default_steps:
        native["steps"] = opts.default_steps
    params = {"preset": opts.preset or "", "arcface_pack": opts.arcface_pack or "", "scheduler": opts.scheduler,
              **{f"default_{k}": str(v) for k, v in native.items()},
              "base_checkpoint": opts.base_checkpoint or "",
              "fps": str(opts.fps), "request_timeout_s": str(opts.request_timeout_s), **opts.limits.as_parameters()}

    tmp = None
    root = Path(dest) if not storage.is_s3(dest) else Path(tmp := tempfile.mkdtemp(prefix="mc-repo-"))
    try:
        if opts.weights and opts.copy_weights:
            target = root / MODEL / "weights"
            if target.exists():
                shutil.rmtree(target)
            storage.download_dir(opts.weights, target) if storage.is_s3(opts.weights) else \
                shutil.copytree(opts.weights, target)
            # Relative paths resolve against the repository root; Triton copies each model of an
            # s3:// repository into its own temp folder, so there the weights are named absolutely.
            params["weights"] = storage.join(dest, MODEL, "weights") if storage.is_s3(dest) else f"{MODEL}/weights"
        elif opts.weights:
            params["weights"] = opts.weights if storage.is_s3(opts.weights) else str(Path(opts.weights).resolve())
        else:
            params["weights"] = ""
        for name, decoupled in ((MODEL, False), (STREAM_MODEL, True)):
            d = root / name
            (d / str(opts.version)).mkdir(parents=True, exist_ok=True)
            (d / "config.pbtxt").write_text(config_pbtxt(name, opts, params, decoupled))
            (d / str(opts.version) / "model.py").write_text(MODEL_PY)
        if tmp:
            storage.upload_dir(root, dest)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_weights(value: str, repository_root: str | os.PathLike) -> str | None:
    """The weights URI a model should load: '' -> None, relative -> under the repository root."""
    if not value:
        return None
    if storage.is_s3(value) or os.path.isabs(value):
        return value
    return str(Path(repository_root, value))
