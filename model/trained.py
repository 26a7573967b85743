"""What a training run exports, and a full weights folder made from it and its base.

A run writes, next to its checkpoints, the part it trained: adapter/ (MotionCharacter), face_adapter/
(train.mode id-animator) or content_guider/ (train.mode dreamoving), plus motion_adapter/ when
model.train_motion_module trained the temporal layers. generate, evaluate and deploy take one
``--weights`` folder, so the pipeline and the Model Registry both lay those parts over the base here.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from motioncharacter import storage

PRIMARY_PARTS = ("adapter", "face_adapter", "content_guider")   # one per train.mode
TRAINED_PARTS = PRIMARY_PARTS + ("motion_adapter",)


def exported_parts(train_output: str) -> list[str]:
    """The sub-folders of ``train_output`` that training exported (each has its config.json)."""
    return [s for s in TRAINED_PARTS if storage.exists(storage.join(train_output, s, "config.json"))]


def primary_part(parts: list[str], where: str) -> str:
    found = [p for p in parts if p in PRIMARY_PARTS]
    if not found:
        raise FileNotFoundError(f"{where} holds no trained {', '.join(p + '/' for p in PRIMARY_PARTS)}")
    return found[0]


def assemble(train_output: str, preset: str, base_weights: str, dest: str) -> str:
    """A full weights folder at ``dest`` (a folder or s3:// prefix): the base (``preset`` "tiny", else
    ``base_weights``) with every part ``train_output`` exported in place of the base's own."""
    parts = exported_parts(train_output)
    primary_part(parts, train_output)
    if storage.is_s3(dest):
        local = Path(tempfile.mkdtemp(prefix="mc-weights-", dir=storage.cache_dir()))
    else:
        local = Path(dest)
        local.mkdir(parents=True, exist_ok=True)
    if preset:
        from .presets import save_tiny_weights

        save_tiny_weights(local, with_adapter=False)
    elif storage.is_s3(base_weights):
        storage.download_dir(base_weights, local)
    else:
        shutil.copytree(base_weights, local, dirs_exist_ok=True)
    for sub in parts:
        if (local / sub).exists():
            shutil.rmtree(local / sub)
        storage.download_dir(storage.join(train_output, sub), local / sub)
    if storage.is_s3(dest):
        storage.upload_dir(local, dest)
    return dest
