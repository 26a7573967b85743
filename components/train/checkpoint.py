"""Checkpoint layout under the output URI (a folder or s3:// prefix):

  OUT/checkpoints/step-00000500/   DeepSpeed state (every rank's shards), state.json,
                                   adapter/ (safetensors, for inference)
  OUT/checkpoints/latest           the tag of the newest complete checkpoint, written last
  OUT/adapter/                     the final adapter export

``latest`` is only rewritten after every file of a checkpoint is in place, so a run
killed while saving resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from motioncharacter import storage

ROOT = "checkpoints"


def tag(step: int) -> str:
    return f"step-{step:08d}"


def root(output: str) -> str:
    return storage.join(output, ROOT)


def latest(output: str) -> str | None:
    uri = storage.join(root(output), "latest")
    if not storage.exists(uri):
        return None
    return storage.read_bytes(uri).decode().strip() or None


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


def publish(output: str, step_tag: str, local_root: Path, upload: bool) -> None:
    """Upload a staged checkpoint to s3:// (``upload`` on one process per node)."""
    if storage.is_s3(output) and upload:
        storage.upload_dir(local_root / step_tag, storage.join(root(output), step_tag))
        shutil.rmtree(local_root / step_tag, ignore_errors=True)


def mark_latest(output: str, step_tag: str) -> None:
    storage.write_bytes(storage.join(root(output), "latest"), (step_tag + "\n").encode())


def fetch(output: str, step_tag: str, download: bool = True) -> Path:
    """The checkpoint as a local folder (downloaded from s3:// when ``download``; on one process
    per node, the others pass False and find it there); returns its root."""
    local_root = staging_dir(output)
    if storage.is_s3(output) and download:
        storage.download_dir(storage.join(root(output), step_tag), local_root / step_tag)
    if not (local_root / step_tag / "state.json").is_file():
        raise FileNotFoundError(f"checkpoint {storage.join(root(output), step_tag)} is incomplete (no state.json)")
    return local_root


def state(output: str, step_tag: str) -> dict:
    """A checkpoint's state.json (step, world_size, zero_stage, mlflow_run_id), read where it lies."""
    return json.loads(storage.read_bytes(storage.join(root(output), step_tag, "state.json")))
