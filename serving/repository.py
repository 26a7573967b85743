"""Export a Triton model repository (Python backend) for MotionCharacter.

Layout written to a local folder or an ``s3://`` prefix::

    <repo>/motioncharacter/config.pbtxt          one request -> one response (frames + mp4); the
                                                 served version's config (version_policy names it)
    <repo>/motioncharacter/N/model.py            one folder per deploy: N = 1, 2, ...
    <repo>/motioncharacter/N/deployed.pbtxt      the config version N was deployed with (rollback restores it)
    <repo>/motioncharacter/N/weights/...         only with copy_weights
    <repo>/motioncharacter/warmup/...            model_warmup inputs: the smallest valid request
    <repo>/motioncharacter_stream/...            the same for the decoupled model: per-step progress, then the video

Each deploy writes version N+1 beside the existing ones and then re-points config.pbtxt at it, so a
server that reloads the model (explicit model control, or polling) loads and warms up N+1 while N
keeps serving, and ``rollback`` re-points it at the version served before.

Both models share one backend implementation (motioncharacter.serving.backend), so the image
that runs Triton must have this package installed; model.py is a two-line shim.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import storage
from ..model.acceleration import Acceleration
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
    acceleration: dict = field(default_factory=dict)  # model.acceleration.Acceleration fields (defaults if absent)
    dtype: str = "auto"               # fp32 | fp16 | bf16 | auto (fp16 on a GPU instance, fp32 on a CPU one)
    default_steps: int = 0            # steps of a request that sends none; 0 = the model's own
    kind: str = "cpu"                 # instance group: "cpu" locally, "gpu" on clusters
    instances: int = 1                # model instances per device (each loads the pipeline once)
    max_batch_size: int = 1           # requests Triton may hand one execute() call (run one by one)
    max_queue_size: int = 16          # requests waiting beyond this are rejected (UNAVAILABLE)
    queue_timeout_s: float = 300.0    # a request waiting longer than this in the queue is rejected
    request_timeout_s: float = 600.0  # a generation running longer than this is aborted
    version: int = 0                  # version folder to write; 0 = one above the highest there
    version_policy: str = ""          # "" = specific:<the new version>; latest:N | all | specific:1,2
    warmup: bool = True               # Triton runs the smallest valid request before serving a version
    keep_versions: int = 3            # after a deploy, version folders beyond the newest N go (0 = keep all)
    fps: int = 8                      # frame rate of the returned mp4
    limits: Limits = field(default_factory=Limits)

    def check(self) -> None:
        if bool(self.weights) == bool(self.preset):
            raise ValueError("give exactly one of --weights URI or --preset NAME")
        from ..model.schedulers import SCHEDULERS

        if self.scheduler and self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        Acceleration(**self.acceleration).check()
        from ..model.precision import check

        try:
            check(self.dtype)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        if self.dtype == "fp16" and self.kind == "cpu":
            raise ValueError("--dtype fp16 needs GPU instances (--kind gpu): a CPU has no fp16 arithmetic; "
                             "use bf16, fp32 or auto (fp32 on CPU instances)")
        if self.default_steps < 0:
            raise ValueError(f"--steps must be >= 0 (0 = the model's own), got {self.default_steps}")
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"--kind must be cpu or gpu, got {self.kind!r}")
        for name in ("instances", "max_batch_size", "max_queue_size", "fps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.version < 0:
            raise ValueError(f"--version must be >= 1 (or 0 for the next free version), got {self.version}")
        if self.keep_versions < 0 or self.keep_versions == 1:
            raise ValueError(f"--keep-versions must be 0 (keep all) or >= 2 (the new version and the one to "
                             f"roll back to), got {self.keep_versions}")
        for name in ("queue_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.version_policy:
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


def config_pbtxt(name: str, opts: DeployOptions, parameters: dict[str, str], decoupled: bool,
                 warmup: dict[str, tuple[str, str]] | None = None) -> str:
    """The model configuration, in protobuf text format.

    ``warmup``: input -> (Triton type, file in <model>/warmup/), one request Triton runs on every new
    instance before the version is ready (a failing warmup fails the load: the old version stays)."""
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
    lines.append(_version_policy(opts.version_policy or (f"specific:{opts.version}" if opts.version else "latest:1")))
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
    if warmup:
        lines += ["model_warmup [ {", '  name: "smallest_request"', "  batch_size: 1"]
        lines += [f"  inputs {{ key: {_q(inp)} value: {{ data_type: {ttype} dims: [ 1 ] input_data_file: {_q(file)} }} }}"
                  for inp, (ttype, file) in warmup.items()]
        lines.append("} ]")
    for k, v in parameters.items():
        lines.append(f"parameters: {{ key: {_q(k)} value: {{ string_value: {_q(v)} }} }}")
    return "\n".join(lines) + "\n"


def export_repository(dest: str, opts: DeployOptions) -> str:
    """Write a new version of both models to ``dest`` (local folder or s3:// prefix) and point them
    at it; returns ``dest`` (``write_version`` returns the version number)."""
    write_version(dest, opts)
    return dest


def write_version(dest: str, opts: DeployOptions) -> int:
    """Write version N of both models (``opts.version``, or one above the highest in ``dest``), then
    their config.pbtxt naming it: last, so a polling server never sees a config before its files.

    Returns N. An existing version is never overwritten: a server may be serving it."""
    opts.check()
    from ..model.inference import weights_defaults

    if opts.weights and not storage.is_s3(opts.weights) and not Path(opts.weights).exists():
        raise FileNotFoundError(f"--weights {opts.weights} does not exist")
    existing = versions(dest)
    version = opts.version or max(existing, default=0) + 1
    if version in existing:
        raise ValueError(f"version {version} already exists in {dest} (versions {', '.join(map(str, existing))}): "
                         f"a deploy writes a new one (leave out --version for {max(existing) + 1}); "
                         "return to an old one with --rollback")
    previous = served_version(dest) if existing else None
    opts = replace(opts, version=version)
    # the model's native size and default frames/steps: clients that send none get these
    native = weights_defaults(opts.weights, opts.preset)
    if opts.default_steps:
        native["steps"] = opts.default_steps
    params = {"preset": opts.preset or "", "arcface_pack": opts.arcface_pack or "", "scheduler": opts.scheduler,
              "dtype": opts.dtype,
              **{f"default_{k}": str(v) for k, v in native.items()},
              "base_checkpoint": opts.base_checkpoint or "",
              **Acceleration(**opts.acceleration).check().to_params(),
              "fps": str(opts.fps), "request_timeout_s": str(opts.request_timeout_s), **opts.limits.as_parameters()}
    if previous:
        params["previous_version"] = str(previous)  # where --rollback returns to from this version

    tmp = None
    root = Path(dest) if not storage.is_s3(dest) else Path(tmp := tempfile.mkdtemp(prefix="mc-repo-"))
    try:
        if opts.weights and opts.copy_weights:
            target = root / MODEL / str(version) / "weights"
            storage.download_dir(opts.weights, target) if storage.is_s3(opts.weights) else \
                shutil.copytree(opts.weights, target)
            # Relative paths resolve against the repository root; Triton copies each model of an
            # s3:// repository into its own temp folder, so there the weights are named absolutely.
            params["weights"] = (storage.join(dest, MODEL, str(version), "weights") if storage.is_s3(dest)
                                 else f"{MODEL}/{version}/weights")
        elif opts.weights:
            params["weights"] = opts.weights if storage.is_s3(opts.weights) else str(Path(opts.weights).resolve())
        else:
            params["weights"] = ""
        warmup = _write_warmup(root, warmup_request(native, opts.limits)) if opts.warmup else None
        configs = {}
        for name, decoupled in ((MODEL, False), (STREAM_MODEL, True)):
            d = root / name / str(version)
            d.mkdir(parents=True, exist_ok=True)
            configs[name] = config_pbtxt(name, opts, params, decoupled, warmup)
            (d / "model.py").write_text(MODEL_PY)
            (d / DEPLOYED_CONFIG).write_text(configs[name])
        if tmp:
            storage.upload_dir(root, dest)
        for name, cfg in configs.items():
            storage.write_bytes(storage.join(dest, name, "config.pbtxt"), cfg.encode())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if opts.keep_versions and not opts.version_policy:  # latest:N / all: the user picks what is served
        prune(dest, opts.keep_versions, keep={version, previous})
    return version


def prune(dest: str, keep_newest: int, keep: set = frozenset()) -> list[int]:
    """Delete the version folders of both models beyond the newest ``keep_newest`` (copied weights
    make each one as large as the model), never one in ``keep`` (the new version and the one it
    replaced: a server may still serve it, and rollback returns to it); returns those deleted."""
    existing = versions(dest)
    gone = [v for v in existing[:-keep_newest] if v not in keep]
    for v in gone:
        for name in (MODEL, STREAM_MODEL):
            storage.remove_tree(storage.join(dest, name, str(v)))
    return gone


# -- versions and rollback ------------------------------------------------------------------------
DEPLOYED_CONFIG = "deployed.pbtxt"  # in each version folder: the config.pbtxt it was deployed with


def versions(dest: str) -> list[int]:
    """The version folders in the repository ``dest`` (both models carry the same ones), ascending."""
    found: set[int] = set()
    for name in (MODEL, STREAM_MODEL):
        base = storage.join(dest, name)
        if storage.is_s3(dest):
            if storage.exists(base):
                rel = (f[len(base) + 1:].split("/") for f in storage.list_files(base))
                found |= {int(parts[0]) for parts in rel if len(parts) > 1 and parts[0].isdigit()}
        elif Path(base).is_dir():
            found |= {int(c.name) for c in Path(base).iterdir() if c.is_dir() and c.name.isdigit()}
    return sorted(found)


def _config(dest: str, name: str = MODEL) -> str | None:
    uri = storage.join(dest, name, "config.pbtxt")
    return storage.read_bytes(uri).decode() if storage.exists(uri) else None


def _parameter(cfg: str, key: str) -> str | None:
    m = re.search(r'parameters: \{ key: "%s" value: \{ string_value: "([^"]*)" \} \}' % re.escape(key), cfg)
    return m.group(1) if m else None


def served_version(dest: str) -> int | None:
    """The version the config's version_policy makes Triton serve (the highest, if it names several);
    None when ``dest`` holds no model."""
    cfg = _config(dest)
    if cfg is None:
        return None
    m = re.search(r"version_policy: \{ specific: \{ versions: \[([\d, ]+)\] \} \}", cfg)
    if m:
        return max(int(v) for v in m.group(1).split(","))
    return max(versions(dest), default=None)  # latest or all: the highest version folder


def rollback(dest: str, to_version: int = 0) -> tuple[int, int]:
    """Point both models back at the version served before the current one (or ``to_version``),
    restoring the config that version was deployed with; returns (from, to). Writes no model files."""
    current = served_version(dest)
    existing = versions(dest)
    if current is None:
        raise ValueError(f"{dest} holds no deployed model to roll back")
    if to_version:
        if to_version not in existing:
            raise ValueError(f"--version {to_version} is not in {dest} (versions {', '.join(map(str, existing))})")
        if to_version == current:
            raise ValueError(f"version {to_version} is the one {dest} serves already")
        target = to_version
    else:
        previous = _parameter(_config(dest) or "", "previous_version")
        target = int(previous) if previous and int(previous) in existing else \
            max((v for v in existing if v < current), default=0)
        if not target:
            raise ValueError(f"nothing to roll back to: {dest} holds no version before {current}")
    configs = {}
    for name in (MODEL, STREAM_MODEL):
        src = storage.join(dest, name, str(target), DEPLOYED_CONFIG)
        if not storage.exists(src):
            raise ValueError(f"version {target} of {name} in {dest} has no {DEPLOYED_CONFIG} (written before "
                             "versioned deploys): deploy those weights again instead")
        cfg = storage.read_bytes(src).decode()
        configs[name] = re.sub(r"^version_policy: .*$", _version_policy(f"specific:{target}"), cfg, flags=re.M)
    for name, cfg in configs.items():
        storage.write_bytes(storage.join(dest, name, "config.pbtxt"), cfg.encode())
    return current, target


# -- warmup ---------------------------------------------------------------------------------------
WARMUP_PROMPT = "a person"


def warmup_request(native: dict[str, int], limits: Limits) -> dict[str, object]:
    """The smallest valid request: one step, 2 frames, at most 64x64 (a multiple of 8, within the
    limits), on a real face (the backend refuses an image without one, which would fail the load)."""
    import cv2

    from ..fixtures import package_face

    face = package_face("astronaut")[0:256, 96:352]  # head and shoulders
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(cv2.resize(face, (128, 128), interpolation=cv2.INTER_AREA),
                                                 cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not JPEG-encode the warmup face")

    def side(name: str) -> int:
        return max(8, min(64, native.get(name, 64), limits.max_resolution) // 8 * 8)

    return {"image": jpeg.tobytes(), "prompt": WARMUP_PROMPT, "steps": 1, "frames": min(2, limits.max_frames),
            "height": side("height"), "width": side("width")}


def _write_warmup(root: Path, request: dict[str, object]) -> dict[str, tuple[str, str]]:
    """Triton's warmup input files (``<model>/warmup/``) for both models, named by their content so the
    files of every version's config coexist; returns input -> (Triton type, file name)."""
    import hashlib
    import struct

    import numpy as np

    files: dict[str, tuple[str, str, bytes]] = {}
    for inp, value in request.items():
        ttype, dtype, _, _ = INPUTS[inp]
        if dtype is np.object_:  # TYPE_STRING elements: 4-byte little-endian length, then the bytes
            raw = value if isinstance(value, bytes) else str(value).encode()
            data = struct.pack("<I", len(raw)) + raw
            files[inp] = (ttype, f"{inp}_{hashlib.sha256(data).hexdigest()[:12]}", data)
        else:
            files[inp] = (ttype, f"{inp}_{value}", np.array([value], dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    for name in (MODEL, STREAM_MODEL):
        for _, file, data in files.values():
            target = root / name / "warmup" / file
            if not target.is_file() or target.read_bytes() != data:  # a loading server may be reading it
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    return {inp: (ttype, file) for inp, (ttype, file, _) in files.items()}


def resolve_weights(value: str, repository_root: str | os.PathLike) -> str | None:
    """The weights URI a model should load: '' -> None, relative -> under the repository root."""
    if not value:
        return None
    if storage.is_s3(value) or os.path.isabs(value):
        return value
    return str(Path(repository_root, value))
