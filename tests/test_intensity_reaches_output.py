"""The requested motion intensity and the motion scale reach the generated video, through
``generate``, through the CLI and through a real Triton server.

The model is the tiny preset with a deliberately non-zero adapter (random weights, std 0.3)
saved in a weights folder, so the motion branch is connected but untrained: these tests show
the wiring, ``tests/test_learn.py`` and ``demo --learn`` show that a trained model follows it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serving_fixtures import face_image

REQ = dict(steps=3, frames=8, height=64, width=64, seed=5, action="moving head", guidance=4.0)
PROMPT = "a person moving head"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from motioncharacter.model.adapter import MotionCharacterAdapter
    from motioncharacter.model.loading import load_components, save_adapter
    from motioncharacter.model.presets import save_tiny_weights

    d = save_tiny_weights(tmp_path_factory.mktemp("w") / "weights", with_adapter=False)
    unet = load_components(str(d))["unet"]
    ad = MotionCharacterAdapter.for_unet(unet, clip_image_dim=32, face_dim=128, seed=0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(ad, str(d / "adapter"))
    return d


@pytest.fixture(scope="module")
def pipe(weights):
    from motioncharacter.model.inference import load_pipeline

    return load_pipeline(weights=str(weights))


def _gen(pipe, **kw):
    from motioncharacter.model.inference import generate

    return generate(pipe, image=face_image(), prompt=PROMPT, **{**REQ, **kw}).astype(np.int16)


def test_intensity_and_motion_scale_change_the_video(pipe):
    low, high = _gen(pipe, intensity=2.0), _gen(pipe, intensity=18.0)
    assert np.abs(low - high).mean() > 0.5
    assert np.array_equal(low, _gen(pipe, intensity=2.0))  # and it is not noise: same request, same video
    # alpha = 0 switches the intensity tokens off: the intensity no longer matters...
    off_low, off_high = _gen(pipe, intensity=2.0, motion_scale=0.0), _gen(pipe, intensity=18.0, motion_scale=0.0)
    assert np.array_equal(off_low, off_high)
    # ...and alpha itself changes the video
    assert np.abs(high - off_high).mean() > 0.5
    assert np.abs(high - _gen(pipe, intensity=18.0, motion_scale=2.0)).mean() > 0.5


def test_id_scale_changes_the_video(pipe):
    """lambda (eq. 3) through ``generate``: the plain path and the feature path (frames beyond the
    training length: sliding windows). The adapter is non-zero, so a dropped id_scale shows."""
    for frames in (REQ["frames"], 20):
        full, off = _gen(pipe, intensity=8.0, frames=frames), _gen(pipe, intensity=8.0, frames=frames, id_scale=0.0)
        # generation is deterministic on the CPU: a dropped id_scale gives the identical video
        assert not np.array_equal(full, off), f"{frames} frames: id_scale=0 gave the id_scale=1 video"
        assert not np.array_equal(full, _gen(pipe, intensity=8.0, frames=frames, id_scale=0.5))


def _cli_video(weights, tmp_path, name, *extra):
    from PIL import Image

    from motioncharacter.cli import main
    from motioncharacter.video import open_video, read_frames

    face = tmp_path / "face.png"
    if not face.exists():
        Image.fromarray(face_image()).save(face)
    out = tmp_path / f"{name}.mp4"
    args = ["generate", "--weights", str(weights), "--image", str(face), "--prompt", PROMPT, "--out", str(out),
            "--steps", "3", "--frames", "8", "--height", "64", "--width", "64", "--seed", "5",
            "--action", "moving head", "--guidance", "4", *extra]
    assert main(args) == 0
    vr = open_video(out)
    return read_frames(vr, list(range(len(vr)))).astype(np.int16)


def test_cli_intensity_and_motion_scale_change_the_video(weights, tmp_path):
    low = _cli_video(weights, tmp_path, "low", "--intensity", "2")
    high = _cli_video(weights, tmp_path, "high", "--intensity", "18")
    off = _cli_video(weights, tmp_path, "off", "--intensity", "18", "--motion-scale", "0")
    assert np.abs(low - high).mean() > 0.5
    assert np.abs(high - off).mean() > 0.5
    no_id = _cli_video(weights, tmp_path, "no-id", "--intensity", "18", "--id-scale", "0")
    assert not np.array_equal(high, no_id)  # --id-scale reaches the model


@pytest.mark.services
def test_triton_intensity_and_motion_scale_change_the_video(weights, pipe, tmp_path):
    from motioncharacter.serving.client import MotionCharacterClient
    from motioncharacter.serving.repository import DeployOptions, export_repository
    from motioncharacter.serving.server import TritonServer

    repo = tmp_path / "repo"
    export_repository(str(repo), DeployOptions(weights=str(weights)))
    with TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None,
                      log_file=tmp_path / "triton.log") as server:
        with MotionCharacterClient(server.http_url, timeout_s=300) as c:
            def remote(**kw):
                args = {**REQ, **kw}
                return c.generate(face_image(), PROMPT, **args).frames.astype(np.int16)

            low, high = remote(intensity=2.0), remote(intensity=18.0)
            off_high = remote(intensity=18.0, motion_scale=0.0)
    assert np.abs(low - high).mean() > 0.5
    assert np.abs(high - off_high).mean() > 0.5
    assert np.abs(high - _gen(pipe, intensity=18.0)).max() <= 1  # the served model is the same model
