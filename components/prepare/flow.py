"""Optical flow, motion intensity (MotionCharacter eq. 5-7) and region masks (eq. 9).

Scale. Flow is computed on frames resized so their short side is ``flow_short_side``
(default 256 px), then every displacement is rescaled to a *reference short side of
512 px* (the training resolution): ``d_512 = d_measured * 512 / flow_short_side``.
So an intensity of 8 means: between consecutive sampled frames (1/4 s apart at the
default 4 fps), the moving region moved on average 8 px of a 512-px-high frame
(1.6 % of the short side) — whatever the clip's own resolution or the flow resolution.
"""
from __future__ import annotations

import numpy as np

REFERENCE_SHORT_SIDE = 512


# ---- the paper's math, as small pure functions --------------------------------------

def flow_magnitude(flow: np.ndarray) -> np.ndarray:
    """|f| per pixel for flows of shape (..., H, W, 2)."""
    flow = np.asarray(flow, dtype=np.float32)
    return np.hypot(flow[..., 0], flow[..., 1])


def foreground_flow(mag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 6 for one pair: tau_i = mean |f|; M_i = |f| > tau_i; f_fg(x,y) = M_i * |f|.

    Returns (mask, foreground flow map)."""
    tau = mag.mean(dtype=np.float64)
    mask = mag > tau
    return mask, mag * mask


def pair_intensity(mag: np.ndarray) -> float:
    """f_{i,fg} = (1/S) sum M_i |f_i| with S the number of foreground pixels (0 when S = 0)."""
    mask, fg = foreground_flow(mag)
    s = int(np.count_nonzero(mask))
    return float(fg.sum(dtype=np.float64) / s) if s else 0.0


def motion_intensity(mags: np.ndarray) -> float:
    """Eq. 7: M = mean over the N-1 adjacent pairs of f_{i,fg}. ``mags``: (N-1, H, W)."""
    if len(mags) == 0:
        return 0.0
    return float(np.mean([pair_intensity(m) for m in mags]))


def region_masks(mags: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Eq. 9 per pair: M_norm = clip(f_fg / 255 + 0.5, 1.0, 1.5); background pixels get 1.0.

    The paper first "normalizes the foreground optical flow" to the 0-255 range; we do that
    per pair (f_fg * 255 / max f_fg), so pixels moving more than half the pair's peak get
    weights rising to 1.5 at the peak. ``normalize=False`` applies the formula to raw
    pixel displacements (then only flows above 127.5 px rise above 1.0).

    ``mags`` (N-1, H, W) -> (N, H, W) float32, one mask per frame: frame i uses pair
    (i, i+1), the last frame repeats the last pair's mask.
    """
    if len(mags) == 0:
        raise ValueError("region masks need at least one flow pair")
    out = []
    for m in mags:
        fg = foreground_flow(m)[1]
        if normalize:
            peak = fg.max()
            fg = fg * (255.0 / peak) if peak > 0 else fg
        out.append(np.clip(fg / 255.0 + 0.5, 1.0, 1.5))
    masks = np.stack(out)
    return np.concatenate([masks, masks[-1:]]).astype(np.float32)


# ---- flow estimators -------------------------------------------------------------------

class DISFlow:
    """OpenCV's DIS optical flow (no weights needed); the default estimator."""

    name = "dis"

    def __init__(self, preset: str = "medium"):
        import cv2

        presets = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
                   "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                   "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}
        if preset not in presets:
            raise ValueError(f"unknown DIS preset {preset!r}; one of {sorted(presets)}")
        self._dis = cv2.DISOpticalFlow_create(presets[preset])

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N-1, H, W, 2) float32 pixel displacements."""
        import cv2

        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        return np.stack([self._dis.calc(a, b, None) for a, b in zip(gray[:-1], gray[1:])])


class FarnebackFlow:
    """OpenCV's Farneback dense flow (polynomial expansion; no weights): a method independent of
    DIS, for re-measuring intensities (``flow.estimator=farneback``)."""

    name = "farneback"

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import cv2

        gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        return np.stack([cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
                         for a, b in zip(gray[:-1], gray[1:])])


class RAFTFlow:
    """torchvision RAFT with user-supplied weights (a local or s3:// .pth/.safetensors state dict)."""

    name = "raft"

    def __init__(self, weights: str, small: bool = False, allow_pickle: bool = False, iters: int = 12):
        import torch
        from torchvision.models.optical_flow import raft_large, raft_small

        from motioncharacter.storage import local_copy

        path = local_copy(weights)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif allow_pickle:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"RAFT weights {weights} are a pickle file; convert to .safetensors or allow pickles explicitly")
        self.model = (raft_small if small else raft_large)(weights=None).eval()
        self.model.load_state_dict(state)
        self.iters = iters

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import torch

        # RAFT wants sizes divisible by 8 and inputs in [-1, 1].
        n, h, w = frames.shape[:3]
        h8, w8 = h - h % 8, w - w % 8
        x = torch.from_numpy(frames[:, :h8, :w8]).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            flows = self.model(x[:-1], x[1:], num_flow_updates=self.iters)[-1]
        out = np.zeros((n - 1, h, w, 2), np.float32)
        out[:, :h8, :w8] = flows.permute(0, 2, 3, 1).numpy()
        return out


def make_estimator(name: str = "dis", raft_weights: str | None = None, allow_pickle: bool = False):
    if raft_weights:
        return RAFTFlow(raft_weights, allow_pickle=allow_pickle)
    if name == "raft":
        raise ValueError("flow estimator 'raft' needs weights: set flow.raft_weights to a local or s3:// file")
    if name == "farneback":
        return FarnebackFlow()
    return DISFlow()


def measure(frames: np.ndarray, estimator, flow_short_side: int = 256,
            normalize_masks: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Frames (N,H,W,3) uint8 -> (intensity on the 512 reference scale, per-pair magnitudes
    on that scale (N-1, h, w), region masks (N, h, w)) at the flow resolution."""
    from motioncharacter.video import resize_short

    if len(frames) < 2:
        raise ValueError("motion intensity needs at least 2 frames")
    small = resize_short(frames, flow_short_side)
    mags = flow_magnitude(estimator(small)) * (REFERENCE_SHORT_SIDE / flow_short_side)
    return motion_intensity(mags), mags.astype(np.float32), region_masks(mags, normalize_masks)
