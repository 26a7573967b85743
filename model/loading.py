"""Loading and saving: base weights in the diffusers layout, the adapter on its own.

A weights folder (local or s3://) holds unet/ (SD1.5 UNet2DConditionModel), motion_adapter/
(AnimateDiff MotionAdapter), vae/, text_encoder/, tokenizer/, image_encoder/
(CLIPVisionModelWithProjection, e.g. IP-Adapter's), optionally feature_extractor/,
scheduler/ and adapter/ (a trained MotionCharacterAdapter). Only safetensors are read
unless the caller passes ``allow_pickle=True``: pickled checkpoints can run code on load.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from motioncharacter import storage

logger = logging.getLogger("motioncharacter.model")

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
REQUIRED = ("unet", "motion_adapter", "vae", "text_encoder", "tokenizer", "image_encoder")
ADAPTER_DIR = "adapter"
WEIGHTS_INFO = "motioncharacter.json"  # optional: generation defaults and lineage of a weights folder


def refuse_pickles(folder: Path, allow_pickle: bool = False) -> None:
    bad = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if bad and not allow_pickle:
        if not any(folder.rglob("*.safetensors")) or _only_pickled_weights(folder):
            raise ValueError(f"{folder} holds pickled weights ({', '.join(bad[:3])}); pickles can run code when "
                             "loaded. Convert them to safetensors or pass allow_pickle=True if you trust the source")
        logger.info("ignoring pickled files %s; safetensors are used", bad[:3])


def _only_pickled_weights(folder: Path) -> bool:
    """True when some model sub-folder has pickled weights but no safetensors."""
    for sub in {p.parent for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES}:
        if not any(sub.glob("*.safetensors")):
            return True
    return False


def load_components(weights: str, device: str = "cpu", allow_pickle: bool = False) -> dict:
    """Read a weights folder or s3:// prefix into the components of MotionCharacterPipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from .motion_module import motion_unet
    from .presets import animatediff_scheduler_config

    root = Path(storage.local_copy(weights))
    missing = [d for d in REQUIRED if not (root / d).is_dir()]
    if missing:
        raise FileNotFoundError(f"{weights} is not a MotionCharacter weights folder: missing {', '.join(missing)}/ "
                                f"(expected {', '.join(REQUIRED)})")
    refuse_pickles(root, allow_pickle)
    st = None if allow_pickle else True
    unet2d = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=st)
    parts = dict(
        unet=motion_unet(unet2d, MotionAdapter.from_pretrained(root / "motion_adapter", use_safetensors=st)),
        vae=AutoencoderKL.from_pretrained(root / "vae", use_safetensors=st),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=st),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder", use_safetensors=st),
    )
    parts["motion_adapter"] = None  # already merged into the UNetMotionModel
    fe = root / "feature_extractor"
    parts["feature_extractor"] = CLIPImageProcessor.from_pretrained(fe) if fe.is_dir() else CLIPImageProcessor()
    sc = root / "scheduler"
    parts["scheduler"] = (DDIMScheduler.from_pretrained(sc) if sc.is_dir()
                          else DDIMScheduler(**animatediff_scheduler_config()))
    parts["adapter"] = load_adapter(root / ADAPTER_DIR, allow_pickle) if (root / ADAPTER_DIR).is_dir() else None
    info = root / WEIGHTS_INFO
    parts["info"] = json.loads(info.read_text()) if info.is_file() else {}
    return parts


def save_adapter(adapter, uri: str) -> str:
    """Write the adapter (config.json + diffusion_pytorch_model.safetensors) to a folder or s3://."""
    if not storage.is_s3(uri):
        adapter.save_pretrained(uri, safe_serialization=True)
        return str(uri)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        adapter.save_pretrained(tmp, safe_serialization=True)
        storage.upload_dir(tmp, uri)
    return uri


def load_adapter(uri: str | Path, allow_pickle: bool = False):
    from .adapter import MotionCharacterAdapter

    folder = Path(storage.local_copy(str(uri)))
    refuse_pickles(folder, allow_pickle)
    return MotionCharacterAdapter.from_pretrained(folder, use_safetensors=None if allow_pickle else True)
