"""Metric math as small pure functions, and the result convention.

Every metric value is a dict ``{"value": float}`` or ``{"value": None, "reason": "..."}``:
a metric that cannot be computed is reported absent with its reason, never as a number.

VBench definitions (Huang et al. 2024, the paper's ref. [17]) implemented here:

- Dynamic Degree: optical flow between consecutive frames; a pair's score is the mean of its
  top 5 % flow magnitudes; the video is dynamic (1) when at least ``round(4 * N / 16)`` of the
  pairs (ignoring the last two) exceed ``6 * short_side / 256`` px, else static (0); absent
  below 4 frames, where no pair is left to count. The dataset value is the fraction of dynamic
  videos. VBench uses RAFT; without RAFT weights we use OpenCV DIS flow and report it as
  ``dynamic_degree_dis``.
- Motion Smoothness: drop the odd frames, re-create them by interpolating their even
  neighbours, score ``(255 - mean |real - interpolated|) / 255``. VBench interpolates with AMT;
  without AMT we interpolate along DIS flow (Super-SloMo's t = 1/2 flow approximation, below)
  and report it as ``motion_smoothness_flowinterp``. Needs at least 3 frames.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np


# ---- result convention --------------------------------------------------------------------

def present(value: float, **extra: Any) -> dict:
    v = float(value)
    if not math.isfinite(v):
        return absent(f"not a finite number ({v})")
    return {"value": v, **extra}


def absent(reason: str) -> dict:
    return {"value": None, "reason": reason}


def too_few(have: int, need: int, why: str = "") -> dict | None:
    """absent(...) naming both frame counts when a metric needs ``need`` frames and has ``have``."""
    if have >= need:
        return None
    return absent(f"needs at least {need} frame{'s' if need != 1 else ''}, got {have}" + (f" ({why})" if why else ""))


def value(result: dict | None) -> float | None:
    return None if result is None else result.get("value")


def aggregate(results: list[dict]) -> dict:
    """Mean over the videos where the metric was computed; absent (with the first reason) if none."""
    vals = [r["value"] for r in results if r is not None and r.get("value") is not None]
    if not vals:
        reasons = [r.get("reason") for r in results if r is not None and r.get("reason")]
        return absent(reasons[0] if reasons else "no videos scored")
    return present(float(np.mean(vals)), n=len(vals))


# ---- similarities -------------------------------------------------------------------------

def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows of ``a`` (n, d) with rows of ``b`` (m, d) -> (n, m)."""
    a = np.atleast_2d(np.asarray(a, np.float64))
    b = np.atleast_2d(np.asarray(b, np.float64))
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def mean_similarity(reference: np.ndarray, frames: np.ndarray) -> float:
    """Mean cosine similarity between one reference embedding and each frame's embedding
    (CLIP-I with image embeddings, CLIP-T with a text embedding, face similarity with identities)."""
    return float(cosine(reference, frames).mean())


# ---- VBench dynamic degree ----------------------------------------------------------------

def top5_flow(mag: np.ndarray) -> float:
    """A pair's motion score in VBench: the mean of its top 5 % flow magnitudes."""
    flat = np.sort(np.asarray(mag, np.float64).ravel())[::-1]
    k = max(1, int(flat.size * 0.05))
    return float(flat[:k].mean())


# VBench ignores the last 2 of the N-1 pairs: with fewer than 4 frames no pair is counted and
# every video would read "static" whatever it shows
DYNAMIC_DEGREE_MIN_FRAMES = 4


def dynamic_degree(mags: np.ndarray, short_side: int) -> float:
    """1.0 if the video is dynamic, else 0.0. ``mags``: (N-1, H, W) flow magnitudes in pixels of
    frames whose short side is ``short_side`` (the threshold scales with it, as in VBench)."""
    n_frames = len(mags) + 1
    if n_frames < DYNAMIC_DEGREE_MIN_FRAMES:
        raise ValueError(f"dynamic degree needs at least {DYNAMIC_DEGREE_MIN_FRAMES} frames, got {n_frames}")
    thres = 6.0 * short_side / 256.0
    need = round(4 * n_frames / 16.0)
    count = sum(top5_flow(m) > thres for m in mags[:-2])
    return 1.0 if count >= max(need, 1) else 0.0


# ---- VBench motion smoothness -------------------------------------------------------------

Interpolator = Callable[[np.ndarray, np.ndarray], np.ndarray]
MOTION_SMOOTHNESS_MIN_FRAMES = 3  # one odd frame between two even ones


def motion_smoothness(frames: np.ndarray, interpolate: Interpolator) -> float:
    """(255 - mean absolute error of re-created odd frames) / 255. ``interpolate(a, b)`` returns
    the frame halfway between uint8 frames a and b."""
    frames = np.asarray(frames)
    if len(frames) < MOTION_SMOOTHNESS_MIN_FRAMES:
        raise ValueError(f"motion smoothness needs at least {MOTION_SMOOTHNESS_MIN_FRAMES} frames, got {len(frames)}")
    even = frames[0::2]
    errs = []
    for k in range(len(even) - 1):
        mid = interpolate(even[k], even[k + 1])
        errs.append(np.abs(mid.astype(np.float64) - frames[2 * k + 1].astype(np.float64)).mean())
    return float((255.0 - np.mean(errs)) / 255.0)


def _warp(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: out(x) = img(x + flow(x)), bilinear, borders replicated."""
    import cv2

    h, w = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(img, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class FlowInterpolator:
    """Midpoint frame from bidirectional flow (``flow(frames) -> (N-1,H,W,2)``).

    Super-SloMo's approximation at t = 1/2: F_t->0 = (-F_0->1 + F_1->0) / 4,
    F_t->1 = (F_0->1 - F_1->0) / 4; the midpoint averages both backward warps.
    """

    name = "flowinterp"

    def __init__(self, flow: Callable[[np.ndarray], np.ndarray]):
        self.flow = flow

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        f01 = self.flow(np.stack([a, b]))[0]
        f10 = self.flow(np.stack([b, a]))[0]
        ft0 = (-f01 + f10) / 4.0
        ft1 = (f01 - f10) / 4.0
        mid = 0.5 * _warp(a, ft0).astype(np.float32) + 0.5 * _warp(b, ft1).astype(np.float32)
        return np.clip(np.rint(mid), 0, 255).astype(np.uint8)


# ---- intensity adherence ------------------------------------------------------------------

def spearman(requested: list[float], measured: list[float]) -> dict:
    """Spearman rank correlation of requested vs measured intensity (scipy), or absent."""
    from scipy.stats import spearmanr

    pairs = [(r, m) for r, m in zip(requested, measured) if r is not None and m is not None]
    if len(pairs) < 3:
        return absent(f"needs at least 3 scored videos, got {len(pairs)}")
    r, m = map(np.asarray, zip(*pairs))
    if np.ptp(r) == 0:
        return absent("all videos requested the same intensity; use several (e.g. intensities: [0, 10, 20])")
    if np.ptp(m) == 0:
        return absent("measured intensity is the same for every video")
    rho, p = spearmanr(r, m)
    return present(rho, p_value=float(p), n=len(pairs))
