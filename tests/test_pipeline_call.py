"""MotionCharacterPipeline.__call__ in diffusers' shape: generator, latents, output_type,
return_dict and callback_on_step_end behave as in AnimateDiffPipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serving_fixtures import face_image

REQ = dict(prompt="a person talking", action="talking", intensity=8.0, num_inference_steps=3, num_frames=4,
           height=64, width=64, guidance_scale=4.0)


def _latent_shape(pipe) -> tuple:
    side = 64 // pipe.vae_scale_factor
    return (1, pipe.unet.config.in_channels, REQ["num_frames"], side, side)


@pytest.fixture(scope="module")
def pipe():
    from motioncharacter.model.inference import load_pipeline

    return load_pipeline(preset="tiny")


def test_default_output_is_diffusers_and_uint8_is_the_same_video(pipe):
    from diffusers.pipelines.animatediff.pipeline_output import AnimateDiffPipelineOutput

    out = pipe(face_image(), seed=4, **REQ)
    assert isinstance(out, AnimateDiffPipelineOutput)
    video = out.frames
    assert video.shape == (1, 4, 64, 64, 3) and video.dtype == np.float32 and 0 <= video.min() <= video.max() <= 1
    frames = pipe(face_image(), seed=4, output_type="uint8", return_dict=False, **REQ)
    assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8
    assert np.abs(video[0] * 255 - frames).max() <= 0.5 + 1e-3  # the same frames, rounded
    latent = pipe(face_image(), seed=4, output_type="latent", return_dict=False, **REQ)
    assert tuple(latent.shape) == _latent_shape(pipe)


def test_generator_and_latents_replace_the_seed(pipe):
    kw = dict(output_type="uint8", return_dict=False, **REQ)
    by_seed = pipe(face_image(), seed=9, **kw)
    by_generator = pipe(face_image(), generator=torch.Generator().manual_seed(9), **kw)
    assert np.array_equal(by_seed, by_generator)
    noise = torch.randn(_latent_shape(pipe), generator=torch.Generator().manual_seed(9))
    assert np.array_equal(pipe(face_image(), seed=0, latents=noise, **kw), by_seed)  # the seed is not used
    with pytest.raises(ValueError, match="latents must be a tensor of shape"):
        pipe(face_image(), latents=noise[:, :, :2], **kw)
    with pytest.raises(ValueError, match="output_type"):
        pipe(face_image(), output_type="gif", **REQ)


def test_callback_on_step_end_sees_and_replaces_latents(pipe):
    kw = dict(seed=2, output_type="uint8", return_dict=False, **REQ)
    seen = []

    def watch(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return tensors

    plain = pipe(face_image(), callback_on_step_end=watch, **kw)
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[2] == _latent_shape(pipe) for s in seen)
    assert np.array_equal(plain, pipe(face_image(), **kw))  # handing latents back unchanged changes nothing

    def flatten(p, i, t, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else tensors

    flat = pipe(face_image(), callback_on_step_end=flatten, **kw)
    assert not np.array_equal(flat, plain)
    assert flat.std(axis=0).max() == 0  # zero latents decode to one frame repeated: the callback's latents won
