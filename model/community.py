"""Community SD1.5 checkpoints as the base (ID-Animator sec. 4.3.4): swap the UNet's spatial weights
(and the VAE / text encoder when the checkpoint has them) while keeping the motion modules, the
MotionCharacter adapter and the image adapters.

Accepted: a diffusers folder (``unet/`` [+ ``vae/``, ``text_encoder/``], or a bare UNet folder) or a
single-file ``.safetensors`` in the original Stable Diffusion key layout, converted by diffusers'
``from_single_file``. Community fine-tunes share SD1.5's architecture, so the base model's own
configs are handed to the converter (nothing is downloaded); a checkpoint of another architecture
is refused with the keys that do not fit.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from motioncharacter import storage

logger = logging.getLogger("motioncharacter.model")

LDM_VAE = "first_stage_model."
LDM_TEXT = "cond_stage_model.transformer."


def base_unet_config(weights: str | None, preset: str | None) -> dict:
    """The SD UNet2DConditionModel config of the loaded base (the converter's architecture)."""
    if preset:
        from .presets import tiny_unet_config

        from diffusers import UNet2DConditionModel

        return dict(UNet2DConditionModel(**tiny_unet_config()).config)
    cfg = Path(storage.local_copy(storage.join(weights, "unet", "config.json")))
    return json.loads(cfg.read_text())


def apply_base_checkpoint(pipe, uri: str, unet_config: dict) -> dict:
    """Load ``uri`` into ``pipe`` in place; returns which parts were replaced."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(storage.local_copy(uri))
    replaced = {}
    if path.is_dir():
        from .loading import refuse_pickles

        refuse_pickles(path)
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        unet2d = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True)
        if (path / "vae").is_dir():
            replaced["vae"] = AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True)
        if (path / "text_encoder").is_dir():
            from transformers import CLIPTextModel

            te = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
            _load_strict(pipe.text_encoder, te.state_dict(), "text encoder")
            replaced["text_encoder"] = True
    elif path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        with tempfile.TemporaryDirectory() as cfg:
            (Path(cfg) / "unet").mkdir()
            (Path(cfg) / "unet" / "config.json").write_text(json.dumps({k: v for k, v in unet_config.items()
                                                                        if not k.startswith("_")} |
                                                                       {"_class_name": "UNet2DConditionModel"}))
            try:  # diffusers' conversion fails deep inside (KeyError, shape errors) on a foreign layout
                unet2d = UNet2DConditionModel.from_single_file(str(path), config=cfg, subfolder="unet",
                                                               local_files_only=True)
                if any(k.startswith(LDM_VAE) for k in keys):
                    pipe.vae.save_config(Path(cfg) / "vae")
                    replaced["vae"] = AutoencoderKL.from_single_file(str(path), config=cfg, subfolder="vae",
                                                                     local_files_only=True)
            except Exception as e:
                raise ValueError(f"{uri} is not a single-file SD1.5 checkpoint that fits this base "
                                 f"({type(e).__name__}: {str(e)[:200]})") from e
        if any(k.startswith(LDM_TEXT) for k in keys):
            from safetensors.torch import load_file

            sd = {k[len(LDM_TEXT):]: v for k, v in load_file(str(path)).items() if k.startswith(LDM_TEXT)}
            sd.pop("text_model.embeddings.position_ids", None)
            _load_strict(pipe.text_encoder, sd, "text encoder")
            replaced["text_encoder"] = True
    elif path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ValueError(f"{uri} is a pickled checkpoint, which can run code when loaded; convert it to "
                         ".safetensors first")
    else:
        raise ValueError(f"{uri} is neither a diffusers folder nor a .safetensors file")

    missing, unexpected = pipe.unet.load_state_dict(unet2d.state_dict(), strict=False)
    spatial_missing = [k for k in missing if "motion_modules" not in k]
    if unexpected or spatial_missing:
        raise ValueError(f"{uri} does not fit this SD1.5 base: unexpected {unexpected[:3]}, "
                         f"missing {spatial_missing[:3]}")
    replaced["unet"] = True
    if "vae" in replaced:
        _load_strict(pipe.vae, replaced["vae"].state_dict(), "VAE")
        replaced["vae"] = True
    pipe.to(pipe.device)
    logger.info("base checkpoint %s: replaced %s", uri, ", ".join(replaced))
    return replaced


def _load_strict(module: torch.nn.Module, state: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint's {what} does not fit the base: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
