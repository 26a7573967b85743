"""A peer system's own videos (ID-Animator's published demos, ../shared/data/peers) measured with
our metrics: same-identity face similarity is clearly above cross-identity, and frames without a
detectable face are counted, not scored as zero."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

PEERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "peers"
pytestmark = pytest.mark.skipif(not (PEERS / "ida_hinton_2.gif").is_file(),
                                reason=f"peer videos not present at {PEERS}")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_peers", Path(__file__).parents[1] / "bench" / "bench_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_same_identity_scores_clearly_above_cross_identity():
    bench = _bench()
    rows = bench.measure(PEERS)
    assert len(rows) == 8 and all(r["frames"] == 16 for r in rows)  # 16 frames of 120 ms at 8 fps
    for video in bench.VIDEOS:
        same = next(r["face_sim"] for r in rows if r["video"] == video and r["same"])
        cross = next(r["face_sim"] for r in rows if r["video"] == video and not r["same"])
        assert same > cross + 0.1, (video, same, cross)
    assert "same identity: mean" in bench.table(rows, "sface")


def test_frames_without_a_face_are_counted_not_scored_zero():
    from motioncharacter.components.evaluate.cli import read_any
    from motioncharacter.components.evaluate.score import Scorer
    from motioncharacter.video import load_image

    frames, _ = read_any(PEERS / "ida_hinton_3.gif", 8.0, 64)
    ref = load_image(PEERS / "ida_ref_Hinton.png")
    scorer = Scorer()
    whole = scorer.face_similarity(frames, ref)
    half = frames.copy()
    half[::2] = 128  # every other frame: no face at all
    r = scorer.face_similarity(half, ref)
    assert r["frames_without_face"] == 8 and r["frames_scored"] == 8 and r["face_rate"] == 0.5
    assert r["value"] > 0.8 * whole["value"]  # the mean over the frames with a face, not dragged to 0
    none = scorer.face_similarity(np.full_like(frames, 128), ref)
    assert none["value"] is None and "no face detected in any of 16 frames" in none["reason"]
