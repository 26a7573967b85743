"""Training losses of MotionCharacter (paper eq. 4, 9, 10, 11). Pure tensor functions.

Shapes follow UNetMotionModel: noise tensors are (B, C, F, h, w) latents.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def normalize_flow_mask(f_fg):
    """Eq. 9: M_norm = clip(f_fg / 255 + 0.5, 1.0, 1.5) of the foreground flow magnitude."""
    if isinstance(f_fg, torch.Tensor):
        return (f_fg / 255.0 + 0.5).clamp(1.0, 1.5)
    return np.clip(np.asarray(f_fg, dtype=np.float32) / 255.0 + 0.5, 1.0, 1.5)


def resize_masks(masks, size: tuple[int, int], batch: int | None = None) -> torch.Tensor:
    """(F, H, W) or (B, F, H, W) masks at any resolution -> (B, 1, F, h, w) at the latent size.

    Area interpolation averages the pixels under each latent cell, so values stay in [1, 1.5].
    """
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks, dtype=torch.float32)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4:
        raise ValueError(f"masks must be (F, H, W) or (B, F, H, W), got shape {tuple(m.shape)}")
    if batch is not None and m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, -1, -1, -1)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="area")
    return m[:, None]


def region_aware_loss(noise_pred: torch.Tensor, noise: torch.Tensor, masks=None) -> torch.Tensor:
    """Eq. 10: mean over frames and latent positions of M_norm * (eps - eps_hat)^2.

    Also averaged over batch and latent channels, so masks of ones give exactly the usual
    MSE diffusion loss. ``masks`` are data preparation's normalised masks (values in
    [1, 1.5]), shape (F, H, W) or (B, F, H, W), at any resolution; ``None`` means ones.
    """
    if noise_pred.shape != noise.shape or noise.ndim != 5:
        raise ValueError(f"noise tensors must both be (B, C, F, h, w), got {tuple(noise_pred.shape)} "
                         f"and {tuple(noise.shape)}")
    sq = (noise.float() - noise_pred.float()) ** 2
    if masks is None:
        return sq.mean()
    m = resize_masks(masks, noise.shape[-2:], batch=noise.shape[0]).to(sq.device)
    if m.shape[0] != noise.shape[0] or m.shape[2] != noise.shape[2]:
        raise ValueError(f"masks cover {m.shape[0]} clip(s) x {m.shape[2]} frames but the noise is "
                         f"{noise.shape[0]} x {noise.shape[2]}")
    return (m * sq).mean()


def id_consistency_loss(ref_embedding: torch.Tensor, frame_embeddings: torch.Tensor,
                        frame_weights: torch.Tensor | None = None,
                        sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: 1 - mean_i cos(phi(I), phi(X_i)).

    ``ref_embedding`` (d,) or (B, d); ``frame_embeddings`` (N, d) or (B, N, d). Optional
    ``frame_weights`` (B, N) in {0, 1} mark the frames that count (those with a detected face);
    a clip's term averages over them, and a clip with none contributes 0. ``sample_weights`` (B,)
    scale each clip's term (alpha-bar_t, see ``id_timestep_weights``); the result is the mean
    over the clips that have frames, so low weights lower the loss instead of being normalised away.
    """
    ref = ref_embedding if ref_embedding.ndim == 2 else ref_embedding[None]
    frames = frame_embeddings if frame_embeddings.ndim == 3 else frame_embeddings[None]
    cos = F.cosine_similarity(frames.float(), ref[:, None].float(), dim=-1)
    if frame_weights is None and sample_weights is None:
        return 1.0 - cos.mean()
    fw = torch.ones_like(cos) if frame_weights is None else frame_weights.to(cos).reshape(cos.shape)
    counted = fw.sum(-1)
    per_clip = (fw * (1.0 - cos)).sum(-1) / counted.clamp_min(1.0)
    if sample_weights is not None:
        per_clip = per_clip * sample_weights.to(cos).reshape(-1)
    return per_clip.sum() / (counted > 0).sum().clamp_min(1)


def id_timestep_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, weighting: str = "alpha_bar",
                        max_timestep: int = 0) -> torch.Tensor:
    """(B,) weight of eq. 4 per sample. The x0 estimate (z_t - sqrt(1-a) eps) / sqrt(a) carries the
    noise prediction's error times sqrt((1-a)/a) (~25x at t = 999 on SD's schedule), so identity
    measured on it is mostly noise at large t. ``weighting``: "alpha_bar" weights by a = alpha-bar_t,
    "none" by 1; ``max_timestep`` > 0 also zeroes every t >= max_timestep."""
    if weighting not in ("alpha_bar", "none"):
        raise ValueError(f"ID-loss weighting must be 'alpha_bar' or 'none', got {weighting!r}")
    t = timesteps.to(alphas_cumprod.device).long()
    w = alphas_cumprod[t].float() if weighting == "alpha_bar" else torch.ones(t.shape, device=t.device)
    if max_timestep > 0:
        w = w * (t < max_timestep).float()
    return w


def ddim_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """DDIM's clean-latent estimate z0 = (z_t - sqrt(1 - a) eps) / sqrt(a), a = alpha_bar_t per sample."""
    a = torch.as_tensor(alpha_bar_t, dtype=z_t.dtype, device=z_t.device).reshape(-1, *([1] * (z_t.ndim - 1)))
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def decode_frames(vae, z0: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) latents -> (B, F, 3, H, W) images in [-1, 1] (differentiable)."""
    b, c, f, h, w = z0.shape
    x = vae.decode(z0.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / vae.config.scaling_factor).sample
    return x.reshape(b, f, *x.shape[1:])


def id_consistency_from_prediction(z_t, eps_pred, timesteps, alphas_cumprod, vae, face_model, ref_embedding,
                                   frame_stride: int = 1, box: tuple[float, float, float, float] | None = None,
                                   landmarks: torch.Tensor | None = None, landmark_valid: torch.Tensor | None = None,
                                   sample_weights: torch.Tensor | None = None):
    """Eq. 4 end to end: DDIM x0 estimate at t, VAE decode, embed the face in each frame.

    ``face_model`` is a differentiable embedder (see ``TorchFaceEmbedder``). ``landmarks``
    (B, F, 5, 2), in pixels of the decoded frames, align each frame's face to the ArcFace
    template (``arcface.align_faces``); ``landmark_valid`` (B, F) marks frames where the face
    was detected (others do not count). Without landmarks, ``box`` is the face region
    (x0, y0, x1, y1) as fractions of the frame, the whole frame when None. ``frame_stride`` > 1
    decodes every n-th frame only, to save memory. ``sample_weights`` (B,): see
    ``id_consistency_loss``.
    """
    a = alphas_cumprod.to(z_t.device)[timesteps]
    z0 = ddim_x0(z_t, eps_pred, a)[:, :, ::frame_stride]
    frames = decode_frames(vae, z0)
    b, n = frames.shape[:2]
    x = frames.reshape(b * n, *frames.shape[2:])
    valid = None
    if landmarks is not None:
        from .arcface import ARCFACE_TEMPLATE, align_faces

        lm = landmarks[:, ::frame_stride].to(x.device).float().reshape(b * n, 5, 2)
        if landmark_valid is not None:
            valid = landmark_valid[:, ::frame_stride].to(x.device).reshape(b, n)
            # frames without a face (weight 0) get the template's place, so their embedding stays finite
            lm = torch.where(valid.reshape(-1, 1, 1) > 0, lm, ARCFACE_TEMPLATE.to(x.device) * min(x.shape[-2:]) / 112)
        x = align_faces(x, lm, size=getattr(face_model, "input_size", 112))
    elif box is not None:
        H, W = x.shape[-2:]
        x0, y0, x1, y1 = box
        x = x[..., int(y0 * H):max(int(y0 * H) + 1, int(math.ceil(y1 * H))),
              int(x0 * W):max(int(x0 * W) + 1, int(math.ceil(x1 * W)))]
    emb = face_model(x).reshape(b, n, -1)
    return id_consistency_loss(ref_embedding, emb, valid, sample_weights)


def total_loss(region_loss: torch.Tensor, id_loss: torch.Tensor, beta: float) -> torch.Tensor:
    """Eq. 11: L_total = L_R + beta * L_id."""
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return region_loss + beta * id_loss


class TorchFaceEmbedder(nn.Module):
    """Interface of a differentiable face embedder phi for eq. 4: images (N, 3, H, W) in
    [-1, 1] -> (N, dim) embeddings. Subclasses set ``name`` and ``dim``; the reference
    embedding phi(I) must come from the same model."""

    name = "abstract"
    dim = 0
    input_size = 112


class TinyFaceEncoder(TorchFaceEmbedder):
    """A small random CNN used by the tiny preset and the tests to exercise the gradient
    path of eq. 4. It is NOT a face recognizer: its similarities mean nothing. Real
    training uses ``arcface.ArcFace`` (insightface's recognition ONNX converted to torch)."""

    name = "tiny-random"

    def __init__(self, dim: int = 128, input_size: int = 32, seed: int = 0):
        super().__init__()
        self.dim, self.input_size = dim, input_size
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, dim),
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return F.normalize(self.net(x), dim=-1)
