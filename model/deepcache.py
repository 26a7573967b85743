"""Feature caching across denoising steps, after DeepCache (Ma et al., CVPR 2024).

Adjacent denoising steps produce nearly the same deep UNet features. Every ``interval``-th
step runs the whole UNetMotionModel and keeps the hidden state that enters the last
``depth`` layers of the final (highest-resolution) up block; the steps in between run only
the shallow branch: conv_in, the first ``depth - 1`` layers of the first down block (they
make the skip connections those layers read), then those last up-block layers on the cached
state. Everything inside the branch is the stock diffusers layer: the MotionCharacter
processors, the motion modules (FreeNoise windows included), classifier-free guidance's
batch and ControlNet residuals (added to the skip connections the branch uses) all apply.

``interval=1`` is the plain UNet call. ``depth=1`` is the cheapest branch (one up layer);
``depth=len(up_blocks[-1].resnets)`` recomputes the whole outermost level.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .acceleration import check_cache


class FeatureCache:
    """``predict(step, sample, t, **unet_kwargs)`` in place of ``unet(sample, t, **unet_kwargs).sample``."""

    def __init__(self, unet, interval: int = 1, depth: int | None = None):
        check_cache(interval, depth, unet)
        self.unet, self.interval = unet, interval
        self.layers = len(unet.up_blocks[-1].resnets)
        self.depth = self.layers if depth is None else depth
        self.cached: torch.Tensor | None = None
        self.full_steps = self.shallow_steps = 0

    def is_full(self, step: int) -> bool:
        return self.interval == 1 or self.cached is None or step % self.interval == 0

    def predict(self, step: int, sample, t, *, encoder_hidden_states, cross_attention_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None) -> torch.Tensor:
        kwargs = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)
        if self.is_full(step):
            self.full_steps += 1
            with self._capture():
                return self.unet(sample, t, down_block_additional_residuals=down_block_additional_residuals,
                                 mid_block_additional_residual=mid_block_additional_residual, **kwargs).sample
        self.shallow_steps += 1
        return self._shallow(sample, t, down_block_additional_residuals, **kwargs)

    # ---- the full step keeps the state entering layer (layers - depth) of the last up block ----
    def _capture(self):
        if self.interval == 1:
            return nullcontext()
        block, first = self.unet.up_blocks[-1], self.layers - self.depth

        def keep(value):
            self.cached = value.detach()

        if first == 0:
            return _Hook(block.register_forward_pre_hook(
                lambda mod, args, kw: keep(kw["hidden_states"] if "hidden_states" in kw else args[0]),
                with_kwargs=True))
        return _Hook(block.motion_modules[first - 1].register_forward_hook(lambda mod, args, out: keep(out)))

    # ---- the shallow branch -------------------------------------------------------------------
    def _shallow(self, sample, t, down_residuals, *, encoder_hidden_states, cross_attention_kwargs):
        unet = self.unet
        b, _, frames = sample.shape[:3]
        timesteps = t if torch.is_tensor(t) else torch.tensor([t], device=sample.device)
        timesteps = timesteps.reshape(-1)[:1].to(sample.device).expand(b)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype), None)
        emb = emb.repeat_interleave(frames, dim=0)
        attn_kw = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)

        h = unet.conv_in(sample.permute(0, 2, 1, 3, 4).reshape(b * frames, -1, *sample.shape[3:]))
        skips = [h]
        for layer in _layers(unet.down_blocks[0])[: self.depth - 1]:
            h = _run(layer, h, emb, frames, attn_kw)
            skips.append(h)
        if down_residuals is not None:  # ControlNet: added to the skip connections, as diffusers does
            skips = [s + r for s, r in zip(skips, down_residuals)]

        h = self.cached
        if h.shape[0] != skips[0].shape[0]:
            raise RuntimeError("the cached features belong to another batch; start a new FeatureCache per video")
        layers = _layers(unet.up_blocks[-1])
        for j in range(self.layers - self.depth, self.layers):
            h = torch.cat([h, skips[self.layers - 1 - j]], dim=1)
            h = _run(layers[j], h, emb, frames, attn_kw)

        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        h = unet.conv_out(h)
        return h[None].reshape(b, frames, *h.shape[1:]).permute(0, 2, 1, 3, 4)


def _layers(block) -> list[tuple]:
    """(resnet, spatial transformer or None, motion module) per layer of a diffusers motion block."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    return list(zip(block.resnets, attentions, block.motion_modules))


def _run(layer, h, emb, frames, attn_kw):
    resnet, attn, motion = layer
    h = resnet(input_tensor=h, temb=emb)
    if attn is not None:
        h = attn(hidden_states=h, return_dict=False, **attn_kw)[0]
    return motion(h, num_frames=frames)


class _Hook:
    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()

