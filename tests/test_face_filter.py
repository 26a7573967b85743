"""The face filter: tracking and decision on hand-made detections, then YuNet on real images and clips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from motioncharacter.components.prepare.filters import check_faces, decide_faces, iou, reason_code, track_faces
from motioncharacter.faces import Face

N, HW = 16, (512, 512)              # 16 sampled frames of a 512x512 clip
CONF, PRESENCE, SIZE = 0.8, 0.5, 0.05  # the shipped defaults (see test_defaults_are_the_shipped_config)
HEAD = (150, 120, 200, 260)         # a talking head: short side 200/512 = 39% of the frame

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = SHARED / "clips"


def face(box, score=0.93) -> Face:
    return Face(box=np.array(box, np.float32), landmarks=np.zeros((5, 2), np.float32), score=score,
                raw=np.zeros(15, np.float32))


def decide(found, hw=HW):
    return decide_faces(found, hw, CONF, PRESENCE, SIZE)


def test_defaults_are_the_shipped_config():
    from motioncharacter.components.prepare.settings import PrepareConfig
    from motioncharacter.config import load

    f = load(PrepareConfig, "prepare.yaml").filters
    assert (f.min_face_confidence, f.face_min_presence, f.face_min_size) == (CONF, PRESENCE, SIZE)
    for bad in ("filters.face_min_presence=0", "filters.face_min_presence=1.5", "filters.face_min_size=1"):
        with pytest.raises(ValueError, match="face_min_presence"):
            load(PrepareConfig, "prepare.yaml", overrides=[bad])


def test_iou():
    assert iou(np.array([0, 0, 10, 10]), np.array([0, 0, 10, 10])) == 1.0
    assert iou(np.array([0, 0, 10, 10]), np.array([20, 0, 10, 10])) == 0.0
    assert iou(np.array([0, 0, 10, 10]), np.array([5, 0, 10, 10])) == pytest.approx(50 / 150)


def test_a_low_confidence_blob_is_not_counted():
    """(a) 0.63 is above YuNet's 0.6 but below the filter's 0.8: it never reaches the tracker."""
    found = [[face(HEAD)] for _ in range(N)]
    found[7].append(face((420, 30, 40, 40), score=0.63))
    reason, faces, info = decide(found)
    assert reason is None and info["face_decision"] == "kept"
    assert info["faces_per_frame"][7] == 2 and info["face_scores"][7] == [0.93, 0.63]
    assert len(info["face_tracks"]) == 1 and info["face_tracks"][0]["presence"] == N
    assert all(f is fs[0] for f, fs in zip(faces, found))


def test_a_confident_one_frame_blob_is_not_persistent():
    """(b) score 0.9 but in 1/16 frames: a track, not a persistent one; the head is handed on."""
    found = [[face(HEAD)] for _ in range(N)]
    found[5].insert(0, face((420, 30, 60, 60), score=0.9))
    reason, faces, info = decide(found)
    assert reason is None
    blob = next(t for t in info["face_tracks"] if t["frames"] == [5])
    assert blob["presence"] == 1 and blob["mean_score"] == pytest.approx(0.9) and not blob["persistent"]
    assert faces[5] is found[5][1]  # the head, not the blob


def test_two_persistent_faces_drop_the_clip():
    """(c) a second person who stays in shot (10/16 frames, 0.9, 100 px)."""
    found = [[face(HEAD)] + ([face((380, 40, 100, 120), 0.9)] if i < 10 else []) for i in range(N)]
    reason, faces, info = decide(found)
    assert reason_code(reason) == "faces" and reason.startswith("faces: 2 persistent faces (need exactly 1")
    assert info["face_decision"] == reason and faces == [None] * N
    assert [t["presence"] for t in info["face_tracks"]] == [16, 10]


def test_a_face_present_in_too_few_frames_drops_the_clip():
    """(d) the only face is in 3 of 16 frames; 8/16 is exactly the 50 % share and is kept, 7/16 is not."""
    def present_in(k):
        return [[face(HEAD)] if i < k else [] for i in range(N)]

    reason, _, info = decide(present_in(3))
    assert reason == "faces: face present in only 3/16 sampled frames (< 50%)"
    assert info["face_tracks"][0]["presence"] == 3 and not info["face_tracks"][0]["persistent"]
    assert decide(present_in(7))[0] == "faces: face present in only 7/16 sampled frames (< 50%)"
    reason, faces, _ = decide(present_in(8))
    assert reason is None and faces[7] is not None and faces[8:] == [None] * 8
    assert decide([[] for _ in range(N)])[0] == "faces: no face in 16 sampled frames (confidence >= 0.8)"


def test_a_face_too_small_for_the_frame_is_not_counted():
    """(e) a 20-px face is 20/512 = 3.9 % of the frame's short side (< 5 %)."""
    tiny = (60, 400, 20, 20)
    reason, _, info = decide([[face(HEAD), face(tiny)] for _ in range(N)])
    assert reason is None  # a far-away bystander does not drop the clip
    assert info["face_tracks"][1]["mean_size"] == pytest.approx(20 / 512, abs=1e-4)
    assert not info["face_tracks"][1]["persistent"]
    reason, _, _ = decide([[face(tiny)] for _ in range(N)])
    assert reason == "faces: largest face's short side is 3.9% of the frame's (< 5%)"
    # relative to the short side: 24 px is 4.7 % of 512 (not counted) but 6.7 % of a 640x360 frame's 360
    assert decide([[face((60, 300, 24, 30))] for _ in range(N)])[0].startswith("faces: largest face")
    assert decide([[face((60, 300, 24, 30))] for _ in range(N)], hw=(360, 640))[0] is None


def test_a_slowly_moving_face_stays_one_track():
    """(f) 12 px a frame (IoU 88/112 with the previous box), 180 px over the clip, so the first and
    last boxes do not overlap at all; frames 6-7 are missed and the track picks it up again at 8
    (36 px on, IoU 64/136 with the box it kept from frame 5)."""
    boxes = [(100 + 12 * i, 150, 100, 120) for i in range(N)]
    assert iou(np.array(boxes[0]), np.array(boxes[-1])) == 0.0
    found = [[] if i in (6, 7) else [face(b)] for i, b in enumerate(boxes)]
    tracks = track_faces(found)
    assert len(tracks) == 1 and sorted(tracks[0].faces) == [i for i in range(N) if i not in (6, 7)]
    reason, faces, info = decide(found)
    assert reason is None and faces[6] is None and faces[8] is found[8][0]
    assert info["face_tracks"][0]["presence"] == 14


def test_the_recently_seen_track_matches_first():
    """After a cut an old track's stale box (last seen at frame 4) overlaps the new shot's face
    more (IoU 80/120) than the track following it since frame 8 does (60/140); the recent one wins."""
    found = [[face((100, 100, 100, 100))] if i <= 4 else [] for i in range(10)]
    found[8] = [face((160, 100, 100, 100))]  # IoU 40/160 with the stale box: a new track
    found[9] = [face((120, 100, 100, 100))]
    old, new = track_faces(found)
    assert sorted(old.faces) == [0, 1, 2, 3, 4] and sorted(new.faces) == [8, 9]


def test_a_still_with_one_face_is_kept():
    assert decide([[face(HEAD)]])[0] is None


def test_missing_frames_give_no_face_crops(tmp_path):
    """The stage takes face crops only from frames where the kept face was detected."""
    from motioncharacter.components.prepare.settings import PrepareConfig
    from motioncharacter.components.prepare.stage import _save_artifacts

    frames = np.full((N, 64, 64, 3), 128, np.uint8)
    faces = [face((16, 16, 32, 32)) if i % 4 == 0 else None for i in range(N)]
    cfg = PrepareConfig()
    paths = _save_artifacts(tmp_path, "c", frames, faces, np.ones((N, 8, 8)), cfg, "0" * 20)
    assert sorted(paths["faces"]) == [f"clips/c/faces/{i:03d}.jpg" for i in (0, 4, 8, 12)]


# ---- YuNet on real images ------------------------------------------------------------------

def _sliding_clip(img: np.ndarray, n: int = N, step: int = 3) -> np.ndarray:
    """n frames panning across a still, ``step`` px a frame: the detector sees n different inputs."""
    w = img.shape[1] - (n - 1) * step
    return np.stack([img[:, k * step:k * step + w] for k in range(n)])


def _group_photo() -> np.ndarray:
    import insightface
    from PIL import Image

    with Image.open(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg") as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("name", ["grace_hopper", "astronaut"])
def test_real_portrait_clip_is_kept(name):
    from motioncharacter.fixtures import package_face

    reason, faces, info = check_faces(_sliding_clip(package_face(name)), CONF, PRESENCE, SIZE)
    assert reason is None, info["face_tracks"]
    assert all(f is not None and f.score >= CONF for f in faces)
    assert [t["presence"] for t in info["face_tracks"] if t["persistent"]] == [N]


def test_real_group_photo_is_dropped():
    reason, _, info = check_faces(_sliding_clip(_group_photo()), CONF, PRESENCE, SIZE)
    assert reason.startswith("faces: 6 persistent faces"), reason  # insightface's t1.jpg: 6 people
    assert sum(t["persistent"] for t in info["face_tracks"]) == 6


def test_generated_two_face_clip_is_dropped():
    from motioncharacter.fixtures import motion_clip

    frames = motion_clip(6, second_face="astronaut")[::2][:N]  # 8 fps fixture sampled at 4 fps
    reason, _, _ = check_faces(frames, CONF, PRESENCE, SIZE)
    assert reason.startswith("faces: 2 persistent faces"), reason


@pytest.mark.skipif(not CLIPS.is_dir(), reason=f"real test clips not present at {CLIPS}")
@pytest.mark.parametrize("name, kept", [
    ("lp_d0.mp4", True), ("lp_d11.mp4", True), ("st_WDA_KatieHill_000.mp4", True),  # talking heads
    ("fr_short_hamilton_clip.mp4", False),  # scene cuts, 1-5 faces a shot: no face stays for half the clip
])
def test_real_clips(name, kept):
    from motioncharacter.components.prepare.settings import SamplingSettings
    from motioncharacter.video import open_video, probe, read_frames, sample_indices

    s = SamplingSettings()
    vr = open_video(CLIPS / name)
    vi = probe(vr)
    frames = read_frames(vr, sample_indices(vi.num_frames, vi.fps, s.fps, s.num_frames))
    reason, faces, info = check_faces(frames, CONF, PRESENCE, SIZE)
    if kept:
        assert reason is None, (reason, info["face_tracks"])
        assert all(f is not None for f in faces)
    else:
        assert reason.startswith("faces: face present in only"), reason
