"""The data-preparation stage on real clips from ../shared/data (skipped when absent), and through the real S3 server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from motioncharacter import storage
from motioncharacter.components.prepare.settings import PrepareConfig
from motioncharacter.components.prepare.stage import prepare
from motioncharacter.config import load

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = SHARED / "clips"
needs_clips = pytest.mark.skipif(not CLIPS.is_dir(), reason=f"real test clips not present at {CLIPS}")


@needs_clips
def test_real_clips(tmp_path):
    out = tmp_path / "out"
    summary = prepare(str(CLIPS), str(out), load(PrepareConfig, "prepare.yaml"), progress=False, track=False)
    recs = {r["clip"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    d19 = recs["lp_d19.mp4"]  # 480x480
    assert not d19["kept"] and any(r.startswith("resolution: short side 480px") for r in d19["reasons"])
    ham = recs["fr_short_hamilton_clip.mp4"]  # several faces, logo, 640x360
    assert not ham["kept"]
    assert any(r.startswith("faces:") for r in ham["reasons"]), ham["reasons"]
    for name in ("lp_d0.mp4", "lp_d11.mp4", "st_WDA_KatieHill_000.mp4"):  # talking heads
        assert recs[name]["kept"], (name, recs[name]["reasons"])
        assert recs[name]["motion_intensity"] > 0.3
        assert "talking" in recs[name]["action"], recs[name]["action"]
    # non-media files in the folder are accounted for, not silently skipped
    assert not recs["sources.json"]["kept"] and recs["sources.json"]["reasons"][0].startswith("unreadable:")
    assert summary["kept"] == 3


@pytest.mark.services
def test_s3_round_trip(stack, tmp_path):
    """Inputs from an s3:// prefix, outputs to another, through the real local S3 server."""
    from motioncharacter.fixtures import write_fixtures

    src = write_fixtures(tmp_path / "fx", velocities=(8,), bad_inputs=False)
    (src / "astronaut_v06.mp4").unlink()
    (src / "corrupt.mp4").write_bytes(b"not a video at all")
    storage.upload_dir(src, f"s3://{stack.bucket}/raw")
    out = f"s3://{stack.bucket}/prepared/v1"
    cfg = load(PrepareConfig, "prepare.yaml", overrides=["filters.ocr=false"])
    summary = prepare(f"s3://{stack.bucket}/raw", out, cfg, progress=False)
    assert summary["inputs"] == 3 and summary["kept"] == 2
    recs = [json.loads(x) for x in storage.read_bytes(f"{out}/manifest.jsonl").decode().splitlines()]
    kept = next(r for r in recs if r["clip"] == "grace_v08.mp4")
    for rel in kept["frames"] + kept["faces"] + [kept["masks"]]:
        assert storage.exists(f"{out}/{rel}"), rel
    assert storage.exists(f"{out}/intensity_histogram.png") and storage.exists(f"{out}/summary.json")
    # the MLflow server stored the run's artifacts in the object store too
    import mlflow

    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary["mlflow_run_id"])}
    assert "manifest.jsonl" in arts
    # resumable against s3: nothing is redone
    again = prepare(f"s3://{stack.bucket}/raw", out, cfg, progress=False, track=False)
    assert again["resumed"] == 3
