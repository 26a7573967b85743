"""ID-Animator's query-based image encoder (sec. 3.2 of the paper): a Perceiver-style resampler.

A fixed set of learnable queries attends to the CLIP image encoder's patch features (the
penultimate hidden states) and returns ``num_queries`` tokens in the text-embedding width,
which the decoupled cross-attention (content_guider.py) reads as K^i, V^i.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys and values from [image features; latents]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"resampler width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_x = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, n, w = latents.shape
        lat = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_x(x), lat], dim=1)
        q = self.to_q(lat).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        k = k.view(b, -1, self.heads, w // self.heads).transpose(1, 2)
        v = v.view(b, -1, self.heads, w // self.heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, w))


class Resampler(nn.Module):
    """(B, N, in_dim) image features -> (B, num_queries, out_dim) tokens."""

    def __init__(self, in_dim: int, width: int, out_dim: int, num_queries: int = 16, depth: int = 2,
                 heads: int = 4, ff_mult: int = 2):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) / width ** 0.5)
        self.proj_in = nn.Linear(in_dim, width)
        self.attn = nn.ModuleList(PerceiverAttention(width, heads) for _ in range(depth))
        self.ff = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ff_mult * width, bias=False),
                                              nn.GELU(), nn.Linear(ff_mult * width, width, bias=False))
                                for _ in range(depth))
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        latents = self.queries.expand(x.shape[0], -1, -1)
        for attn, ff in zip(self.attn, self.ff):
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))
