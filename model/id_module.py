"""ID-preserving module (paper sec. 3.2, eq. 2): reference face -> ID tokens C_id.

C_id = Proj(Attn(E_arc W'q, E W'k, E W'v)), E = E_clip + E_arc. Both embeddings are first
lifted to ``num_tokens`` tokens of a common width so that the sum E is defined; the face
embedding (ArcFace from a user pack, or the offline SFace) is the query.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


class IDEncoder(nn.Module):
    def __init__(self, clip_image_dim: int, face_dim: int, text_dim: int, num_tokens: int = 4,
                 width: int | None = None, heads: int = 4):
        super().__init__()
        width = width or text_dim
        self.num_tokens, self.width = num_tokens, width
        self.clip_in = nn.Linear(clip_image_dim, num_tokens * width)
        self.face_in = nn.Linear(face_dim, num_tokens * width)
        self.norm_clip = nn.LayerNorm(width)
        self.norm_face = nn.LayerNorm(width)
        self.fuse = nn.MultiheadAttention(width, heads, batch_first=True)  # W'q, W'k, W'v (+ out)
        self.proj = nn.Sequential(nn.Linear(width, text_dim), nn.LayerNorm(text_dim))

    def forward(self, clip_embeds: torch.Tensor, face_embeds: torch.Tensor) -> torch.Tensor:
        """(B, clip_image_dim), (B, face_dim) -> C_id (B, num_tokens, text_dim)."""
        b = clip_embeds.shape[0]
        e_clip = self.norm_clip(self.clip_in(clip_embeds).view(b, self.num_tokens, self.width))
        e_arc = self.norm_face(self.face_in(face_embeds.to(clip_embeds.dtype)).view(b, self.num_tokens, self.width))
        e = e_clip + e_arc
        fused, _ = self.fuse(e_arc, e, e, need_weights=False)
        return self.proj(fused)


@dataclass
class Reference:
    """A prepared reference: the face crop and its face-recognition embedding."""

    crop: np.ndarray          # (S, S, 3) uint8 RGB, the face with a margin
    face_embedding: np.ndarray  # (d,), unit norm
    embedder: str             # "sface" or "arcface": which model made face_embedding
    box: np.ndarray           # x, y, w, h of the face in the original image


def prepare_reference(rgb: np.ndarray, embedder, source: str = "reference image",
                      face_index: int | None = None) -> Reference:
    """Detect exactly one face (or ``face_index``), crop it and embed it.

    Raises motioncharacter.faces.FaceError (a ValueError) when there is no face or
    several faces and no ``face_index``.
    """
    from motioncharacter import faces

    face = faces.detector().one(rgb, source, face_index)
    return Reference(crop=faces.crop(rgb, face, size=224), face_embedding=embedder.embed(rgb, face),
                     embedder=embedder.name, box=face.box.copy())


class ReferenceEncoder(nn.Module):
    """A small image encoder that trains with the adapter (the ``mini`` preset's; real weights use
    the frozen CLIP image encoder): the reference crop (B, 3, S, S) in [-1, 1] -> ``grid`` x
    ``grid`` patch tokens (B, grid^2, text_dim), which join C_id so the ID cross-attention can
    read where the face has which appearance, and a pooled feature (B, clip_image_dim) that
    stands for E_clip in eq. 2."""

    def __init__(self, text_dim: int, clip_image_dim: int, size: int = 64, grid: int = 8, width: int = 64):
        super().__init__()
        self.size, self.grid = size, grid
        layers, ch = [], 3
        for out in (32, 64, width)[: max(1, round(math.log2(size // grid)))]:
            layers += [nn.Conv2d(ch, out, 3, 2, 1), nn.GroupNorm(8, out), nn.SiLU()]
            ch = out
        layers += [nn.Conv2d(ch, width, 3, 1, 1), nn.AdaptiveAvgPool2d(grid)]
        self.net = nn.Sequential(*layers)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        self.tokens = nn.Sequential(nn.Linear(width, text_dim), nn.LayerNorm(text_dim))
        self.pooled = nn.Linear(width, clip_image_dim)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.shape[-2:] != (self.size, self.size):
            pixels = nn.functional.interpolate(pixels, size=(self.size, self.size), mode="bilinear",
                                               align_corners=False, antialias=True)
        f = self.net(pixels).flatten(2).transpose(1, 2) + self.pos  # (B, grid^2, width)
        return self.tokens(f), self.pooled(f.mean(1))


def reference_pixels(crops, device=None, dtype=None) -> torch.Tensor:
    """Reference crops (B, S, S, 3) or (S, S, 3) uint8 RGB (numpy or torch) -> (B, 3, S, S) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(crops) if not isinstance(crops, torch.Tensor) else crops)
    if x.ndim == 3:
        x = x[None]
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.to(device=device, dtype=dtype or torch.float32)
