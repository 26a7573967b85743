"""MotionCharacterPipeline: diffusers' AnimateDiffPipeline plus a reference face, an action
phrase and a motion intensity.

It reuses the parent's prompt encoding, latent preparation, scheduler stepping and VAE
decoding; only the conditioning is new. Classifier-free guidance drops every condition
at once: the unconditional branch gets the negative prompt and no ID, action or motion
branch at all (per-sample keep masks, see ``MCConditioning``), i.e. it is exactly the base
AnimateDiff prediction; training's joint condition dropout teaches the same "no condition".
An empty action phrase means no action branch, in training and inference alike.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from numbers import Integral, Real
from typing import Callable

import numpy as np
import torch
from diffusers import AnimateDiffPipeline
from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput

from .adapter import MotionCharacterAdapter
from .acceleration import Acceleration
from .attention import MCConditioning
from .deepcache import FeatureCache
from .id_module import Reference, prepare_reference
from .motion_module import validate_intensity

logger = logging.getLogger("motioncharacter.model")

MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard for reference images
MAX_SIDE = 2048
MAX_SCALE = 5.0
OUTPUT_TYPES = ("uint8", "np", "pt", "pil", "latent")  # uint8: frames (F, H, W, 3); the rest as in diffusers


class MotionCharacterPipeline(AnimateDiffPipeline):
    def __init__(self, vae, text_encoder, tokenizer, unet, motion_adapter, scheduler, feature_extractor,
                 image_encoder, adapter: MotionCharacterAdapter):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                         motion_adapter=motion_adapter, scheduler=scheduler,
                         feature_extractor=feature_extractor, image_encoder=image_encoder)
        self.register_modules(adapter=adapter)
        adapter.attach(self.unet)
        self.face_embedder = None  # set by load_pipeline: motioncharacter.faces.embedder(...)
        self.acceleration = Acceleration()  # speed/memory options; load_pipeline(acceleration=...) applies others

    # ---- validation -------------------------------------------------------------------
    def token_count(self, text: str) -> int:
        return len(self.tokenizer(text, truncation=False).input_ids)

    def check_inputs(self, *, image, prompt, negative_prompt="", action="", intensity=10.0, id_scale=1.0,
                     motion_scale=1.0, num_inference_steps=30, guidance_scale=8.0, num_frames=16, height=512,
                     width=512, seed=0, face_index=None) -> np.ndarray:
        """Validate every argument before any model work; returns the reference as RGB uint8.

        Raises ValueError naming the bad argument. Text longer than the tokenizer's 77
        positions is accepted with a warning that it was truncated.
        """
        for name, val in (("prompt", prompt), ("negative_prompt", negative_prompt), ("action", action)):
            if not isinstance(val, str):
                raise ValueError(f"{name} must be a string, got {type(val).__name__}")
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        validate_intensity(intensity)
        for name, val in (("id_scale", id_scale), ("motion_scale", motion_scale)):
            _number(name, val, 0.0, MAX_SCALE)
        _number("guidance_scale", guidance_scale, 0.0, 50.0)
        max_steps = self.scheduler.config.num_train_timesteps
        _integer("num_inference_steps", num_inference_steps, 1, max_steps)
        max_frames = getattr(self.unet.config, "motion_max_seq_length", 32) or 32
        _integer("num_frames", num_frames, 1, max_frames)
        mult = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        for name, val in (("height", height), ("width", width)):
            _integer(name, val, mult, MAX_SIDE)
            if val % mult:
                raise ValueError(f"{name} must be a multiple of {mult} for this model, got {val}")
        _integer("seed", seed, 0, 2**63 - 1)
        if face_index is not None:
            _integer("face_index", face_index, 0, 1000)
        limit = self.tokenizer.model_max_length
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt), ("action", action)):
            n = self.token_count(text)
            if n > limit:
                logger.warning("%s is %d tokens; CLIP reads only %d, so it was truncated", name, n, limit)
        return load_reference_image(image)

    # ---- conditioning -------------------------------------------------------------------
    def reference(self, rgb: np.ndarray, face_index: int | None = None) -> Reference:
        if self.face_embedder is None:
            from motioncharacter.faces import embedder

            self.face_embedder = embedder()
        ref = prepare_reference(rgb, self.face_embedder, "reference image", face_index)
        want = self.adapter.config.face_dim
        if ref.face_embedding.shape[-1] != want:
            raise ValueError(f"the adapter expects {want}-d face embeddings but the {ref.embedder} embedder gives "
                             f"{ref.face_embedding.shape[-1]}-d (an ArcFace adapter needs arcface_pack)")
        return ref

    @torch.no_grad()
    def encode_reference(self, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip image embedding E_clip (1, d), face embedding (1, face_dim))."""
        px = self.feature_extractor(images=ref.crop, return_tensors="pt").pixel_values
        enc = self.image_encoder
        clip = enc(px.to(self.device, enc.dtype)).image_embeds
        face = torch.from_numpy(ref.face_embedding).to(self.device, clip.dtype)[None]
        return clip, face

    def reference_pixels(self, ref: Reference) -> torch.Tensor | None:
        """The reference crop for an adapter that encodes it itself (``ref_encoder``), else None."""
        if getattr(self.adapter, "ref_encoder", None) is None:
            return None
        from .id_module import reference_pixels

        return reference_pixels(ref.crop, self.device)

    @torch.no_grad()
    def encode_action(self, action: str) -> torch.Tensor | None:
        """E_A: the frozen CLIP text encoder's hidden states for the action phrase (1, 77, D);
        ``None`` for an empty phrase (no action branch)."""
        if not action.strip():
            return None
        emb, _ = self.encode_prompt(action, self.device, 1, False)
        if self.acceleration.action_tokens == "eot":  # BOS, the phrase, EOT; the rest is padding
            emb = emb[:, : min(self.token_count(action), emb.shape[1])]
        return emb

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image, prompt: str, negative_prompt: str = "", action: str = "", intensity: float = 10.0,
                 id_scale: float = 1.0, motion_scale: float = 1.0, num_inference_steps: int = 30,
                 guidance_scale: float = 8.0, num_frames: int = 16, height: int = 512, width: int = 512,
                 seed: int = 0, face_index: int | None = None,
                 progress: Callable[[int, int], None] | None = None, *, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "np", return_dict: bool = True,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)):
        """Generate a video of the reference person.

        Args:
            image: reference portrait, RGB uint8 (H, W, 3) array or a file path.
            prompt / negative_prompt: the overall description P and what to avoid.
            action: the action phrase A ("talking", "" for none), encoded by CLIP (E_A).
            intensity: motion intensity M in [0, 20] (mean foreground optical flow, eq. 7).
            id_scale: lambda of eq. 3 (0 switches the ID tokens off).
            motion_scale: alpha of eq. 8 (0 switches the motion tokens off).
            num_inference_steps, guidance_scale: DDIM steps and CFG scale (CFG when > 1).
            num_frames, height, width: output size; seed: makes the result reproducible.
            face_index: which face to use when the reference shows several (0 = largest).
            progress: called as progress(step, total) after each denoising step.
            generator, latents, output_type, return_dict, callback_on_step_end: as in diffusers'
                AnimateDiffPipeline (``generator`` replaces ``seed``; ``latents`` (1, C, F, h, w) are the
                starting noise; ``output_type`` "np" | "pt" | "pil" | "latent", or "uint8" for frames
                (F, H, W, 3); ``callback_on_step_end(pipe, i, t, {"latents": ...})`` may return new latents).
        Returns:
            ``AnimateDiffPipelineOutput(frames=...)``, or the frames alone with ``return_dict=False``.
        """
        rgb = self.check_inputs(image=image, prompt=prompt, negative_prompt=negative_prompt, action=action,
                                intensity=intensity, id_scale=id_scale, motion_scale=motion_scale,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                num_frames=num_frames, height=height, width=width, seed=seed,
                                face_index=face_index)
        ref = self.reference(rgb, face_index)  # face errors come before any model work
        device = self.device
        cfg = guidance_scale > 1.0
        self._guidance_scale = guidance_scale

        text, neg = self.encode_prompt(prompt, device, 1, cfg, negative_prompt)
        clip, face = self.encode_reference(ref)
        cond = self.adapter.conditioning(clip_embeds=clip, face_embeds=face, action_embeds=self.encode_action(action),
                                         intensity=[float(intensity)], id_scale=id_scale, motion_scale=motion_scale,
                                         ref_pixels=self.reference_pixels(ref))
        if cfg:
            text = torch.cat([neg, text])
            cond = MCConditioning.cat(cond.unconditional(), cond)
        text = text.repeat_interleave(num_frames, dim=0)  # the UNet wants per-frame text, (B*F, 77, D)

        frames = self.denoise(text, cond, num_frames=num_frames, height=height, width=width,
                              steps=num_inference_steps, guidance=guidance_scale, seed=seed, progress=progress,
                              generator=generator, latents=latents, output_type=output_type,
                              callback_on_step_end=callback_on_step_end,
                              callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return AnimateDiffPipelineOutput(frames=frames) if return_dict else frames

    def denoise(self, text: torch.Tensor, cond, *, num_frames: int, height: int, width: int, steps: int,
                guidance: float, seed: int, progress=None, residuals=None, generator=None, latents=None,
                output_type: str = "uint8", callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=("latents",)):
        """The sampling loop shared by every mode: seeded latents, classifier-free guidance (the
        batch holds [uncond, cond] when guidance > 1), VAE decode (uint8 frames (F, H, W, 3) by default).

        ``residuals(latent_input, t) -> (down, mid)`` adds ControlNet residuals (or None)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if set(callback_on_step_end_tensor_inputs) - {"latents"}:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name only 'latents', got "
                             f"{list(callback_on_step_end_tensor_inputs)}")
        device, cfg, acc = self.device, guidance > 1.0, self.acceleration
        self.scheduler.set_timesteps(steps, device=device)
        generator = generator if generator is not None else torch.Generator("cpu").manual_seed(int(seed))
        shape = (1, self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is not None and (not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape):
            raise ValueError(f"latents must be a tensor of shape {shape} for this request, got "
                             f"{tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}")
        # the latents, guidance and the scheduler's arithmetic stay fp32 whatever the UNet runs in (precision.py)
        latents = self.prepare_latents(1, self.unet.config.in_channels, num_frames, height, width, torch.float32,
                                       device, generator, None if latents is None else latents.float())
        unet_dtype = self.unet.dtype
        timesteps = self.scheduler.timesteps
        # split_frames chunks the batch rows, so it needs one video per UNet call (acceleration.py)
        split = acc.split_guidance or acc.split_frames > 0
        halves = [slice(0, num_frames), slice(num_frames, 2 * num_frames)] if cfg and split else None
        caches = [FeatureCache(self.unet, acc.cache_interval, acc.cache_depth) for _ in (halves or [None])]
        for i, t in enumerate(timesteps):
            inp = torch.cat([latents] * 2) if cfg else latents
            inp = self.scheduler.scale_model_input(inp, t)
            down, mid = residuals(inp, t) if residuals is not None else (None, None)
            inp = inp.to(unet_dtype)
            if halves is None:
                eps = caches[0].predict(i, inp, t, encoder_hidden_states=text, cross_attention_kwargs=cond.kwargs(),
                                        down_block_additional_residuals=down, mid_block_additional_residual=mid)
            else:  # the same two predictions, one batch at a time (frames are batch rows f..f+F of text)
                eps = torch.cat([cache.predict(
                    i, inp[k:k + 1], t, encoder_hidden_states=text[rows], cross_attention_kwargs=_sample(cond, k).kwargs(),
                    down_block_additional_residuals=None if down is None else [d[rows] for d in down],
                    mid_block_additional_residual=None if mid is None else mid[rows])
                    for k, (cache, rows) in enumerate(zip(caches, halves))])
            eps = eps.float()
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents).prev_sample
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = out.pop("latents", latents)
            if progress is not None:
                progress(i + 1, len(timesteps))

        if output_type == "latent":
            return latents
        video = self.decode_latents(latents, decode_chunk_size=1 if acc.vae_slicing else 16)  # (1, C, F, H, W) in [-1, 1]
        if output_type != "uint8":
            return self.video_processor.postprocess_video(video=video, output_type=output_type)
        frames = ((video[0].permute(1, 2, 3, 0) / 2 + 0.5).clamp(0, 1) * 255).round()
        return frames.to(torch.uint8).cpu().numpy()


    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """diffusers' decode in the VAE's own precision (fp32 when ``vae_upcast``), returned as fp32."""
        return super().decode_latents(latents.to(self.vae.dtype), decode_chunk_size).float()


def _sample(cond, k: int):
    """Sample ``k`` of a per-sample conditioning dataclass (every tensor field sliced on its batch axis)."""
    sliced = {f.name: getattr(cond, f.name)[k:k + 1] for f in dataclasses.fields(cond)
              if isinstance(getattr(cond, f.name), torch.Tensor)}
    return dataclasses.replace(cond, **sliced)


def load_reference_image(image) -> np.ndarray:
    """An RGB uint8 array from a path or an array; refuses bombs and malformed arrays."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from motioncharacter.video import load_image

        return load_image(image, max_pixels=MAX_IMAGE_PIXELS)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a file path or an RGB uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an RGB uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, over the {MAX_IMAGE_PIXELS:,}-pixel limit")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, too small to hold a face")
    return image


def _number(name: str, val, lo: float, hi: float) -> float:
    if isinstance(val, bool) or not isinstance(val, Real) or not math.isfinite(float(val)):
        raise ValueError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {val!r}")
    if not lo <= float(val) <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {val:g}")
    return float(val)


def _integer(name: str, val, lo: int, hi: int) -> int:
    if isinstance(val, bool) or not isinstance(val, Integral):
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {val!r}")
    if not lo <= int(val) <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {val}")
    return int(val)
