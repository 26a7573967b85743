"""Motion control module inputs (paper sec. 3.3, eq. 8): intensity -> E_M through an MLP.

The action embedding E_A is the frozen CLIP text encoder's output for the action phrase
(see ``MotionCharacterPipeline.encode_action``); the two parallel attentions that consume
E_A and E_M live in ``attention.py``.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

INTENSITY_MAX = 20.0  # motion intensities are capped at 20 in data preparation (resample step)


def validate_intensity(value, name: str = "intensity") -> float:
    """A finite float in [0, 20], or ValueError naming the argument and the bad value."""
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise ValueError(f"{name} must be a number in [0, {INTENSITY_MAX:g}], got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number in [0, {INTENSITY_MAX:g}], got {v}")
    if not 0.0 <= v <= INTENSITY_MAX:
        raise ValueError(f"{name} must be in [0, {INTENSITY_MAX:g}], got {v:g}")
    return v


class IntensityEncoder(nn.Module):
    """E_M = MLP(M / 20): a few tokens in the text-embedding width, one set per sample."""

    def __init__(self, text_dim: int, num_tokens: int = 4, hidden: int | None = None):
        super().__init__()
        hidden = hidden or text_dim
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(
            nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, num_tokens * text_dim),
        )
        self.norm = nn.LayerNorm(text_dim)

    def forward(self, intensity: torch.Tensor) -> torch.Tensor:
        """(B,) intensities in [0, 20] -> (B, num_tokens, text_dim)."""
        m = (intensity.reshape(-1, 1).float() / INTENSITY_MAX).to(self.mlp[0].weight.dtype)  # M scaled in fp32
        return self.norm(self.mlp(m).reshape(m.shape[0], self.num_tokens, -1))


def motion_unet(unet2d, motion_adapter):
    """diffusers' own UNet2DConditionModel + MotionAdapter -> UNetMotionModel."""
    from diffusers import UNetMotionModel

    from .precision import quiet_diffusers

    with quiet_diffusers():  # from_unet2d casts with .to(dtype) itself, which makes diffusers warn about its own call
        return UNetMotionModel.from_unet2d(unet2d, motion_adapter)
