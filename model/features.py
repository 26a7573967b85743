"""ID-Animator and DreaMoving features on the MotionCharacter pipeline.

    from motioncharacter.model.inference import generate, load_pipeline
    pipe = load_pipeline(preset="tiny")                        # or weights=..., base_checkpoint=...
    frames = generate(pipe, image="a.png", prompt="...", mode="id-animator", mix_image="b.png", mix_ratio=0.3)

``inference.generate`` takes these as keywords (the fields of ``FeatureOptions``) and comes here when
one is set or the video is longer than the motion module's training length; with none set it calls
the pipeline directly (same code, same output). Modes:

* ``motioncharacter`` (default): the MotionCharacter adapter (ID tokens + action/intensity control).
* ``id-animator``: ID-Animator's face adapter in the layout of its release (face_adapter.py; its
  ``animator.ckpt`` converts with id_animator_release.py): CLIP patch features of the face crop
  through a query-based resampler, LoRA-adapted cross-attention plus a decoupled face branch with
  weight lambda (``id_scale``), no motion control module (``action``/``intensity`` are not used).
* ``dreamoving``: DreaMoving's Content Guider: text + face (CLIP + face-recognition tokens, weight
  alpha_f = ``face_weight``) + optional cloth/body image (alpha_c = ``cloth_weight``), eq. 1.

Every mode combines with pose/depth ControlNets, SparseCtrl keyframes, identity mixing and
long videos through sliding context windows (FreeNoise).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import control as ctl
from .identity_mix import mix, validate_ratio
from .long_video import MAX_FRAMES, check_context, sliding_windows, training_length

logger = logging.getLogger("motioncharacter.model")

MODES = ("motioncharacter", "id-animator", "dreamoving")
MAX_WEIGHT = 5.0
# Optional sub-folders of a weights folder that the features read.
SUBFOLDERS = {"face_adapter": "face_adapter", "content_guider": "content_guider", "pose": "controlnet_pose",
              "depth": "controlnet_depth", "sparse": "sparsectrl"}


@dataclass
class FeatureOptions:
    """Per-request feature options (all optional; the defaults are the plain MotionCharacter call)."""

    mode: str = "motioncharacter"
    mix_image: object = None            # second identity (path or RGB uint8 array)
    mix_ratio: float | None = None      # 0 = only --image, 1 = only --mix-image (default 0.5 with a mix image)
    face_weight: float | None = None    # alpha_f, dreamoving only (default 1)
    cloth_image: object = None          # cloth/body image prompt, dreamoving only
    cloth_weight: float | None = None   # alpha_c (default 1 with a cloth image)
    pose_video: object = None           # video of pose maps (path, bytes or (F, H, W, 3) uint8)
    pose_keypoints: object = None       # OpenPose-style keypoint JSON (text or parsed; never a path)
    depth_video: object = None          # video of depth maps
    pose_scale: float = 1.0
    depth_scale: float = 1.0
    sparse_images: list = field(default_factory=list)   # SparseCtrl keyframes
    sparse_frames: list = field(default_factory=list)   # their frame indices
    sparse_scale: float = 1.0
    context_length: int | None = None   # FreeNoise window; auto when frames exceed the training length
    context_stride: int = 4

    def is_default(self) -> bool:
        d = FeatureOptions()
        return all(_same(getattr(self, f.name), getattr(d, f.name)) for f in fields(self))

    def check(self, frames: int, action: str = "") -> None:
        """Validate combinations before any model work (ValueError naming the option)."""
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.mix_ratio is not None and self.mix_image is None:
            raise ValueError("mix_ratio needs a mix_image (the second identity)")
        if self.mix_image is not None:
            validate_ratio(0.5 if self.mix_ratio is None else self.mix_ratio)
        dm = self.mode == "dreamoving"
        if self.face_weight is not None:
            if not dm:
                raise ValueError("face_weight (alpha_f) belongs to mode dreamoving; in other modes use id_scale")
            _weight("face_weight", self.face_weight)
        if self.cloth_weight is not None and self.cloth_image is None:
            raise ValueError("cloth_weight (alpha_c) needs a cloth_image")
        if self.cloth_image is not None:
            if not dm:
                raise ValueError("cloth_image is a Content Guider input: use mode dreamoving")
            _weight("cloth_weight", 1.0 if self.cloth_weight is None else self.cloth_weight)
        if action and self.mode != "motioncharacter":
            raise ValueError(f"action is MotionCharacter's motion control, which mode {self.mode} does not have; "
                             "describe the action in the prompt instead")
        if self.pose_video is not None and self.pose_keypoints is not None:
            raise ValueError("give pose_video or pose_keypoints, not both")
        for name in ("pose_scale", "depth_scale", "sparse_scale"):
            _weight(name, getattr(self, name))
        if len(self.sparse_images) != len(self.sparse_frames):
            raise ValueError(f"{len(self.sparse_images)} sparse control images but {len(self.sparse_frames)} "
                             "sparse frame indices: give one index per image")
        for i in self.sparse_frames:
            if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < frames:
                raise ValueError(f"sparse frame index {i!r} is outside [0, {frames - 1}]")
        if len(set(self.sparse_frames)) != len(self.sparse_frames):
            raise ValueError(f"sparse frame indices repeat: {list(self.sparse_frames)}")

    @property
    def uses_face(self) -> bool:
        return not (self.mode == "dreamoving" and self.face_weight == 0)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is b
    return a == b


def _weight(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) or not 0 <= v <= MAX_WEIGHT:
        raise ValueError(f"{name} must be a number in [0, {MAX_WEIGHT:g}], got {v!r}")
    return float(v)


# ---- parts the features load on first use --------------------------------------------------
def component(pipe, name: str):
    """The face adapter, content guider or a ControlNet, loaded on first use."""
    parts = pipe.__dict__.setdefault("feature_parts", {})
    if name in parts:
        return parts[name]
    src = getattr(pipe, "feature_sources", {"weights": None, "preset": None, "controlnets": {}})
    uri = src["controlnets"].get(name)
    sub = SUBFOLDERS[name]
    if uri is None and src["weights"] and not str(src["weights"]).startswith("s3://") \
            and (Path(src["weights"]) / sub).is_dir():
        uri = str(Path(src["weights"]) / sub)
    elif uri is None and src["weights"] and str(src["weights"]).startswith("s3://"):
        from motioncharacter import storage

        if storage.list_files(storage.join(src["weights"], sub)):
            uri = storage.join(src["weights"], sub)
    if name in ("face_adapter", "content_guider"):
        if uri:
            from motioncharacter import storage

            from .loading import refuse_pickles

            folder = Path(storage.local_copy(uri))
            refuse_pickles(folder)
            model = guider_class(folder).from_pretrained(folder, use_safetensors=True)
        else:
            tiny = _is_tiny(pipe)
            if not tiny:
                logger.warning("no %s/ in the weights; using an untrained %s (it adds nothing)", sub, name)
            model = fresh_guider(name, pipe.unet, pipe.image_encoder.config.hidden_size, _face_dim(pipe), tiny)
    else:
        if uri:
            model = ctl.load_controlnet(uri)
        elif _is_tiny(pipe):
            model = ctl.tiny_controlnet(name, seed={"pose": 11, "depth": 12, "sparse": 13}[name])
        else:
            flag = {"pose": "--pose-controlnet", "depth": "--depth-controlnet", "sparse": "--sparsectrl"}[name]
            raise ValueError(f"no {name} ControlNet: pass {flag} DIR_OR_URI or put {sub}/ in the weights folder")
    model.to(pipe.device)
    if model.dtype != pipe.unet.dtype:
        model.to(dtype=pipe.unet.dtype)
    parts[name] = model
    return model


# ID-Animator's face adapter at tiny widths: the release's layout with small sizes
TINY_FACE_ADAPTER = dict(num_queries=4, resampler_depth=2, resampler_heads=2, resampler_dim_head=16, lora_rank=4)


def fresh_guider(name: str, unet, clip_hidden_dim: int, face_dim: int, tiny: bool, seed: int | None = None):
    """An untrained face adapter (ID-Animator) or Content Guider (DreaMoving) for ``unet``: zero-output,
    except on the tiny preset, whose random image branches make every path visible in tests (the
    face adapter's LoRA still starts at zero, so lambda = 0 is the base model there)."""
    from .content_guider import ContentGuider
    from .face_adapter import IDAnimatorFaceAdapter

    seed = (1 if name == "face_adapter" else 2) if seed is None else seed
    if name == "face_adapter":
        return IDAnimatorFaceAdapter.for_unet(unet, clip_hidden_dim=clip_hidden_dim, seed=seed, zero_init=not tiny,
                                              **(TINY_FACE_ADAPTER if tiny else {}))
    return ContentGuider.for_unet(unet, clip_hidden_dim=clip_hidden_dim, face_dim=face_dim, seed=seed,
                                  zero_init=not tiny, **({"num_queries": 4} if tiny else {}))


def guider_class(folder: Path):
    """The model class a saved face_adapter/ or content_guider/ folder was written by (its config's
    ``_class_name``): face_adapter/ folders of earlier versions hold a ContentGuider."""
    import json

    from .content_guider import ContentGuider
    from .face_adapter import IDAnimatorFaceAdapter

    classes = {c.__name__: c for c in (ContentGuider, IDAnimatorFaceAdapter)}
    cfg = folder / "config.json"
    name = json.loads(cfg.read_text()).get("_class_name") if cfg.is_file() else None
    if name not in classes:
        raise ValueError(f"{folder} is not a face adapter or Content Guider folder (config.json names "
                         f"{name!r}; expected one of {', '.join(classes)}). Convert ID-Animator's animator.ckpt with "
                         "`motioncharacter weights assemble --face-adapter animator.ckpt --allow-pickle`")
    return classes[name]


def _is_tiny(pipe) -> bool:
    return getattr(pipe, "feature_sources", {}).get("preset") == "tiny" or pipe.unet.config.sample_size <= 32


def _face_dim(pipe) -> int:
    return 512 if getattr(pipe.face_embedder, "name", "") == "arcface" else 128


# ---- generation ------------------------------------------------------------------------------
def generate_features(pipe, opts: FeatureOptions, *, image, prompt, negative_prompt, action, intensity, id_scale,
                      motion_scale, steps, guidance, frames, height, width, seed, face_index, progress):
    """uint8 frames (F, H, W, 3) with the feature options (called by ``inference.generate``)."""

    # 1. validate everything and read every input before model work
    if isinstance(frames, bool) or not isinstance(frames, Integral) or not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"num_frames must be an integer in [1, {MAX_FRAMES}], got {frames!r}")
    max_len = training_length(pipe)
    rgb = pipe.check_inputs(image=image, prompt=prompt, negative_prompt=negative_prompt, action=action,
                            intensity=intensity, id_scale=id_scale, motion_scale=motion_scale,
                            num_inference_steps=steps, guidance_scale=guidance, num_frames=min(frames, max_len),
                            height=height, width=width, seed=seed, face_index=face_index)
    opts.check(frames, action)
    context = check_context(frames, opts.context_length, opts.context_stride, max_len)
    mix_rgb = _image(opts.mix_image, "mix_image") if opts.mix_image is not None else None
    cloth_rgb = _image(opts.cloth_image, "cloth_image") if opts.cloth_image is not None else None
    maps = {}
    if opts.pose_video is not None:
        maps["pose"] = ctl.load_maps(opts.pose_video, frames, height, width, "pose video")
    elif opts.pose_keypoints is not None:
        maps["pose"] = ctl.pose_maps_from_keypoints(opts.pose_keypoints, frames, height, width)
    if opts.depth_video is not None:
        maps["depth"] = ctl.load_maps(opts.depth_video, frames, height, width, "depth video")
    if opts.sparse_images:
        maps["sparse"] = np.stack([_resize(_image(im, f"sparse image {k}"), height, width)
                                   for k, im in enumerate(opts.sparse_images)])
    refs = [pipe.reference(rgb, face_index)] if opts.uses_face else []
    if mix_rgb is not None and opts.uses_face:
        refs.append(pipe.reference(mix_rgb, None))
    ratio = 0.5 if opts.mix_ratio is None else float(opts.mix_ratio)

    # 2. models and conditioning
    controls = []
    for kind, scale in (("pose", opts.pose_scale), ("depth", opts.depth_scale), ("sparse", opts.sparse_scale)):
        if kind in maps:
            c = ctl.Control(kind, component(pipe, kind), maps[kind], scale,
                            list(opts.sparse_frames) if kind == "sparse" else None)
            if c.sparse and frames > c.model.config.motion_max_seq_length:
                raise ValueError(f"the {kind} ControlNet has motion modules for at most "
                                 f"{c.model.config.motion_max_seq_length} frames; {frames} requested")
            if kind == "sparse" and not c.sparse:
                raise ValueError("sparse keyframes need a SparseControlNetModel (--sparsectrl)")
            controls.append(c)
    device, cfg = pipe.device, guidance > 1.0
    pipe._guidance_scale = guidance
    text, neg = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt)
    cond, uncond, layers = _conditioning(pipe, opts, refs, cloth_rgb, ratio, action, intensity, id_scale,
                                         motion_scale)
    if cfg:
        text = torch.cat([neg, text])
        cond = _cat(uncond, cond)
    text = text.repeat_interleave(frames, dim=0)
    prepared = [(c, ctl.prepare(c, frames, pipe.vae)) for c in controls]

    # 3. denoise (the MotionCharacter processors are restored afterwards)
    layers.attach(pipe.unet)
    try:
        with sliding_windows(pipe, context, opts.context_stride):
            return pipe.denoise(text, cond, num_frames=frames, height=height, width=width, steps=steps,
                                guidance=guidance, seed=seed, progress=progress,
                                residuals=lambda inp, t: ctl.residuals(prepared, inp, t, text))
    finally:
        pipe.adapter.attach(pipe.unet)


def _conditioning(pipe, opts, refs, cloth_rgb, ratio, action, intensity, id_scale, motion_scale):
    """(conditional, unconditional, model whose processors to attach)."""
    from .content_guider import GuiderConditioning

    if opts.mode == "motioncharacter":
        clip, face = pipe.encode_reference(refs[0])
        if len(refs) == 2:
            clip2, face2 = pipe.encode_reference(refs[1])
            clip, face = mix(clip, clip2, ratio), mix(face, face2, ratio, unit=True)
        c = pipe.adapter.conditioning(clip_embeds=clip, face_embeds=face, action_embeds=pipe.encode_action(action),
                                      intensity=[float(intensity)], id_scale=id_scale, motion_scale=motion_scale,
                                      ref_pixels=pipe.reference_pixels(refs[0]))
        return c, c.unconditional(), pipe.adapter

    dm = opts.mode == "dreamoving"
    guider = component(pipe, "content_guider" if dm else "face_adapter")
    face_tokens = cloth_tokens = None
    if refs:
        hidden = [_clip_hidden(pipe, r.crop) for r in refs]
        ids = [torch.from_numpy(r.face_embedding).to(pipe.device, hidden[0].dtype)[None] for r in refs] if dm else None
        h = hidden[0] if len(refs) == 1 else mix(hidden[0], hidden[1], ratio)
        e = None if not dm else (ids[0] if len(refs) == 1 else mix(ids[0], ids[1], ratio, unit=True))
        face_tokens = guider.face_tokens(h, e)
    if cloth_rgb is not None:
        cloth_tokens = guider.cloth_tokens(_clip_hidden(pipe, cloth_rgb))
    face_scale = (1.0 if opts.face_weight is None else opts.face_weight) if dm else id_scale
    cloth_scale = (1.0 if opts.cloth_weight is None else opts.cloth_weight) if cloth_rgb is not None else 0.0
    c = GuiderConditioning(face_tokens, cloth_tokens, face_scale, cloth_scale)
    z = (lambda x: None if x is None else torch.zeros_like(x))
    if not dm and face_tokens is not None:
        # ID-Animator's "no image": the tokens of an all-zero CLIP input, as its release and training use
        return c, GuiderConditioning(guider.face_tokens(_clip_hidden(pipe, None)), None, face_scale, 0.0), guider
    return c, GuiderConditioning(z(face_tokens), z(cloth_tokens), face_scale, cloth_scale), guider


def _cat(u, c):
    """Stack the unconditional and conditional conditionings along the batch (same type and scales)."""
    if hasattr(type(c), "cat"):
        return type(c).cat(u, c)
    kw = {}
    for f in fields(c):
        a, b = getattr(u, f.name), getattr(c, f.name)
        kw[f.name] = torch.cat([a, b]) if isinstance(b, torch.Tensor) else b
    return type(c)(**kw)


def _clip_hidden(pipe, rgb: np.ndarray | None) -> torch.Tensor:
    """CLIP image encoder's penultimate hidden states (1, N, hidden): the resampler's input.
    ``None``: of all-zero (normalised) pixels, ID-Animator's unconditional image."""
    from .face_adapter import clip_zero_pixels

    enc = pipe.image_encoder
    px = clip_zero_pixels(pipe.feature_extractor) if rgb is None else \
        pipe.feature_extractor(images=rgb, return_tensors="pt").pixel_values
    return enc(px.to(pipe.device, enc.dtype), output_hidden_states=True).hidden_states[-2]


def _image(image, name: str) -> np.ndarray:
    from .pipeline import load_reference_image

    try:
        return load_reference_image(image)
    except FileNotFoundError:
        raise ValueError(f"{name} {image}: no such file") from None
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    return rgb if rgb.shape[:2] == (height, width) else cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
