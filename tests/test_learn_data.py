"""The learn loop's data: whole people held out, captions drawn blind to the motion and carried
into the manifest by data preparation's sidecar captioner, the reference from another photo of
the same person."""
from __future__ import annotations

import json

import numpy as np
import pytest

from motioncharacter.people import load_people, people_dir, split_people

PEOPLE = people_dir()
needs_people = pytest.mark.skipif(PEOPLE is None, reason="../shared/data/people is absent (it is never copied "
                                                         "into the project)")


@needs_people
def test_split_holds_out_whole_people():
    split = split_people(PEOPLE, heldout=12, seed=0)
    held = {p.name for p in split.heldout}
    assert len(held) == 12 and held.isdisjoint(p.name for p in split.train)
    # by the `person` column: no file of a held-out person is in training, whatever its folder
    train_files = {f for p in split.train for f in p.photos + p.videos}
    everyone = load_people(PEOPLE)
    assert all(f not in train_files for n in held for f in everyone[n].photos + everyone[n].videos)
    assert all(len(p.photos) >= 2 and not p.videos for p in split.heldout)
    assert split_people(PEOPLE, heldout=12, seed=0).heldout == split.heldout  # deterministic
    assert {p.name for p in split_people(PEOPLE, heldout=12, seed=1).heldout} != held


def test_captions_do_not_depend_on_the_speed():
    """Over many draws every action appears at every speed in about equal shares: the caption
    carries no information about the intensity label."""
    from motioncharacter.fixtures import ACTIONS, learn_caption, learn_prompts

    rng = np.random.default_rng(0)
    counts = {slow: {a: 0 for a in ACTIONS} for slow in (True, False)}
    for k in range(4000):
        v = rng.uniform(0, 20)
        caption, action = learn_caption(rng)
        assert action in caption
        counts[v < 10][action] += 1
    for slow in (True, False):
        shares = np.array(list(counts[slow].values())) / sum(counts[slow].values())
        assert np.abs(shares - 1 / len(ACTIONS)).max() < 0.03, counts
    assert all("moving head" in p for p in learn_prompts())


def test_sidecar_captions_reach_the_manifest(tmp_path):
    """caption.captioner=sidecar: caption, action and person come from clip.json beside the clip
    (the JSON itself is not an input); a clip without one gets the offline captioner's; a
    malformed sidecar is an error naming it."""
    from motioncharacter.components.prepare.settings import PrepareConfig
    from motioncharacter.components.prepare.stage import prepare, read_sidecar
    from motioncharacter.config import load
    from motioncharacter.fixtures import SRC_FPS, motion_clip
    from motioncharacter.video import encode_video

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.mp4", "b.mp4"):
        (src / name).write_bytes(encode_video(motion_clip(6)[:16], "mp4", SRC_FPS))
    (src / "a.json").write_text(json.dumps({"caption": "A close-up video of a person nodding, dimly lit.",
                                            "action": "nodding", "person": "grace"}))
    cfg = load(PrepareConfig, "prepare.yaml", overrides=["filters.ocr=false", "caption.captioner=sidecar"])
    prepare(str(src), str(tmp_path / "out"), cfg, track=False, progress=False)
    recs = {r["clip"]: r for r in map(json.loads, (tmp_path / "out" / "manifest.jsonl").read_text().splitlines())}
    assert set(recs) == {"a.mp4", "b.mp4"}
    a, b = recs["a.mp4"], recs["b.mp4"]
    assert a["kept"] and a["caption"].endswith("nodding, dimly lit.") and a["action"] == "nodding"
    assert a["person"] == "grace" and a["caption_source"] == "sidecar"
    assert b["kept"] and b["caption_source"] == "offline-landmarks" and "person" not in b
    (src / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json"):
        read_sidecar(str(src / "bad.mp4"))


def test_reference_comes_from_another_photo_of_the_same_person():
    """data.reference=person draws the reference from another clip of the same person; clip (the
    default) from the clip's own face pool; a person with one clip falls back to its own."""
    from motioncharacter.components.train.data import Manifest, ManifestDataset
    from motioncharacter.components.train.settings import DataSettings

    recs = [{"clip": f"{p}{k}", "person": p, "faces": [f"{p}{k}/face.jpg"], "frames": ["x"], "masks": "m"}
            for p, n in (("ann", 3), ("bob", 1)) for k in range(n)]
    m = Manifest("mem://", "/nowhere", recs, len(recs), "0")
    person = ManifestDataset(m, DataSettings(reference="person"), 64)
    own = ManifestDataset(m, DataSettings(reference="clip"), 64)
    rng = np.random.default_rng(0)
    for i, r in enumerate(recs):
        got = {person._reference_pool(i, rng)[0]["clip"] for _ in range(20)}
        if r["person"] == "ann":
            assert got == {c["clip"] for c in recs if c["person"] == "ann"} - {r["clip"]}
        else:
            assert got == {r["clip"]}
        assert own._reference_pool(i, rng)[0]["clip"] == r["clip"]


@pytest.mark.parametrize("estimator", ["dis", "farneback"])
def test_programmed_pans_measure_what_was_programmed(estimator):
    """A camera-motion clip's eq. 5-7 intensity, as data preparation measures it (4 fps, flow at
    256 px, 512-px scale), is its programmed speed, by two independent flow methods, and 0 when
    still. The photo is a tight crop around the face, so the window must stay inside it: a window
    over replicated borders measured 13 at speed 0 (DIS) and 190 at 20 (Farneback)."""
    from motioncharacter.components.prepare.flow import FarnebackFlow, DISFlow, measure
    from motioncharacter.faces import detector
    from motioncharacter.fixtures import SAMPLE_FPS, SRC_FPS, _package_identity, camera_clip

    img, face = _package_identity("grace_hopper")
    x, y, w, h = (int(round(c)) for c in face.box)
    m = int(0.15 * max(w, h))  # the face fills the photo, like the 224-px crops in ../shared/data/people
    tight = np.ascontiguousarray(img[max(0, y - m):y + h + m, max(0, x - m):x + w + m])
    face = detector().one(tight, "tight crop")
    est = DISFlow() if estimator == "dis" else FarnebackFlow()
    step = int(SRC_FPS / SAMPLE_FPS)
    got = {}
    for v in (0.0, 5.0, 10.0, 20.0):
        clip = camera_clip(tight, face, v, angle=0.7, rng=np.random.default_rng(1))
        got[v] = measure(clip[::step], est)[0]
    assert got[0.0] < 0.5, got
    for v in (5.0, 10.0, 20.0):
        assert abs(got[v] - v) < 0.2 * v, got
