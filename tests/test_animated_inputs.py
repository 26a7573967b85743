"""Animated images and videos are sampled by time (frame durations, decord timestamps), and metrics
that lack frames are absent with the counts. Every expected sequence is worked out by hand."""
from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from motioncharacter.video import (Timeline, VideoError, is_animated, open_media, open_video, read_frames,
                                   sample_indices, write_video)

RGB = {"A": (255, 0, 0), "B": (0, 255, 0), "C": (0, 0, 255)}


def _texture(size=96, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    small = (rng.random((size // 6, size // 6, 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _save_animation(path, names, durations, **kw):
    imgs = [Image.new("RGB", (32, 32), RGB[n]) for n in names]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=durations, loop=0, **kw)
    return path


def _names(frames) -> str:
    """Each frame's colour as its letter (nearest of A, B, C: lossy codecs shift values a little)."""
    ref = np.array(list(RGB.values()), float)
    mean = frames.reshape(len(frames), -1, 3).mean(1)
    return "".join("ABC"[np.argmin(((ref - m) ** 2).sum(1))] for m in mean)


def _metrics_json(capsys, path, *args) -> dict:
    from motioncharacter.cli import main

    assert main(["metrics", str(path), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


# ---- merged duplicate GIF frames -----------------------------------------------------------

def test_merged_still_gif_gives_16_frames_at_8fps_and_static_metrics(tmp_path, capsys):
    tex = Image.fromarray(_texture())
    path = tmp_path / "still.gif"
    tex.save(path, save_all=True, append_images=[tex.copy() for _ in range(15)], duration=125, loop=0)
    with Image.open(path) as im:  # Pillow merged the 16 identical frames into one of 16 x 125 ms
        assert im.n_frames == 1 and im.info["duration"] == 2000

    media = open_media(path)
    assert media.timeline.duration == pytest.approx(2.0)
    frames, times = media.sample(8.0, 64)
    assert len(frames) == 16 and (frames == frames[0]).all()
    np.testing.assert_allclose(times, np.arange(16) / 8)

    out = _metrics_json(capsys, path)
    m = out["metrics"]
    assert out["frames"] == 16
    assert m["dynamic_degree_dis"]["value"] == 0.0
    assert m["motion_smoothness_flowinterp"]["value"] == pytest.approx(1.0, abs=1e-3)
    assert m["intensity"]["value"] == pytest.approx(0.0, abs=1e-3)


# ---- uneven durations ----------------------------------------------------------------------

# At 8 fps t_k = 0, .125, ..., .875 s: A (0-.5 s) is on screen for k = 0..3, B from .5 s for k = 4,
# C from .6 / .625 s to 1 s for k = 5..7. GIF stores centiseconds, so it uses 100/400 ms for B/C.
UNEVEN = [("gif", [500, 100, 400], {}), ("webp", [500, 125, 375], {"lossless": True}),
          ("png", [500, 125, 375], {})]


@pytest.mark.parametrize("ext,durations,kw", UNEVEN, ids=[u[0] for u in UNEVEN])
def test_uneven_durations_are_read_and_sampled_by_time(tmp_path, ext, durations, kw):
    path = _save_animation(tmp_path / f"abc.{ext}", "ABC", durations, **kw)
    assert is_animated(path)
    media = open_media(path)
    np.testing.assert_allclose(media.timeline.starts, np.cumsum([0] + durations[:-1]) / 1000)
    assert media.timeline.duration == pytest.approx(1.0)
    assert media.info.num_frames == 3 and (media.info.width, media.info.height) == (32, 32)
    assert media.timeline.sample(8.0, 64) == [0, 0, 0, 0, 1, 2, 2, 2]
    assert _names(media.sample(8.0, 64)[0]) == "AAAABCCC"
    assert media.timeline.sample(8.0, 5) == [0, 0, 0, 0, 1]  # the cap


def test_missing_or_zero_durations_count_100ms(tmp_path):
    path = _save_animation(tmp_path / "zero.gif", "ABC", 0)
    media = open_media(path)
    assert media.timeline.duration == pytest.approx(0.3)  # 3 x 100 ms, as browsers play it
    assert _names(media.sample(10.0, 64)[0]) == "ABC"


def test_still_png_is_not_animated_and_garbage_is_unreadable(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")
    assert not is_animated(tmp_path / "still.png")
    (tmp_path / "bad.gif").write_bytes(b"GIF89a not really")
    with pytest.raises(VideoError) as e:
        open_media(tmp_path / "bad.gif")
    assert e.value.reason == "unreadable"


# ---- videos ---------------------------------------------------------------------------------

def test_variable_frame_rate_video_is_sampled_by_timestamp(tmp_path):
    import av

    # frames start at 0, .5, .625 and .875 s (A, B, C, C) -> same hand count as the GIF above
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for name, pts in zip("ABCC", [0, 500, 625, 875]):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), RGB[name], np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    media = open_media(path)
    assert media.timeline.fps == 0  # uneven gaps: not treated as constant rate
    assert media.timeline.sample(8.0, 64) == [0, 0, 0, 0, 1, 2, 2, 3]
    assert _names(media.sample(8.0, 64)[0]) == "AAAABCCC"


@pytest.mark.parametrize("target", [4.0, 8.0])
def test_constant_rate_mp4_samples_as_before(tmp_path, target):
    from motioncharacter.components.evaluate.cli import read_any

    rng = np.random.default_rng(0)
    path = write_video((rng.random((40, 64, 64, 3)) * 255).astype(np.uint8), tmp_path / "cfr.mp4", fps=25.0)
    media = open_media(path)
    assert media.timeline.fps == 25.0
    before = sample_indices(40, 25.0, target, 16)  # 25 -> 4 fps: [0, 6, 12, 19, ...] (rounded, not floored)
    assert media.timeline.sample(target, 16) == before
    frames, used = read_any(path, target, 16)
    assert used == target
    np.testing.assert_array_equal(frames, read_frames(open_video(path), before))


def test_timeline_sampler_by_hand():
    tl = Timeline.from_durations([0.5, 0.125, 0.375])
    assert tl.sample(8.0, 64) == [0, 0, 0, 0, 1, 2, 2, 2]
    assert tl.sample(2.0, 64) == [0, 1]  # t = 0, .5
    with pytest.raises(ValueError):
        tl.sample(0.0, 4)


# ---- honest absence for short inputs --------------------------------------------------------

def test_three_frame_video_has_no_dynamic_degree(tmp_path, capsys):
    frames = np.stack([np.roll(_texture(), 12 * i, axis=1) for i in range(3)])
    m = _metrics_json(capsys, write_video(frames, tmp_path / "three.mp4", fps=8.0))["metrics"]
    assert m["dynamic_degree_dis"] == {
        "value": None, "reason": "needs at least 4 frames, got 3 (VBench ignores the last 2 flow pairs)"}
    assert m["motion_smoothness_flowinterp"]["value"] is not None  # 3 frames: one odd frame re-created
    assert m["intensity"]["value"] > 0


@pytest.fixture(scope="module")
def scorer():
    from motioncharacter.components.evaluate.score import Scorer

    return Scorer()


@pytest.mark.parametrize("n,present", [(1, set()), (2, {"intensity"}),
                                       (3, {"intensity", "motion_smoothness_flowinterp"})])
def test_metrics_lacking_frames_are_absent_with_counts(scorer, n, present):
    out = scorer.flow_metrics(np.repeat(_texture()[None], n, 0))
    assert set(out) == {"intensity", "dynamic_degree_dis", "motion_smoothness_flowinterp"}
    need = {"intensity": 2, "dynamic_degree_dis": 4, "motion_smoothness_flowinterp": 3}
    for key, r in out.items():
        if key in present:
            assert r["value"] is not None
        else:
            assert r["value"] is None and f"needs at least {need[key]} frames, got {n}" in r["reason"]


def test_no_frames_gives_absent_everywhere(scorer):
    out = scorer.score(np.zeros((0, 8, 8, 3), np.uint8), reference=_texture(), prompt="a person")
    assert out and all(r["value"] is None for r in out.values())
    assert "got 0" in out["intensity"]["reason"] and "got 0" in out[scorer.face_key]["reason"]
