"""Checkpoint layout under the output URI (a folder or s3:// prefix):

  OUT/checkpoints/step-00000500/   DeepSpeed state (every rank's shards), state.json,
                                   adapter/ (safetensors, for inference)
  OUT/checkpoints/latest           the tag of the newest complete checkpoint, written last
  OUT/adapter/                     the final adapter export

``latest`` is only rewritten after every file of a checkpoint is in place, so a run
killed while saving resumes from the previous checkpoint.

DeepSpeed state is pickled, so it is trusted only from the run's own ``OUT/checkpoints/``
(a prefix only training may write): ``latest`` must name a ``step-NNNNNNNN`` tag, and nothing
a checkpoint holds may lead outside that folder. It is then unpickled with
``weights_only=True`` and an allow-list of the few DeepSpeed types its files contain, so a
foreign object in a shard is refused instead of run.
"""
from __future__ import annotations

import functools
import json
import pickle
import re
import shutil
import tempfile
from pathlib import Path

from motioncharacter import storage

ROOT = "checkpoints"
TAG = re.compile(r"step-\d{8}")  # what tag() writes; anything else in `latest` is refused


class UntrustedCheckpoint(ValueError):
    """Checkpoint state that would come from outside the run's own checkpoints/ folder."""


def check_tag(output: str, step_tag: str) -> str:
    """``step_tag`` if it names a checkpoint folder directly inside OUT/checkpoints/."""
    if not TAG.fullmatch(step_tag):
        raise UntrustedCheckpoint(
            f"{storage.join(root(output), 'latest')} names {step_tag!r}, not a checkpoint tag of this run "
            f"(step-NNNNNNNN): refusing to load training state from outside {root(output)}/. "
            "Remove or fix that file, or train into a fresh --output")
    return step_tag


def tag(step: int) -> str:
    return f"step-{step:08d}"


def root(output: str) -> str:
    return storage.join(output, ROOT)


def latest(output: str) -> str | None:
    uri = storage.join(root(output), "latest")
    if not storage.exists(uri):
        return None
    step_tag = storage.read_bytes(uri).decode().strip()
    return check_tag(output, step_tag) if step_tag else None


def staging_dir(output: str) -> Path:
    """Where DeepSpeed writes: the output folder itself, or a local staging copy for s3://."""
    if not storage.is_s3(output):
        p = Path(root(output))
        p.mkdir(parents=True, exist_ok=True)
        return p
    p = Path(tempfile.gettempdir()) / "motioncharacter-ckpt" / storage.parse_s3(output)[0] / \
        storage.parse_s3(output)[1].strip("/").replace("/", "__")
    p.mkdir(parents=True, exist_ok=True)
    return p


# An object store restarting (a pod rescheduled, a node drained) is waited out for this long before a
# checkpoint upload fails the run; the storage layer's own retries cover about a second.
PUBLISH_PATIENCE_S = 300.0


def publish(output: str, step_tag: str, local_root: Path, upload: bool,
            patience_s: float = PUBLISH_PATIENCE_S) -> None:
    """Upload a staged checkpoint to s3:// (``upload`` on one process per node), waiting out an
    unreachable store for up to ``patience_s``; then a StoreUnavailable that names what is safe."""
    import logging
    import time

    if not (storage.is_s3(output) and upload):
        return
    dest = storage.join(root(output), step_tag)
    deadline, delay, warned = time.monotonic() + patience_s, 2.0, False
    while True:
        try:
            storage.upload_dir(local_root / step_tag, dest)
            break
        except storage.StoreUnavailable as e:
            if time.monotonic() + delay > deadline:
                try:
                    last = latest(output)
                except storage.StorageError:  # still down
                    last = None
                raise storage.StoreUnavailable(
                    f"checkpoint {step_tag} could not be uploaded to {dest} within {patience_s:g} s ({e}). It is "
                    f"staged at {local_root / step_tag}; the last uploaded checkpoint is "
                    f"{last or 'the one `latest` names'}, and `--resume` continues from it") from None
            if not warned:
                logging.getLogger(__name__).warning("object store unreachable while uploading checkpoint %s; "
                                                    "trying again for up to %g s", step_tag, patience_s)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    shutil.rmtree(local_root / step_tag, ignore_errors=True)



def mark_latest(output: str, step_tag: str) -> None:
    storage.write_bytes(storage.join(root(output), "latest"), (step_tag + "\n").encode())


def _inside(folder: Path, path: Path, output: str, step_tag: str) -> Path:
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UntrustedCheckpoint(f"checkpoint {storage.join(root(output), step_tag)} leads outside its folder "
                                  f"({path} -> {path.resolve()}): refusing to load training state from it")
    return path


def fetch(output: str, step_tag: str, download: bool = True) -> Path:
    """The checkpoint as a local folder (downloaded from s3:// when ``download``; on one process
    per node, the others pass False and find it there); returns its root. Every file must lie
    inside the checkpoint's own folder: no ``..`` key, no symlink out."""
    check_tag(output, step_tag)
    local_root = staging_dir(output)
    folder = local_root / step_tag
    if storage.is_s3(output) and download:
        src = storage.join(root(output), step_tag)
        for f in storage.list_files(src):
            storage.download_file(f, _inside(folder, folder / f[len(src):].lstrip("/"), output, step_tag))
    for f in [folder, *folder.rglob("*")] if folder.exists() else []:
        _inside(folder if f != folder else local_root, f, output, step_tag)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"checkpoint {storage.join(root(output), step_tag)} is incomplete (no state.json)")
    return local_root


def state(output: str, step_tag: str) -> dict:
    """A checkpoint's state.json (step, world_size, zero_stage, mlflow_run_id), read where it lies."""
    check_tag(output, step_tag)
    return json.loads(storage.read_bytes(storage.join(root(output), step_tag, "state.json")))


# ---- unpickling DeepSpeed state with an allow-list -------------------------------------------------

def allowed_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO 1-3 / bf16 checkpoints pickle (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on this project's checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@functools.cache
def _safe_engine_class():
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine, but its ``load`` (hard-wired to weights_only=False) unpickles
        only tensors, containers and ``allowed_globals()``."""

        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed_globals()):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:  # what torch raises for a global outside the list
                raise UntrustedCheckpoint(
                    f"{path} pickles something outside the DeepSpeed allow-list, so it was not loaded "
                    f"(unpickling it could run code): {str(e).splitlines()[0]}") from None

    return WeightsOnlyCheckpointEngine


def load(engine, local_root: Path, step_tag: str) -> None:
    """``engine.load_checkpoint`` of a fetched checkpoint, unpickling with the allow-list."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    safe_class, current = _safe_engine_class(), engine.checkpoint_engine
    if not isinstance(current, safe_class):
        if type(current) is not TorchCheckpointEngine:  # nebula, fast, decoupled: their own torch.load
            raise UntrustedCheckpoint(f"DeepSpeed checkpoint engine {type(current).__name__} unpickles without "
                                      "an allow-list; resume with DeepSpeed's default (torch) checkpoint engine")
        engine.checkpoint_engine = safe_class(None)
        engine.checkpoint_engine.zipfile_serialization = current.zipfile_serialization
    engine.load_checkpoint(str(local_root), tag=step_tag)
    replay_cpu_adam_bias_correction(engine)


def replay_cpu_adam_bias_correction(engine) -> bool:
    """Make DeepSpeed's CPU Adam continue bit for bit after a resume.

    On CPU both FusedAdam and DeepSpeedCPUAdam run DeepSpeed's C++ Adam, which keeps beta^step as a
    float multiplied once per step; the first step after a resume jumps, and is computed with
    pow(beta, step) instead: another last bit, so a resumed run's weights drifted ~1e-8 from an
    uninterrupted run's although every saved tensor restores exactly (measured here). Replaying steps
    1..step on empty tensors rebuilds the product an uninterrupted run holds; nothing else changes.
    (CUDA's kernels compute the correction from the step each time.) Returns whether it replayed."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    opt = engine.optimizer
    while opt is not None and not isinstance(opt, (DeepSpeedCPUAdam, FusedAdam)):
        opt = getattr(opt, "optimizer", None)
    steps = {int(st["step"]) for st in (opt.state.values() if opt is not None else ()) if "step" in st}
    if len(steps) != 1 or (isinstance(opt, FusedAdam) and get_accelerator().device_name() != "cpu"):
        return False
    e, g = torch.empty(0, dtype=torch.float32), opt.param_groups[0]
    hyper = (g["lr"], g["betas"][0], g["betas"][1], g["eps"])
    for s in range(1, steps.pop() + 1):
        if isinstance(opt, DeepSpeedCPUAdam):
            opt.ds_opt_adam.adam_update(opt.opt_id, s, *hyper, g["weight_decay"], g["bias_correction"], e, e, e, e)
        else:  # the C++ side of FusedAdam's multi_tensor_adam: one (empty) tensor per list
            opt.multi_tensor_adam(2048 * 32, opt._dummy_overflow_buf, [[e], [e], [e], [e]], *hyper, s,
                                  opt.adam_w_mode, int(g["bias_correction"]), g["weight_decay"])
    return True
