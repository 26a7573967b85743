"""ID-Animator / DreaMoving features end to end on the tiny preset (1 denoising step, no CFG)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from motioncharacter.fixtures import package_face
from motioncharacter.model.inference import generate, load_pipeline


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(preset="tiny")


@pytest.fixture(scope="module")
def faces():
    return package_face("grace_hopper"), package_face("astronaut")


def _gen(pipe, img, **kw):
    base = dict(image=img, prompt="a person", steps=1, guidance=1.0, frames=8, height=64, width=64, seed=0)
    return generate(pipe, **(base | kw))


def test_id_animator_mode_and_identity_mixing(pipe, faces):
    a, b = faces
    plain = _gen(pipe, a, mode="id-animator")
    assert plain.shape == (8, 64, 64, 3) and plain.dtype == np.uint8
    assert np.array_equal(_gen(pipe, a, mode="id-animator", mix_image=b, mix_ratio=0.0), plain)
    mixed = _gen(pipe, a, mode="id-animator", mix_image=b, mix_ratio=0.5)
    assert np.abs(mixed.astype(int) - plain).max() > 0
    # the MotionCharacter processors are back afterwards: the plain call is unchanged
    from motioncharacter.model.attention import MotionCharacterAttnProcessor

    assert any(isinstance(p, MotionCharacterAttnProcessor) for p in pipe.unet.attn_processors.values())


def test_dreamoving_zero_weights_reduce_to_text_only(pipe, faces):
    a, b = faces
    text_only = _gen(pipe, a, mode="id-animator", id_scale=0.0)  # no image branch at all
    zero = _gen(pipe, a, mode="dreamoving", face_weight=0.0, cloth_image=b, cloth_weight=0.0)
    assert np.array_equal(zero, text_only)
    guided = _gen(pipe, a, mode="dreamoving", face_weight=1.0, cloth_image=b, cloth_weight=0.5)
    assert np.abs(guided.astype(int) - text_only).max() > 0


def test_pose_keypoints_and_depth_video_with_scales(pipe, faces):
    a, _ = faces
    kp = [[[[0.5, 0.1 + 0.05 * i, 1.0]] * 18] for i in range(8)]
    depth = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None, None], (8, 1, 64, 3))
    base = _gen(pipe, a, mode="id-animator")
    off = _gen(pipe, a, mode="id-animator", pose_keypoints=json.dumps(kp), depth_video=depth, pose_scale=0.0,
               depth_scale=0.0)
    assert np.array_equal(off, base)
    on = _gen(pipe, a, mode="id-animator", pose_keypoints=kp, depth_video=depth, pose_scale=1.0, depth_scale=0.5)
    assert on.shape == (8, 64, 64, 3) and np.abs(on.astype(int) - base).max() > 0
    with pytest.raises(ValueError, match="depth video has 4 frames but 8"):
        _gen(pipe, a, depth_video=depth[:4])


def _differ(x, y) -> bool:
    """Another video. Generation is deterministic on the CPU, so an input that does not reach the
    model gives the identical array (measured effects are small at 1 step on the tiny preset)."""
    return x.shape == y.shape and np.abs(x.astype(int) - y.astype(int)).max() > 0


def test_sparsectrl_keyframes_with_motioncharacter(pipe, faces):
    """The keyframes, their frame indices and their scale each reach the video (the tiny SparseCtrl's
    zero convolutions are random, so a connected keyframe shows)."""
    a, b = faces
    none = _gen(pipe, a)
    out = _gen(pipe, a, sparse_images=[a, b], sparse_frames=[0, 7])
    assert out.shape == (8, 64, 64, 3)
    assert _differ(out, none)  # the keyframes are used...
    assert _differ(out, _gen(pipe, a, sparse_images=[b, a], sparse_frames=[0, 7]))  # ...which image...
    assert _differ(out, _gen(pipe, a, sparse_images=[a, b], sparse_frames=[0, 3]))  # ...on which frame
    assert np.array_equal(_gen(pipe, a, sparse_images=[a, b], sparse_frames=[0, 7], sparse_scale=0.0), none)


def test_long_video_through_sliding_windows(pipe, faces):
    a, _ = faces
    out = _gen(pipe, a, frames=16, context_length=8, context_stride=4)
    assert out.shape == (16, 64, 64, 3)
    assert not pipe.free_noise_enabled  # switched off again after the call
    # the windows shape the video: 16 frames in one window (the training length) is another video,
    # and so is another stride; the same request repeats exactly
    assert _differ(out, _gen(pipe, a, frames=16))
    assert _differ(out, _gen(pipe, a, frames=16, context_length=8, context_stride=2))
    assert np.array_equal(out, _gen(pipe, a, frames=16, context_length=8, context_stride=4))
    with pytest.raises(ValueError, match="context_length must be"):
        _gen(pipe, a, frames=16, context_length=64)


def test_cli_feature_options(tmp_path, faces):
    from PIL import Image

    from motioncharacter.cli import main

    a, b = faces
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    common = ["generate", "--preset", "tiny", "--image", str(tmp_path / "a.png"), "--prompt", "a person",
              "--steps", "1", "--guidance", "1"]
    out = tmp_path / "v.gif"
    assert main(common + ["--mode", "id-animator", "--mix-image", str(tmp_path / "b.png"), "--mix-ratio", "0.3",
                          "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(common + ["--mix-image", str(tmp_path / "b.png"), "--mix-ratio", "1.5", "--out", str(out)]) != 0
    assert main(common + ["--mode", "dreamoving", "--cloth-weight", "0.5", "--out", str(out)]) != 0
    with pytest.raises(SystemExit):
        main(common + ["--mode", "animate", "--out", str(out)])


def test_triton_request_parsing_of_feature_inputs(faces):
    import cv2

    from motioncharacter.serving.request_args import Limits, parse

    a, b = faces
    png = cv2.imencode(".png", cv2.cvtColor(a, cv2.COLOR_RGB2BGR))[1].tobytes()
    png_b = cv2.imencode(".png", cv2.cvtColor(b, cv2.COLOR_RGB2BGR))[1].tobytes()
    req = {"image": np.array([png], object), "prompt": np.array([b"a person"], object),
           "mode": np.array([b"dreamoving"], object), "mix_image": np.array([png_b], object),
           "mix_ratio": np.array([0.25], np.float32), "face_weight": np.array([0.0], np.float32),
           "pose_keypoints": np.array([b"[]"], object), "depth_scale": np.array([0.5], np.float32),
           "context_length": np.array([8], np.int32)}
    kw = parse(req.get, Limits())
    assert kw["mode"] == "dreamoving" and kw["mix_ratio"] == 0.25 and kw["face_weight"] == 0.0
    assert kw["mix_image"].shape == b.shape and kw["pose_keypoints"] == "[]" and kw["depth_scale"] == 0.5
    assert kw["context_length"] == 8 and "cloth_weight" not in kw and "pose_scale" not in kw
    plain = parse({"image": req["image"], "prompt": req["prompt"]}.get, Limits())
    assert not set(plain) & {"mode", "mix_image", "context_length"}  # unchanged base request
    with pytest.raises(ValueError, match="mix_ratio"):
        parse((req | {"mix_ratio": np.array([-3.0], np.float32)}).get, Limits())


@pytest.fixture
def attention_warnings():
    """What diffusers' Attention logs (it warns on every call about a keyword its processor does not take)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("diffusers.models.attention_processor")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


@pytest.mark.parametrize("mode", ["motioncharacter", "id-animator", "dreamoving"])
def test_conditioning_travels_under_the_projects_own_key(pipe, faces, attention_warnings, mode):
    """Every layer takes the key quietly, and the conditioning reaches the processors by that key only:
    an IP-Adapter-style ``ip_hidden_states`` reader sees nothing."""
    from motioncharacter.model.attention import COND_KEY, IgnoresConditioning

    assert COND_KEY == "motioncharacter_conditioning"
    seen = {}

    class Reader:  # a user's processor on a self-attention layer, reading IP-Adapter's key
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, *a, ip_hidden_states=None, motioncharacter_conditioning=None, **kw):
            seen.setdefault("ip", ip_hidden_states)
            seen.setdefault("ours", motioncharacter_conditioning)
            return self.inner(attn, hidden_states, *a, **kw)

    name, layer = next((n, m) for n, m in pipe.unet.named_modules()
                       if n.endswith("attn1") and "motion_modules" not in n)  # a spatial self-attention
    wrapped = layer.processor
    assert isinstance(wrapped, IgnoresConditioning)
    layer.set_processor(Reader(wrapped.inner))
    try:
        frames = _gen(pipe, faces[0], **({"action": "smiling"} if mode == "motioncharacter" else {"mode": mode}))
    finally:
        layer.set_processor(wrapped)
    assert frames.shape == (8, 64, 64, 3)
    assert seen["ip"] is None and seen["ours"] is not None, name
    assert not [r.getMessage() for r in attention_warnings]


def test_fused_projections_keep_the_key_quiet(faces, attention_warnings):
    from motioncharacter.model.acceleration import Acceleration

    fused = load_pipeline(preset="tiny", acceleration=Acceleration(fuse_qkv=True))
    plain = load_pipeline(preset="tiny")
    a, b = _gen(fused, faces[0], action="smiling"), _gen(plain, faces[0], action="smiling")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # fused QKV: the same video
    assert not [r.getMessage() for r in attention_warnings]
