"""Decoupled image-prompt cross-attention for ID-Animator and DreaMoving.

DreaMoving's Content Guider (eq. 1):
    Z' = Attn(Q, K_t, V_t) + alpha_f * Attn(Q, K_f, V_f) + alpha_c * Attn(Q, K_c, V_c)
with face tokens c_f (CLIP patch features through a query-based resampler, plus a projection
of the face-recognition embedding as the paper's ArcFace supplement) and optional cloth/body
tokens c_c. ID-Animator's face adapter (its eq. 1) is the face branch alone, with lambda as
alpha_f and CLIP features only. Only the new K/V projections and the resamplers are weights of
this model; the UNet's own projections are shared, so alpha_f = alpha_c = 0 gives exactly the
text-only output (the branches are skipped, not multiplied by zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import COND_KEY, _per_sample_attention, install_processors, spatial_cross_attention_layers
from .face_adapter import Resampler


@dataclass
class GuiderConditioning:
    """Per-sample image-prompt tokens (B, T, text_dim) and their weights; None skips a branch."""

    face_tokens: torch.Tensor | None = None
    cloth_tokens: torch.Tensor | None = None
    face_scale: float = 1.0   # alpha_f (DreaMoving) / lambda (ID-Animator)
    cloth_scale: float = 0.0  # alpha_c

    def kwargs(self) -> dict:
        return {COND_KEY: self}

    def branches(self):
        if self.face_tokens is not None and self.face_scale != 0:
            yield "face", self.face_tokens, self.face_scale
        if self.cloth_tokens is not None and self.cloth_scale != 0:
            yield "cloth", self.cloth_tokens, self.cloth_scale


class GuiderLayer(nn.Module):
    def __init__(self, inner_dim: int, text_dim: int, zero_init: bool):
        super().__init__()
        self.to_k_face = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v_face = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_k_cloth = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v_cloth = nn.Linear(text_dim, inner_dim, bias=False)
        if zero_init:  # an untrained guider adds nothing
            nn.init.zeros_(self.to_v_face.weight)
            nn.init.zeros_(self.to_v_cloth.weight)


class ContentGuiderAttnProcessor:
    """diffusers' AttnProcessor2_0 for the text path, plus the image branches of eq. 1.

    The branches are added after ``to_out``: it is affine, so to_out(a + b) = to_out(a) + W b.
    """

    def __init__(self, layer: GuiderLayer):
        self.layer = layer
        self.text = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 motioncharacter_conditioning: GuiderConditioning | None = None):
        out = self.text(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        c = motioncharacter_conditioning
        branches = list(c.branches()) if c is not None else []
        if not branches:
            return out
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError("the content guider supports transformer cross-attention layers only")
        query = attn.to_q(hidden_states)
        extra = 0
        for name, tokens, scale in branches:
            to_k, to_v = getattr(self.layer, f"to_k_{name}"), getattr(self.layer, f"to_v_{name}")
            extra = extra + scale * _per_sample_attention(query, tokens.to(query.dtype), to_k, to_v, attn.heads)
        return out + F.linear(extra, attn.to_out[0].weight) / attn.rescale_output_factor


def _key(name: str) -> str:
    return name.replace(".", "__")


class ContentGuider(ModelMixin, ConfigMixin):
    """Face/cloth image-prompt adapter. Saved on its own (safetensors) like the MotionCharacter adapter:
    ``face_adapter/`` (ID-Animator) or ``content_guider/`` (DreaMoving) in a weights folder."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, layer_dims: dict[str, int], text_dim: int = 768, clip_hidden_dim: int = 1280,
                 face_dim: int = 512, num_queries: int = 16, num_face_id_tokens: int = 4, resampler_depth: int = 2,
                 resampler_heads: int = 4, zero_init: bool = True):
        """``layer_dims``: attn2 layer name -> inner dim of its K/V projections."""
        super().__init__()
        kw = dict(num_queries=num_queries, depth=resampler_depth, heads=resampler_heads)
        self.face_resampler = Resampler(clip_hidden_dim, text_dim, text_dim, **kw)
        self.cloth_resampler = Resampler(clip_hidden_dim, text_dim, text_dim, **kw)
        self.face_id_proj = nn.Linear(face_dim, num_face_id_tokens * text_dim)
        self.face_id_norm = nn.LayerNorm(text_dim)
        self.layers = nn.ModuleDict({_key(n): GuiderLayer(inner, text_dim, zero_init) for n, inner in layer_dims.items()})

    @classmethod
    def for_unet(cls, unet, clip_hidden_dim: int, face_dim: int, seed: int | None = None, **kw) -> "ContentGuider":
        dims = {n: m.inner_dim for n, m in spatial_cross_attention_layers(unet).items()}
        heads = 4 if unet.config.cross_attention_dim % 4 == 0 else 1
        kw.setdefault("resampler_heads", heads)
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            return cls(layer_dims=dims, text_dim=unet.config.cross_attention_dim, clip_hidden_dim=clip_hidden_dim,
                       face_dim=face_dim, **kw)

    def attach(self, unet) -> None:
        install_processors(unet, self.config.layer_dims, lambda name: ContentGuiderAttnProcessor(
            self.layers[_key(name)]), "content guider")

    def face_tokens(self, clip_hidden: torch.Tensor, face_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """c_f: (B, num_queries [+ num_face_id_tokens], text_dim). ``face_embeds`` (B, face_dim) adds
        the face-recognition tokens (DreaMoving); ID-Animator passes CLIP features only."""
        tokens = self.face_resampler(clip_hidden.to(self.dtype))
        if face_embeds is not None:
            b, d = face_embeds.shape[0], self.config.text_dim
            ids = self.face_id_norm(self.face_id_proj(face_embeds.to(self.dtype)).view(b, -1, d))
            tokens = torch.cat([tokens, ids], dim=1)
        return tokens

    def cloth_tokens(self, clip_hidden: torch.Tensor) -> torch.Tensor:
        return self.cloth_resampler(clip_hidden.to(self.dtype))
