"""ID-Animator and DreaMoving features: the math and validation (fast, no generation)."""
from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import pytest
import torch

from motioncharacter.model import control as ctl
from motioncharacter.model.content_guider import ContentGuider, GuiderConditioning
from motioncharacter.model.face_adapter import Resampler
from motioncharacter.model.features import FeatureOptions
from motioncharacter.model.identity_mix import mix
from motioncharacter.model.long_video import check_context
from motioncharacter.model.motion_module import motion_unet
from motioncharacter.model.presets import build_tiny

F_ = 8


@pytest.fixture(scope="module")
def unet():
    p = build_tiny(seed=0)
    return motion_unet(p["unet"], p["motion_adapter"]).eval()


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(1, 4, F_, 32, 32, generator=g), t=torch.tensor(500),
                text=torch.randn(1, 77, 32, generator=g).repeat_interleave(F_, 0),
                clip=torch.randn(1, 17, 32, generator=g), face=torch.randn(1, 128, generator=g))


def _run(unet, x, cond=None, **kw):
    with torch.no_grad():
        return unet(x["sample"], x["t"], encoder_hidden_states=x["text"],
                    cross_attention_kwargs=None if cond is None else cond.kwargs(), **kw).sample


def test_resampler_maps_patch_features_to_query_tokens():
    r = Resampler(in_dim=48, width=32, out_dim=24, num_queries=5, depth=2, heads=4)
    out = r(torch.randn(3, 17, 48))
    assert out.shape == (3, 5, 24)
    # the queries are learned parameters, the same for every input
    assert r.queries.shape == (1, 5, 32) and r.queries.requires_grad


def test_content_guider_zero_weights_are_exactly_text_only(unet, x):
    stock = _run(unet, x)
    u = copy.deepcopy(unet)
    guider = ContentGuider.for_unet(u, clip_hidden_dim=32, face_dim=128, seed=0, zero_init=False, num_queries=4)
    guider.attach(u)
    with torch.no_grad():
        face = guider.face_tokens(x["clip"], x["face"])
        cloth = guider.cloth_tokens(x["clip"])
    assert face.shape == (1, 4 + 4, 32) and cloth.shape == (1, 4, 32)
    zero = _run(u, x, GuiderConditioning(face, cloth, face_scale=0.0, cloth_scale=0.0))
    torch.testing.assert_close(zero, stock, rtol=0, atol=0)
    only_face = _run(u, x, GuiderConditioning(face, cloth, 1.0, 0.0))
    both = _run(u, x, GuiderConditioning(face, cloth, 1.0, 1.0))
    assert (only_face - stock).abs().max() > 1e-4 and (both - only_face).abs().max() > 1e-4
    # eq. 1 is linear in each weight at the attention output: doubling alpha_f doubles that branch's
    # contribution to the first cross-attention layer (checked on one layer, where it holds exactly)
    name, attn = next((n, m) for n, m in u.named_modules() if n.endswith("attn2") and "motion" not in n)
    h = torch.randn(F_, 16, attn.to_q.in_features)
    with torch.no_grad():
        base = attn(h, encoder_hidden_states=x["text"])
        one = attn(h, encoder_hidden_states=x["text"], motioncharacter_conditioning=GuiderConditioning(face, None, 1.0))
        two = attn(h, encoder_hidden_states=x["text"], motioncharacter_conditioning=GuiderConditioning(face, None, 2.0))
    torch.testing.assert_close(two - base, 2 * (one - base), rtol=1e-4, atol=1e-5)


def test_untrained_guider_adds_nothing(unet, x):
    u = copy.deepcopy(unet)
    g = ContentGuider.for_unet(u, clip_hidden_dim=32, face_dim=128, seed=0)  # zero_init (real weights default)
    g.attach(u)
    with torch.no_grad():
        c = GuiderConditioning(g.face_tokens(x["clip"]), g.cloth_tokens(x["clip"]), 1.0, 1.0)
    torch.testing.assert_close(_run(u, x, c), _run(unet, x), rtol=0, atol=1e-6)


def test_identity_mix_hand_computed():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert mix(a, b, 0.0) is a and mix(a, b, 1.0) is b
    torch.testing.assert_close(mix(a, b, 0.3), torch.tensor([[0.7, 0.3]]))
    s = (0.7 ** 2 + 0.3 ** 2) ** 0.5
    torch.testing.assert_close(mix(a, b, 0.3, unit=True), torch.tensor([[0.7 / s, 0.3 / s]]))
    for bad in (-0.1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match="mix_ratio"):
            mix(a, b, bad)
    with pytest.raises(ValueError, match="shapes"):
        mix(a, torch.zeros(1, 3), 0.5)


def test_pose_rendering_from_openpose_json(tmp_path):
    kp = np.zeros((18, 3))
    kp[1] = [32, 8, 1]    # neck
    kp[8] = [32, 56, 1]   # right hip: limb (1, 8) is the vertical line x = 32
    kp[0] = [10, 10, 0]   # nose not detected: not drawn
    doc = {"width": 64, "height": 64,
           "frames": [{"people": [{"pose_keypoints_2d": kp.reshape(-1).tolist()}]}] * 3}
    f = tmp_path / "pose.json"
    f.write_text(json.dumps(doc))
    maps = ctl.pose_maps_from_keypoints(str(f), 3, 64, 64, allow_path=True)
    assert maps.shape == (3, 64, 64, 3) and maps.dtype == np.uint8
    neck_hip = ctl.COLORS[ctl.LIMBS.index((1, 8))]
    # pixel coordinates are rescaled to the 64-wide map: x = 32 / 64 * 63 = 31.5 -> column 32 (rounded)
    assert tuple(maps[0, 32, 32]) == neck_hip
    assert maps[0, 10, 10].sum() == 0 and maps[0, 32, 5].sum() == 0  # missing joint, background
    assert np.array_equal(maps[0], maps[2])
    # normalised coordinates (no canvas) draw the same skeleton
    norm = [[(kp / [64, 64, 1]).tolist()]] * 3
    assert tuple(ctl.pose_maps_from_keypoints(norm, 3, 64, 64)[1, 32, 32]) == neck_hip


@pytest.mark.parametrize("data,match", [
    ([[[[0.5, 0.5]] * 17]], "18 keypoints"),
    ([[[[5.0, 5.0]] * 18]], "no canvas"),
    ({"width": 0, "height": 64, "frames": [[]]}, "positive"),
    ("{not json", "not valid JSON"),
    ([], "non-empty"),
])
def test_bad_keypoints_are_refused(data, match):
    with pytest.raises(ValueError, match=match):
        ctl.parse_keypoints(data)


def test_pose_frame_count_must_match():
    with pytest.raises(ValueError, match="has 2 frames but 8 frames are requested"):
        ctl.pose_maps_from_keypoints([[[[0.5, 0.5]] * 18]] * 2, 8, 64, 64)
    with pytest.raises(ValueError, match="depth video has 4 frames but 8"):
        ctl.load_maps(np.zeros((4, 64, 64, 3), np.uint8), 8, 64, 64, "depth video")
    resized = ctl.load_maps(np.zeros((8, 32, 48, 3), np.uint8), 8, 64, 64, "depth video")
    assert resized.shape == (8, 64, 64, 3)


def test_multicontrolnet_sums_and_zero_scale_skips(x):
    pose, depth = ctl.tiny_controlnet("pose", 1), ctl.tiny_controlnet("depth", 2)
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 255, (F_, 64, 64, 3), dtype=np.uint8)
    cs = [ctl.Control("pose", pose, maps, 1.0), ctl.Control("depth", depth, maps[::-1].copy(), 0.5)]
    prep = [(c, ctl.prepare(c, F_)) for c in cs]
    with torch.no_grad():
        both_d, both_m = ctl.residuals(prep, x["sample"], x["t"], x["text"])
        p_d, p_m = ctl.residuals(prep[:1], x["sample"], x["t"], x["text"])
        d_d, d_m = ctl.residuals(prep[1:], x["sample"], x["t"], x["text"])
        cs[0].scale = cs[1].scale = 0.0
        assert ctl.residuals(prep, x["sample"], x["t"], x["text"]) == (None, None)
    assert len(both_d) == len(p_d) and both_d[0].shape == (F_, 32, 32, 32)
    for a, b, c in zip(both_d + [both_m], p_d + [p_m], d_d + [d_m]):
        torch.testing.assert_close(a, b + c)
    assert p_m.abs().max() > 0


def test_sparse_control_masks_the_other_frames(x):
    sp = ctl.tiny_controlnet("sparse", 3)
    key = np.full((2, 64, 64, 3), 200, np.uint8)
    c = ctl.Control("sparse", sp, key, 1.0, indices=[0, 5])
    t = ctl.prepare(c, F_)
    assert t["cond"].shape == (1, 3, F_, 64, 64) and t["mask"][0, 0, :, 0, 0].tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    with torch.no_grad():
        d, m = ctl.residuals([(c, t)], x["sample"], x["t"], x["text"])
    assert d[-1].shape == (F_, 64, 16, 16) and m.shape == (F_, 64, 16, 16)


@pytest.mark.parametrize("kw,match", [
    (dict(mode="animate"), "unknown mode 'animate'"),
    (dict(mix_image="b.png", mix_ratio=1.5), r"mix_ratio must be in \[0, 1\]"),
    (dict(mix_ratio=0.3), "mix_ratio needs a mix_image"),
    (dict(mode="dreamoving", cloth_weight=0.5), "cloth_weight .* needs a cloth_image"),
    (dict(mode="id-animator", cloth_image="c.png"), "use mode dreamoving"),
    (dict(face_weight=0.5), "face_weight .* belongs to mode dreamoving"),
    (dict(mode="dreamoving", face_weight=9.0), r"face_weight must be a number in \[0, 5\]"),
    (dict(pose_video="p.mp4", pose_keypoints="k.json"), "not both"),
    (dict(pose_scale=-1.0), "pose_scale"),
    (dict(sparse_images=["a.png"], sparse_frames=[]), "one index per image"),
    (dict(sparse_images=["a.png"], sparse_frames=[8]), r"outside \[0, 7\]"),
    (dict(sparse_images=["a", "b"], sparse_frames=[1, 1]), "repeat"),
])
def test_invalid_combinations_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        FeatureOptions(**kw).check(frames=8)


def test_action_is_refused_without_motion_control():
    with pytest.raises(ValueError, match="mode id-animator does not have"):
        FeatureOptions(mode="id-animator").check(8, action="waving")
    FeatureOptions().check(8, action="waving")  # MotionCharacter has it


def test_context_windows():
    assert check_context(16, None, 4, 32) is None          # fits the training length: no windows
    assert check_context(64, None, 4, 32) == 16            # longer: AnimateDiff's 16-frame windows
    assert check_context(24, 8, 4, 32) == 8
    with pytest.raises(ValueError, match="context_length"):
        check_context(24, 40, 4, 32)
    with pytest.raises(ValueError, match="context_stride"):
        check_context(24, 8, 9, 32)


def test_single_file_community_checkpoint(tmp_path):
    """A tiny SD checkpoint in the original single-file key layout, converted by diffusers offline."""
    from safetensors.torch import save_file

    from motioncharacter.model.community import apply_base_checkpoint, base_unet_config
    from motioncharacter.model.inference import load_pipeline

    sys.path.insert(0, os.path.dirname(__file__))
    from features_ldm import text_to_ldm, unet_to_ldm

    other = build_tiny(seed=5)  # "community fine-tune": same architecture, other weights
    sd = unet_to_ldm(other["unet"].state_dict(), layers_per_block=1) | text_to_ldm(other["text_encoder"].state_dict())
    path = tmp_path / "community.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    pipe = load_pipeline(preset="tiny")
    motion_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "motion_modules" in k}
    assert apply_base_checkpoint(pipe, str(path), base_unet_config(None, "tiny")) == {"text_encoder": True,
                                                                                       "unet": True}
    now = pipe.unet.state_dict()
    assert all(torch.equal(now[k], v) for k, v in other["unet"].state_dict().items())
    assert all(torch.equal(now[k], v) for k, v in motion_before.items())  # motion modules kept
    te = pipe.text_encoder.state_dict()
    assert all(torch.equal(te[k], v) for k, v in other["text_encoder"].state_dict().items())
    bad = tmp_path / "bad.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3, 3, 3, 3)}, str(bad))
    import re

    with pytest.raises(ValueError, match=re.escape(str(bad)) + " (is not a single-file SD1.5 checkpoint|does not fit)"):
        apply_base_checkpoint(pipe, str(bad), base_unet_config(None, "tiny"))
    with pytest.raises(ValueError, match="pickled"):
        (tmp_path / "m.ckpt").write_bytes(b"x")
        apply_base_checkpoint(pipe, str(tmp_path / "m.ckpt"), base_unet_config(None, "tiny"))
