"""The one generation entry point that serving, evaluation, training previews and the CLI call.

    pipe = load_pipeline(weights="s3://models/base", device="cuda")   # or preset="tiny"
    frames = generate(pipe, image="face.jpg", prompt="a man talking", action="talking", intensity=8)
    frames = generate(pipe, image="a.png", prompt="...", mode="id-animator", pose_video="pose.mp4")

The ID-Animator / DreaMoving modes, ControlNets, identity mixing and long videos are keywords of the
same ``generate`` (``features.FeatureOptions``); the pipeline's own ``__call__`` is diffusers-shaped.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from .pipeline import MotionCharacterPipeline

logger = logging.getLogger("motioncharacter.model")


def load_pipeline(weights: str | None = None, preset: str | None = None, device: str = "cpu",
                  arcface_pack: str | None = None, scheduler: str | None = None, acceleration=None,
                  base_checkpoint: str | None = None, controlnets: dict[str, str] | None = None,
                  dtype: str | None = "auto", vae_upcast: bool | None = None) -> MotionCharacterPipeline:
    """A ready MotionCharacterPipeline from a weights folder / s3:// URI, or ``preset="tiny"``.

    Face embeddings come from ArcFace when ``arcface_pack`` (a folder or s3:// URI holding an
    insightface recognition .onnx) is given, else from the offline SFace model; the name
    is in ``pipe.face_embedder.name``. A weights folder without adapter/ gets a fresh,
    zero-output adapter (the base AnimateDiff behaviour) and a warning. ``scheduler``: one of
    ``model.schedulers.SCHEDULERS`` (default: the weights' own, DDIM). ``acceleration``: speed and
    memory options (``model.acceleration.Acceleration``; default: its defaults).
    ``base_checkpoint``: a community SD1.5 checkpoint (diffusers folder or single-file .safetensors)
    as the base. ``controlnets={"pose"|"depth"|"sparse": uri}``: explicit ControlNet folders (default:
    the weights folder's controlnet_pose/, controlnet_depth/, sparsectrl/; random tiny ones for the
    tiny preset), loaded on first use like the face adapter and Content Guider.
    ``dtype``: fp32 | fp16 | bf16 | auto (fp16 on CUDA, fp32 on a CPU; fp16 on a CPU is refused);
    ``vae_upcast``: decode in fp32 (default: on for fp16). What runs in which precision:
    ``model.precision``; ``precision.running(pipe)`` names the one in use.
    """
    from motioncharacter.faces import embedder

    from . import control
    from . import precision
    from .adapter import MotionCharacterAdapter
    from .presets import PRESETS, build_tiny

    precision.resolve(dtype, device)  # before minutes of loading: fp16 on a CPU is refused
    if (weights is None) == (preset is None):
        raise ValueError("pass exactly one of weights (a folder or s3:// URI) and preset (e.g. 'tiny')")
    for kind in controlnets or {}:
        if kind not in control.KINDS:
            raise ValueError(f"unknown ControlNet kind {kind!r}; choose from {', '.join(control.KINDS)}")
    if preset == "mini":
        from .presets import mini_weights

        weights, preset = mini_weights(), None
    face = embedder(arcface_pack)
    face_dim = 512 if face.name == "arcface" else 128
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        parts = build_tiny()
        parts["unet"] = _motion(parts)
        parts["adapter"] = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=face_dim,
                                                           seed=0)
    else:
        from .loading import load_components

        parts = load_components(weights)
        if parts["adapter"] is None:
            logger.warning("%s has no adapter/; using an untrained adapter (output = base AnimateDiff)", weights)
            parts["adapter"] = MotionCharacterAdapter.for_unet(
                parts["unet"], clip_image_dim=parts["image_encoder"].config.projection_dim, face_dim=face_dim,
                **((parts.get("info") or {}).get("adapter") or {}))
    pipe = pipeline_from_parts(parts, face, device=device, dtype=dtype, vae_upcast=vae_upcast,
                               scheduler=scheduler, acceleration=acceleration)
    if base_checkpoint:
        from .community import apply_base_checkpoint, base_unet_config

        apply_base_checkpoint(pipe, base_checkpoint, base_unet_config(weights, preset))
    pipe.feature_sources = dict(weights=weights, preset=preset, controlnets=dict(controlnets or {}))
    return pipe


def pipeline_from_parts(parts: dict, face, *, device: str = "cpu", dtype: str | None = "auto",
                        vae_upcast: bool | None = None, scheduler: str | None = None,
                        acceleration=None) -> MotionCharacterPipeline:
    """``load_pipeline``'s second half, for components already built (``parts``: the pipeline's
    components, an optional "info" dict; ``face``: a face embedder): precision, device, scheduler and
    speed options set the same way. bench/bench_gpu.py builds random real-width models through it."""
    from . import precision
    from .acceleration import Acceleration
    from .schedulers import use_scheduler

    torch_dtype = precision.resolve(dtype, device)
    pipe = MotionCharacterPipeline(**{k: v for k, v in parts.items() if k != "info"})
    pipe.face_embedder = face
    pipe.defaults = native_defaults(pipe.unet.config.sample_size, pipe.vae_scale_factor, parts.get("info"))
    use_scheduler(pipe, scheduler)
    precision.apply(pipe, torch_dtype, vae_upcast)  # cast on the host, then move: no fp32 copy on the device
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    (acceleration or Acceleration()).apply(pipe)
    pipe.feature_sources = dict(weights=None, preset=None, controlnets={})
    pipe.feature_parts = {}
    return pipe


def native_defaults(unet_sample_size: int, vae_scale_factor: int, info: dict | None = None) -> dict:
    """Generation sizes that suit the weights: diffusers' rule (UNet sample size x VAE factor); a model
    that small (the tiny preset, or tiny weights saved to a folder) gets smoke-test frames/steps too;
    a folder's motioncharacter.json (the trained mini base writes one) says what it was trained for."""
    from .presets import TINY

    native = int(unet_sample_size) * int(vae_scale_factor)
    small = native <= TINY["height"]
    d = dict(frames=TINY["frames"] if small else 16, height=native, width=native,
             steps=TINY["steps"] if small else 30)  # the paper's 30
    d.update({k: int(v) for k, v in ((info or {}).get("defaults") or {}).items() if k in d})
    return d


def weights_defaults(weights: str | None = None, preset: str | None = None) -> dict:
    """``native_defaults`` of a weights folder / s3:// prefix or a preset, from its config files only
    (no model is loaded): what `deploy` records for the server to advertise."""
    import json

    from motioncharacter import storage

    from .loading import WEIGHTS_INFO
    from .presets import PRESETS, TINY

    if preset == "mini":
        from .presets import mini_weights

        weights, preset = mini_weights(), None
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        return {k: TINY[k] for k in ("frames", "height", "width", "steps")}

    def read(rel: str) -> dict | None:
        uri = storage.join(weights, rel)
        return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None

    unet, vae = read("unet/config.json"), read("vae/config.json")
    if unet is None or vae is None:
        raise FileNotFoundError(f"{weights} is not a MotionCharacter weights folder: unet/config.json and "
                                "vae/config.json are needed to know its native size")
    factor = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)  # as the pipeline computes it
    return native_defaults(unet.get("sample_size", 64), factor, read(WEIGHTS_INFO))


def _motion(parts: dict):
    from .motion_module import motion_unet

    unet = motion_unet(parts["unet"], parts["motion_adapter"])
    parts["motion_adapter"] = None
    return unet


def generate(pipe: MotionCharacterPipeline, *, image: np.ndarray | str, prompt: str, negative_prompt: str = "",
             action: str = "", intensity: float = 10.0, id_scale: float = 1.0, motion_scale: float = 1.0,
             steps: int = 30, guidance: float = 8.0, frames: int = 16, height: int = 512, width: int = 512,
             seed: int = 0, face_index: int | None = None,
             progress: Callable[[int, int], None] | None = None, **features) -> np.ndarray:
    """uint8 frames (F, H, W, 3). Every argument is validated first (ValueError naming it);
    a reference without exactly one face raises motioncharacter.faces.FaceError (a ValueError)
    unless ``face_index`` picks one. ``features``: the fields of ``features.FeatureOptions`` (mode,
    ControlNet inputs, identity mixing, context windows). The defaults suit real SD1.5 weights; for
    the tiny preset pass small sizes, e.g. ``**pipe.defaults`` (frames=8, height=width=64, steps=4)."""
    from dataclasses import fields

    from .features import FeatureOptions, generate_features
    from .long_video import training_length

    unknown = set(features) - {f.name for f in fields(FeatureOptions)}
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
    opts = FeatureOptions(**features)
    with torch.inference_mode():
        if not opts.is_default() or (isinstance(frames, int) and frames > training_length(pipe)):
            return generate_features(pipe, opts, image=image, prompt=prompt, negative_prompt=negative_prompt,
                                     action=action, intensity=intensity, id_scale=id_scale,
                                     motion_scale=motion_scale, steps=steps, guidance=guidance, frames=frames,
                                     height=height, width=width, seed=seed, face_index=face_index,
                                     progress=progress)
        return pipe(image=image, prompt=prompt, negative_prompt=negative_prompt, action=action, intensity=intensity,
                    id_scale=id_scale, motion_scale=motion_scale, num_inference_steps=steps,
                    guidance_scale=guidance, num_frames=frames, height=height, width=width, seed=seed,
                    face_index=face_index, progress=progress, output_type="uint8", return_dict=False)
