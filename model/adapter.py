"""MotionCharacterAdapter: every trainable weight of MotionCharacter in one diffusers model.

It holds the ID encoder (eq. 2), the intensity MLP (E_M) and one ``MCLayer`` per spatial
cross-attention layer of the UNet (eq. 3 and 8). ``attach(unet)`` installs the processors;
the base UNet's weights are untouched, so the adapter saves and loads on its own
(``save_pretrained`` / ``from_pretrained``, safetensors).
"""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import (MCConditioning, MCLayer, MotionCharacterAttnProcessor, install_processors,
                        spatial_cross_attention_layers)
from .id_module import IDEncoder, ReferenceEncoder
from .motion_module import IntensityEncoder


def _key(layer_name: str) -> str:
    return layer_name.replace(".", "__")  # ModuleDict keys cannot contain dots


class MotionCharacterAdapter(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, layer_dims: dict[str, list[int]], text_dim: int = 768, clip_image_dim: int = 1024,
                 face_dim: int = 512, num_id_tokens: int = 4, num_motion_tokens: int = 4, id_heads: int = 8,
                 ref_encoder_size: int = 0, ref_grid: int = 8):
        """``layer_dims``: attn2 layer name -> [hidden_size, inner_dim] (see ``for_unet``).
        ``ref_encoder_size`` > 0: a learnable ``ReferenceEncoder`` on the reference crop at that
        size replaces the frozen CLIP image embedding (small models trained here) and adds its
        ``ref_grid``^2 patch tokens to C_id."""
        super().__init__()
        self.id_encoder = IDEncoder(clip_image_dim, face_dim, text_dim, num_id_tokens, heads=id_heads)
        self.ref_encoder = ReferenceEncoder(text_dim, clip_image_dim, ref_encoder_size, ref_grid) \
            if ref_encoder_size else None
        self.intensity_encoder = IntensityEncoder(text_dim, num_motion_tokens)
        self.mc_layers = nn.ModuleDict({_key(n): MCLayer(h, inner, text_dim) for n, (h, inner) in layer_dims.items()})

    @classmethod
    def for_unet(cls, unet, clip_image_dim: int, face_dim: int, seed: int | None = None, **kw):
        """A fresh (zero-output) adapter shaped for ``unet``'s spatial cross-attention layers."""
        layer_dims = {n: [m.to_q.in_features, m.inner_dim] for n, m in spatial_cross_attention_layers(unet).items()}
        heads = kw.pop("id_heads", None) or _heads(unet.config.cross_attention_dim)
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            return cls(layer_dims=layer_dims, text_dim=unet.config.cross_attention_dim, clip_image_dim=clip_image_dim,
                       face_dim=face_dim, id_heads=heads, **kw)

    def attach(self, unet) -> None:
        """Install a MotionCharacter processor on every spatial cross-attention layer."""
        install_processors(unet, self.config.layer_dims, lambda name: MotionCharacterAttnProcessor(
            self.mc_layers[_key(name)]), "adapter")

    def conditioning(self, *, clip_embeds=None, face_embeds=None, action_embeds=None, intensity=None,
                     id_scale: float = 1.0, motion_scale: float = 1.0, id_keep=None, action_keep=None,
                     motion_keep=None, ref_pixels=None, clip_keep=None) -> MCConditioning:
        """Build the per-sample tokens: C_id from (clip, face) embeddings, E_A = action
        embeddings as given (CLIP text encoder output; ``None`` = no action phrase), E_M from
        intensities (B,). ``*_keep`` (B,) switch a branch off per sample (condition dropout).
        With a ``ref_encoder``, ``ref_pixels`` (B, 3, S, S) in [-1, 1] (``id_module.reference_pixels``)
        give E_clip (times ``clip_keep``, CLIP-embedding dropout) and the patch tokens."""
        patches = None
        if self.ref_encoder is not None:
            if ref_pixels is None:
                raise ValueError("this adapter encodes the reference itself (ref_encoder_size="
                                 f"{self.config.ref_encoder_size}): pass ref_pixels")
            patches, clip_embeds = self.ref_encoder(ref_pixels.to(self.device, self.dtype))
            if clip_keep is not None:
                clip_embeds = clip_embeds * clip_keep.to(clip_embeds)[:, None]
        id_tokens = self.id_encoder(clip_embeds, face_embeds) if clip_embeds is not None else None
        if patches is not None:
            id_tokens = torch.cat([id_tokens, patches], 1)
        motion_tokens = None
        if intensity is not None:
            intensity = torch.as_tensor(intensity, dtype=torch.float32, device=self.device).reshape(-1)
            motion_tokens = self.intensity_encoder(intensity)
        return MCConditioning(id_tokens=id_tokens, action_tokens=action_embeds, motion_tokens=motion_tokens,
                              id_scale=float(id_scale), motion_scale=float(motion_scale), id_keep=id_keep,
                              action_keep=action_keep, motion_keep=motion_keep)


def _heads(dim: int) -> int:
    for h in (8, 4, 2, 1):
        if dim % h == 0:
            return h
    return 1
