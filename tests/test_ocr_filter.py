"""The text-overlay filter's coarse detection canvas decides as full-size EasyOCR did, on the project's
fixtures and on the shared real clips (skipped when ../shared/data is absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from motioncharacter.components.prepare import filters
from motioncharacter.components.prepare.settings import FilterSettings, PrepareConfig
from motioncharacter.components.prepare.stage import _evenly
from motioncharacter.fixtures import motion_clip, write_fixtures
from motioncharacter.video import open_video, probe, read_frames, sample_indices

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips"
FS = FilterSettings()


def ocr_frames(path: Path) -> np.ndarray:
    """The frames the stage gives the text filter: 16 at 4 fps, then ocr_frames of them evenly."""
    info = probe(open_video(path))
    frames = read_frames(open_video(path), sample_indices(info.num_frames, info.fps, 4.0, 16))
    return frames[_evenly(len(frames), FS.ocr_frames)]


old_fraction = filters.readtext_fraction


def new_decision(frames: np.ndarray) -> tuple[bool, dict]:
    reason, info = filters.check_text(frames, FS.max_text_fraction, FS.ocr_canvas, FS.ocr_recheck_factor)
    assert (reason is None) == (info["text_area_fraction"] <= FS.max_text_fraction)
    return reason is not None, info


@pytest.fixture(scope="module")
def fixture_clips(tmp_path_factory):
    out = write_fixtures(tmp_path_factory.mktemp("ocr-fixtures"), velocities=(8,))
    return {p.name: p for p in sorted(out.glob("*.mp4")) if p.name not in ("corrupt.mp4", "empty.mp4", "truncated.mp4")}


def test_fixtures_decided_as_full_size_ocr(fixture_clips):
    assert set(fixture_clips) == {"grace_v08.mp4", "astronaut_v06.mp4", "lowres_v08.mp4", "two_faces_v06.mp4",
                                  "subtitles_v06.mp4"}
    for name, path in fixture_clips.items():
        frames = ocr_frames(path)
        old_drop = old_fraction(frames) > FS.max_text_fraction
        new_drop, info = new_decision(frames)
        assert new_drop == old_drop, (name, info)
        assert new_drop == (name == "subtitles_v06.mp4"), (name, info)  # the one overlay, found
        assert info["ocr_canvas"] == min(FS.ocr_canvas, max(frames.shape[1:3]))


@pytest.mark.skipif(not CLIPS.is_dir(), reason=f"shared real clips not present at {CLIPS}")
def test_shared_clips_decided_as_full_size_ocr():
    clips = sorted(CLIPS.glob("*.mp4"))
    assert clips
    for path in clips:
        frames = ocr_frames(path)
        old = old_fraction(frames)
        new_drop, info = new_decision(frames)
        assert new_drop == (old > FS.max_text_fraction), (path.name, old, info)


def test_recheck_band_gives_full_size_fraction():
    """Within the band the frame is detected again at full size, so the recorded fraction is full-size
    OCR's own; with no band the coarse canvas's boxes (coarser, so a different area) stand."""
    frames = motion_clip(6, text="BREAKING NEWS 24/7")[:1]
    full = old_fraction(frames)
    assert full > 0.1  # three lines of large text
    _, coarse = filters.check_text(frames, 0.01, canvas_size=192, recheck_factor=1.0)
    _, banded = filters.check_text(frames, 0.01, canvas_size=192, recheck_factor=1000.0)
    assert coarse["ocr_rechecked_frames"] == 0 and coarse["text_area_fraction"] != pytest.approx(full, abs=1e-6)
    assert banded["ocr_rechecked_frames"] == 1 and banded["text_area_fraction"] == pytest.approx(full, abs=1e-9)
    assert any("BREAKING" in t for t in banded["text"])


@pytest.mark.parametrize("name,value", [("ocr_canvas", 16), ("ocr_recheck_factor", 0.5)])
def test_ocr_settings_are_validated(name, value):
    cfg = PrepareConfig()
    setattr(cfg.filters, name, value)
    with pytest.raises(ValueError, match=name):
        cfg.validate()
