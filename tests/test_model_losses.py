"""Losses of MotionCharacter against hand-computed cases (eq. 4, 9, 10, 11)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from motioncharacter.model import losses as L


def test_normalize_flow_mask_eq9():
    f = np.array([0.0, 63.75, 127.5, 191.25, 255.0, 1000.0])
    # f/255 + 0.5 = 0.5, 0.75, 1.0, 1.25, 1.5, 4.42 -> clipped to [1, 1.5]
    assert np.allclose(L.normalize_flow_mask(f), [1.0, 1.0, 1.0, 1.25, 1.5, 1.5])
    assert torch.allclose(L.normalize_flow_mask(torch.tensor([191.25])), torch.tensor([1.25]))


def _noise_case():
    noise = torch.zeros(1, 1, 2, 2, 2)
    noise[0, 0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # frame 1 stays zero
    mask = torch.tensor([[[1.0, 1.5], [1.0, 1.5]], [[1.0, 1.0], [1.0, 1.0]]])  # (F, h, w)
    return noise, mask


def test_region_aware_loss_eq10_hand_case():
    noise, mask = _noise_case()
    pred = torch.zeros_like(noise)
    # (1*1 + 1.5*4 + 1*9 + 1.5*16 + 0) / (N H' W' = 2*2*2) = 40 / 8
    assert L.region_aware_loss(pred, noise, mask).item() == pytest.approx(5.0)
    # masks of ones reduce to plain MSE: (1 + 4 + 9 + 16) / 8
    assert L.region_aware_loss(pred, noise, torch.ones(2, 2, 2)).item() == pytest.approx(30 / 8)
    assert L.region_aware_loss(pred, noise).item() == pytest.approx(30 / 8)


def test_region_aware_loss_resizes_masks_to_latent():
    noise, mask = _noise_case()
    big = np.kron(mask.numpy(), np.ones((4, 4), np.float32))  # (2, 8, 8) pixel-resolution mask
    assert big.shape == (2, 8, 8)
    assert L.region_aware_loss(torch.zeros_like(noise), noise, big).item() == pytest.approx(5.0)
    # a batch of two clips, channels averaged: second clip identical -> same value
    n2 = torch.cat([noise, noise]).repeat(1, 4, 1, 1, 1)
    m2 = np.stack([big, big])
    assert L.region_aware_loss(torch.zeros_like(n2), n2, m2).item() == pytest.approx(5.0)


def test_region_aware_loss_shape_errors():
    noise, _ = _noise_case()
    with pytest.raises(ValueError, match="frames"):
        L.region_aware_loss(noise, noise, torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="B, C, F, h, w"):
        L.region_aware_loss(noise[0], noise[0])


def test_id_consistency_eq4_hand_case():
    ref = torch.tensor([1.0, 0.0])
    frames = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    # cos = 1, 0, 1/sqrt(2)
    expected = 1 - (1 + 0 + 1 / math.sqrt(2)) / 3
    assert L.id_consistency_loss(ref, frames).item() == pytest.approx(expected, abs=1e-6)
    assert L.id_consistency_loss(ref[None], frames[None]).item() == pytest.approx(expected, abs=1e-6)
    assert L.id_consistency_loss(ref, ref[None].repeat(4, 1)).item() == pytest.approx(0.0, abs=1e-6)


def test_ddim_x0_hand_case():
    # a = 0.64: sqrt(a) = 0.8, sqrt(1 - a) = 0.6; (1.0 - 0.6 * 0.5) / 0.8 = 0.875
    z0 = L.ddim_x0(torch.ones(1, 1, 1, 1, 1), torch.full((1, 1, 1, 1, 1), 0.5), torch.tensor([0.64]))
    assert z0.item() == pytest.approx(0.875)


def test_ddim_x0_inverts_forward_noising():
    from diffusers import DDIMScheduler

    from motioncharacter.model.presets import animatediff_scheduler_config

    s = DDIMScheduler(**animatediff_scheduler_config())
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.tensor([100, 900])
    zt = s.add_noise(z0, eps, t)
    assert torch.allclose(L.ddim_x0(zt, eps, s.alphas_cumprod[t]), z0, atol=1e-4)


def test_total_loss_eq11():
    assert L.total_loss(torch.tensor(5.0), torch.tensor(0.4), beta=0.1).item() == pytest.approx(5.04)
    with pytest.raises(ValueError, match="beta"):
        L.total_loss(torch.tensor(1.0), torch.tensor(1.0), beta=float("nan"))


def test_id_consistency_end_to_end_is_differentiable():
    """DDIM estimate -> tiny VAE decode -> differentiable face model -> eq. 4, with gradients
    reaching the noise prediction; and the value equals the step-by-step computation."""
    from diffusers import DDIMScheduler

    from motioncharacter.model.presets import animatediff_scheduler_config, build_tiny

    vae = build_tiny()["vae"].requires_grad_(False)
    face = L.TinyFaceEncoder(dim=128).requires_grad_(False)
    s = DDIMScheduler(**animatediff_scheduler_config())
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(1, 4, 4, 32, 32, generator=g)
    eps = torch.randn(1, 4, 4, 32, 32, generator=g, requires_grad=True)
    ref = face(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1)[0]
    t = torch.tensor([400])
    loss = L.id_consistency_from_prediction(zt, eps, t, s.alphas_cumprod, vae, face, ref, frame_stride=2,
                                            box=(0.25, 0.25, 0.75, 0.75))
    loss.backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert eps.grad[:, :, 1].abs().sum() == 0  # frame 1 skipped by frame_stride=2
    with torch.no_grad():
        z0 = (zt - (1 - s.alphas_cumprod[400]).sqrt() * eps) / s.alphas_cumprod[400].sqrt()
        x = vae.decode(z0[0, :, ::2].permute(1, 0, 2, 3) / vae.config.scaling_factor).sample[..., 16:48, 16:48]
        e = face(x)
        want = 1 - torch.nn.functional.cosine_similarity(e, ref[None]).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)


def test_id_consistency_frame_and_sample_weights_hand_case():
    """Frames without a face do not count; each clip's term is scaled by its weight and the mean
    runs over the clips that have frames (a clip with none adds nothing and is not counted)."""
    ref = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    frames = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],      # cos 1, 0
                           [[-1.0, 0.0], [1.0, 0.0]],     # cos -1, 1
                           [[0.0, 1.0], [0.0, 1.0]]])     # no valid frame
    fw = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    # clip 0: 1 - 0.5 = 0.5; clip 1: only frame 0 counts: 1 - (-1) = 2; clip 2: none
    assert L.id_consistency_loss(ref, frames, fw).item() == pytest.approx((0.5 + 2.0) / 2)
    sw = torch.tensor([0.5, 0.25, 1.0])
    assert L.id_consistency_loss(ref, frames, fw, sw).item() == pytest.approx((0.5 * 0.5 + 0.25 * 2.0) / 2)
    # sample weights alone: every frame counts
    assert L.id_consistency_loss(ref[:2], frames[:2], sample_weights=sw[:2]).item() == pytest.approx(
        (0.5 * 0.5 + 0.25 * 1.0) / 2)


def test_id_timestep_weights_alpha_bar_and_bound():
    a = torch.tensor([0.9, 0.5, 0.1, 0.01])
    t = torch.tensor([0, 2, 3])
    assert torch.allclose(L.id_timestep_weights(a, t), torch.tensor([0.9, 0.1, 0.01]))
    assert torch.allclose(L.id_timestep_weights(a, t, "alpha_bar", max_timestep=3), torch.tensor([0.9, 0.1, 0.0]))
    assert torch.equal(L.id_timestep_weights(a, t, "none", max_timestep=1), torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="snr"):
        L.id_timestep_weights(a, t, "snr")


def test_id_consistency_with_landmarks_aligns_each_frame():
    """With landmarks, each decoded frame is warped to the ArcFace template before embedding; a
    frame without landmarks neither counts nor gets gradient."""
    from diffusers import DDIMScheduler

    from motioncharacter.model.arcface import ARCFACE_TEMPLATE, align_faces
    from motioncharacter.model.presets import animatediff_scheduler_config, build_tiny

    vae = build_tiny()["vae"].requires_grad_(False)
    face = L.TinyFaceEncoder(dim=16).requires_grad_(False)
    s = DDIMScheduler(**animatediff_scheduler_config())
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(1, 4, 2, 16, 16, generator=g)
    eps = torch.randn(1, 4, 2, 16, 16, generator=g, requires_grad=True)
    ref = face(torch.rand(1, 3, 32, 32, generator=g) * 2 - 1)[0]
    t = torch.tensor([300])
    # frame 0: a face at 0.4x template scale near the top left; frame 1: not detected
    lm = torch.stack([ARCFACE_TEMPLATE * 0.4 + torch.tensor([3.0, 2.0]), torch.zeros(5, 2)])[None]
    valid = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([0.5])
    loss = L.id_consistency_from_prediction(zt, eps, t, s.alphas_cumprod, vae, face, ref, landmarks=lm,
                                            landmark_valid=valid, sample_weights=w)
    loss.backward()
    assert eps.grad[:, :, 0].abs().sum() > 0 and eps.grad[:, :, 1].abs().sum() == 0
    with torch.no_grad():
        a = s.alphas_cumprod[300]
        z0 = (zt - (1 - a).sqrt() * eps) / a.sqrt()
        x = vae.decode(z0[0, :, :1].permute(1, 0, 2, 3) / vae.config.scaling_factor).sample
        e = face(align_faces(x, lm[0, :1], size=face.input_size))
        want = 0.5 * (1 - torch.nn.functional.cosine_similarity(e, ref[None]))
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
