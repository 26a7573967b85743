"""Identity mixing (ID-Animator sec. 4.3.2): blend two identities' embeddings with a ratio.

    mixed = (1 - ratio) * A + ratio * B

ratio 0 is exactly identity A, 1 exactly B. Face-recognition embeddings live on the unit
sphere, so their blend is renormalised (``unit=True``); CLIP features are blended as they are.
"""
from __future__ import annotations

import math
from numbers import Real

import torch


def validate_ratio(ratio, name: str = "mix_ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not math.isfinite(float(ratio)):
        raise ValueError(f"{name} must be a number in [0, 1], got {ratio!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {float(ratio):g}")
    return float(ratio)


def mix(a: torch.Tensor, b: torch.Tensor, ratio: float, unit: bool = False) -> torch.Tensor:
    ratio = validate_ratio(ratio)
    if a.shape != b.shape:
        raise ValueError(f"cannot mix embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if ratio == 0.0:
        return a
    if ratio == 1.0:
        return b
    out = (1.0 - ratio) * a + ratio * b
    if unit:
        out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return out
