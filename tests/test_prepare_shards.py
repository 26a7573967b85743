"""Sharded data preparation: the listing split, shards + merge giving what one unsharded prepare
gives (same records, same resampling weights over the whole dataset), and resuming across
shard counts through the shared record keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import prepared

from motioncharacter.components.prepare.settings import PrepareConfig
from motioncharacter.components.prepare.stage import list_inputs, merge_shards, prepare, shard_inputs
from motioncharacter.config import load

SETTINGS = ["filters.ocr=false"]  # as train_fixtures.prepared, whose output is the unsharded reference


def manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_shard_split_is_contiguous_balanced_and_complete():
    items = [f"s3://b/raw/{i:02d}.mp4" for i in range(7)]
    shards = [shard_inputs(items, i, 3) for i in range(3)]
    assert shards == [items[0:3], items[3:5], items[5:7]]  # 7 = 3 + 2 + 2, the first r slices one longer
    assert [x for s in shards for x in s] == items  # in order, each input exactly once
    assert shard_inputs(items, 1, 3) == shards[1]  # deterministic
    assert [shard_inputs(items[:2], i, 4) for i in range(4)] == [items[:1], items[1:2], [], []]
    for bad in ((3, 3), (-1, 3), (0, 0)):
        with pytest.raises(ValueError, match=f"shard {bad[0]} of {bad[1]}"):
            shard_inputs(items, *bad)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unsharded prepare of the project's fixtures, and the folder it read."""
    out = prepared(tmp_path_factory)
    recs = manifest(out)
    src = Path(recs[0]["source"]).parent
    assert all(Path(r["source"]).parent == src for r in recs)
    return out, src


def test_two_shards_merged_equal_one_unsharded_prepare(reference, tmp_path):
    ref_out, src = reference
    cfg = load(PrepareConfig, "prepare.yaml", overrides=SETTINGS)
    out = tmp_path / "sharded"
    parts = [prepare(str(src), str(out), cfg, progress=False, shard=(i, 2)) for i in range(2)]
    assert [p["inputs"] for p in parts] == [len(s) for s in (shard_inputs(list_inputs(str(src)), i, 2)
                                                             for i in range(2))]
    assert not (out / "manifest.jsonl").exists()  # a shard writes no manifest: only the merge does
    summary = merge_shards(str(out), 2, cfg, track=False)

    want, got = manifest(ref_out), manifest(out)
    assert [r["clip"] for r in got] == [r["clip"] for r in want]  # same inputs, same order
    weights = {}
    for g, w in zip(got, want):
        weights[g["clip"]] = (g.pop("sample_weight", None), w.pop("sample_weight", None))
        for r in (g, w):
            r.pop("seconds")
        assert g == w, g["clip"]
    # resampling over the whole dataset, not per shard: kept clips in different shards share one
    # normalisation, so the weights still sum to 1 (per-shard weights would sum to 2)
    kept = [c for c, (g, _) in weights.items() if g is not None]
    assert len(kept) >= 2 and {c for c, (_, w) in weights.items() if w is not None} == set(kept)
    assert [weights[c][0] for c in kept] == pytest.approx([weights[c][1] for c in kept], abs=1e-6)
    assert sum(weights[c][0] for c in kept) == pytest.approx(1.0, abs=1e-5)
    ref_summary = json.loads((ref_out / "summary.json").read_text())
    for k in ("inputs", "kept", "dropped", "dropped_by_reason", "stills", "motion_intensity", "settings_hash"):
        assert summary[k] == ref_summary[k], k
    assert summary["shards"] == 2 and (out / "contact_sheet.png").is_file()
    assert (out / "intensity_histogram.png").is_file()

    # a re-run with another shard count resumes every input from the shared records
    cfg_again = load(PrepareConfig, "prepare.yaml", overrides=SETTINGS)
    again = [prepare(str(src), str(out), cfg_again, progress=False, shard=(i, 3)) for i in range(3)]
    assert sum(p["resumed"] for p in again) == sum(p["inputs"] for p in again) == len(want)
    assert merge_shards(str(out), 3, cfg_again, track=False)["resumed"] == len(want)
    assert [r["key"] for r in manifest(out)] == [r["key"] for r in want]


def test_merge_names_a_missing_shard_and_refuses_other_settings(reference, tmp_path):
    _, src = reference
    cfg = load(PrepareConfig, "prepare.yaml", overrides=SETTINGS)
    out = tmp_path / "partial"
    with pytest.raises(FileNotFoundError, match="shard 0 of 2 has no results"):
        merge_shards(str(out), 2, cfg, track=False)
    (out / "shards").mkdir(parents=True)
    for i in range(2):  # shard files as another settings hash would leave them (no work needed)
        (out / "shards" / f"{i}-of-2.json").write_text(json.dumps(
            {"input": str(src), "settings_hash": "deadbeef", "inputs": 0, "resumed": 0, "seconds": 0,
             "flow_estimator": "dis", "records": []}))
    with pytest.raises(ValueError, match="prepared with settings \\['deadbeef'\\]"):
        merge_shards(str(out), 2, cfg, track=False)
