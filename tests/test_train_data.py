"""Training data: the manifest as batches (augmentations, dropouts, sampler, padding, bad
manifests), the resolved DeepSpeed config, and the CLI's clear errors. In-process, fast."""
from __future__ import annotations

import collections
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from train_fixtures import prepared

from motioncharacter.components.train.data import (ManifestDataset, StepBatchSampler, check_files, read_manifest,
                                                    resize_crop)
from motioncharacter.components.train.settings import DataSettings, TrainConfig
from motioncharacter.config import load

RES = 32


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return prepared(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(prep):
    return read_manifest(str(prep / "manifest.jsonl"))


def _ds(manifest, **kw):
    cfg = replace(DataSettings(num_frames=16, num_workers=0), **kw)
    return ManifestDataset(manifest, cfg, RES, seed=0)


def _idx(manifest, still: bool) -> int:
    return next(i for i, r in enumerate(manifest.records) if bool(r["still"]) == still)


def test_reads_kept_clips_and_resolves_paths(manifest, prep):
    lines = [json.loads(x) for x in (prep / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest.records) == sum(r["kept"] for r in lines) > 0
    assert manifest.base == str(prep.resolve())
    check_files(manifest)  # everything it names exists
    assert len(manifest.sha256) == 64


def test_item_shapes_ranges_and_determinism(manifest):
    ds = _ds(manifest)
    a, b = ds[(3, 0, 0)], ds[(3, 0, 0)]
    assert a["frames"].shape == (16, 3, RES, RES) and a["frames"].dtype == np.float32
    assert -1.0 <= a["frames"].min() and a["frames"].max() <= 1.0
    assert a["masks"].shape == (16, RES, RES) and 1.0 <= a["masks"].min() and a["masks"].max() <= 1.5
    assert a["ref"].shape == (224, 224, 3) and a["ref"].dtype == np.uint8
    assert a["face_emb"].shape == (128,) and abs(np.linalg.norm(a["face_emb"]) - 1) < 1e-3  # SFace, unit norm
    for k in ("frames", "masks", "ref", "face_emb"):
        assert np.array_equal(a[k], b[k]), f"{k} differs for the same (step, slot, index)"


def test_flip_applies_to_frames_and_masks_alike(manifest):
    i = _idx(manifest, still=False)
    plain, flipped = _ds(manifest, flip_prob=0.0)[(0, 0, i)], _ds(manifest, flip_prob=1.0)[(0, 0, i)]
    assert np.array_equal(flipped["frames"], plain["frames"][..., ::-1])
    assert np.array_equal(flipped["masks"], plain["masks"][..., ::-1])
    assert not np.array_equal(flipped["masks"], plain["masks"])  # the masks are not left-right symmetric


def test_still_is_static_with_intensity_zero(manifest):
    i = _idx(manifest, still=True)
    item = _ds(manifest)[(0, 0, i)]
    assert item["intensity"] == 0.0
    assert all(np.array_equal(item["frames"][0], f) for f in item["frames"])
    moving = _ds(manifest)[(0, 0, _idx(manifest, still=False))]
    assert moving["intensity"] == manifest.records[_idx(manifest, still=False)]["motion_intensity"]


def test_short_clip_pads_with_last_frame_and_mask(manifest):
    i = _idx(manifest, still=False)
    rec = dict(manifest.records[i], frames=manifest.records[i]["frames"][:5])
    short = replace(manifest, records=[rec])
    item = _ds(short, flip_prob=0.0)[(0, 0, 0)]
    full = _ds(manifest, flip_prob=0.0)[(0, 0, i)]
    assert np.array_equal(item["frames"][:5], full["frames"][:5])
    assert all(np.array_equal(item["frames"][4], item["frames"][k]) for k in range(5, 16))
    assert all(np.array_equal(item["masks"][4], item["masks"][k]) for k in range(5, 16))


def test_window_of_fewer_frames_is_contiguous(manifest):
    i = _idx(manifest, still=False)
    full = _ds(manifest, flip_prob=0.0)[(0, 0, i)]["frames"]
    starts = set()
    for step in range(12):
        w = _ds(manifest, flip_prob=0.0, num_frames=4)[(step, 0, i)]["frames"]
        s = next(s for s in range(13) if np.array_equal(full[s:s + 4], w))
        starts.add(s)
    assert len(starts) > 1  # random start, contiguous 4-frame windows


def test_reference_drawn_from_the_face_pool(manifest):
    i = _idx(manifest, still=False)
    assert len(manifest.records[i]["faces"]) > 1
    ds = _ds(manifest)
    refs = {ds[(s, 0, i)]["ref"].tobytes() for s in range(20)}
    assert len(refs) > 1


@pytest.mark.parametrize("field,key,dropped", [("text_dropout", "caption", ""), ("image_dropout", "keep_image", 0.0),
                                               ("clip_dropout", "keep_clip", 0.0), ("cond_dropout", "keep_motion", 0.0)])
def test_dropouts(manifest, field, key, dropped):
    i = _idx(manifest, still=False)
    always = [_ds(manifest, **{field: 1.0})[(s, 0, i)][key] for s in range(5)]
    never = [_ds(manifest, **{field: 0.0, "image_dropout": 0.0})[(s, 0, i)][key] for s in range(5)]
    assert all(v == dropped for v in always) and all(v != dropped for v in never)
    # the configured rate is the rate: 50% CLIP dropout over many draws
    if field == "clip_dropout":
        ds = _ds(manifest, clip_dropout=0.5, image_dropout=0.0)
        rate = np.mean([ds[(s, 0, i)]["keep_clip"] == 0.0 for s in range(200)])
        assert 0.4 < rate < 0.6


def test_joint_condition_dropout_drops_every_condition_together(manifest):
    """CFG's "no condition" sample: text, reference (ID), action and intensity all off at once."""
    i = _idx(manifest, still=False)
    ds = _ds(manifest, cond_dropout=1.0, text_dropout=0.0, image_dropout=0.0, clip_dropout=0.0)
    item = ds[(0, 0, i)]
    assert (item["caption"], item["keep_image"], item["keep_clip"], item["keep_motion"]) == ("", 0.0, 0.0, 0.0)
    ds = _ds(manifest, cond_dropout=0.05)
    rate = np.mean([ds[(s, 0, i)]["keep_motion"] == 0.0 for s in range(400)])
    assert 0.02 < rate < 0.09


def test_sampler_follows_weights_and_is_resumable():
    w = torch.tensor([0.0, 1.0, 3.0], dtype=torch.double)
    batches = list(StepBatchSampler(w, 4, 0, 400, seed=7))
    counts = collections.Counter(i for b in batches for _, _, i in b)
    assert counts[0] == 0 and 2.6 < counts[2] / counts[1] < 3.4
    assert [b[0][0] for b in batches[:3]] == [0, 1, 2]
    # a sampler started at step 250 yields exactly the batches the full run had from there
    assert list(StepBatchSampler(w, 4, 250, 400, seed=7)) == batches[250:]
    assert list(StepBatchSampler(w, 4, 0, 5, seed=8)) != batches[:5]


def test_resize_crop_centre():
    img = np.zeros((40, 80), np.uint8)
    img[:, 20:60] = 255  # the centre 40x40 square is white
    out = resize_crop(img, 20)
    assert out.shape == (20, 20) and out.min() == 255


def test_empty_and_all_dropped_manifests(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no kept clips.*empty"):
        read_manifest(str(empty))
    dropped = tmp_path / "dropped.jsonl"
    dropped.write_text("\n".join(json.dumps({"clip": f"c{i}", "kept": False, "reasons": ["low_resolution"]})
                                 for i in range(3)))
    with pytest.raises(ValueError, match="no kept clips.*low_resolution: 3"):
        read_manifest(str(dropped))


def test_missing_files_are_named(prep, tmp_path):
    import shutil

    d = shutil.copytree(prep, tmp_path / "p")
    rec = read_manifest(str(d / "manifest.jsonl")).records[0]
    (d / rec["frames"][3]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{rec['clip']}: {rec['frames'][3]}"):
        check_files(read_manifest(str(d / "manifest.jsonl")))


def test_deepspeed_config_takes_training_values(tmp_path):
    from motioncharacter.components.train.trainer import deepspeed_config

    extra = tmp_path / "ds.json"
    extra.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "steps_per_print": 7}))
    cfg = load(TrainConfig, "train.yaml", overrides=["train.zero_stage=3", "optim.lr=0.002", "train.batch_size=3",
                                                      f"train.deepspeed_config={extra}"])
    ds = deepspeed_config(cfg, bf16=False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["contiguous_gradients"] is True  # packaged file kept underneath
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.002
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["steps_per_print"] == 7
    assert ds["bf16"] == {"enabled": False}
    default = load(TrainConfig, "train.yaml")
    assert default.optim.lr == 1e-5 and default.train.zero_stage == 2 and default.ablation_name() == "full"
    assert load(TrainConfig, "train.yaml", overrides=["loss.id_loss=false", "model.motion_control=false"]
                ).ablation_name() == "no-id-loss-no-motion-control"


def test_cli_unreachable_object_store(monkeypatch, capsys):
    import socket

    from motioncharacter.cli import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MOTIONCHARACTER_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-value")
    rc = main(["train", "--data", "s3://nowhere/manifest.jsonl", "--output", "/tmp/unused", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert rc == 1 and "unreachable" in err and f"127.0.0.1:{port}" in err
    assert "test-secret-value" not in err


def test_cli_needs_weights_or_preset(prep, tmp_path, capsys):
    from motioncharacter.cli import main

    rc = main(["train", "--data", str(prep / "manifest.jsonl"), "--output", str(tmp_path / "o")])
    assert rc == 1 and "--weights" in capsys.readouterr().err


def test_gradient_checkpointing_same_gradients_base_frozen(prep):
    """Checkpointed UNet blocks take inputs that need no grad (frozen base): the adapter inside
    them must still get the same gradients as without checkpointing, and the base none."""
    from motioncharacter.components.train import trainer as T

    grads = {}
    for gc in (False, True):
        cfg = load(TrainConfig, "train.yaml", overrides=[
            "model.preset=tiny", "data.num_frames=4", f"model.gradient_checkpointing={gc}",
            "data.image_dropout=0", "data.clip_dropout=0", "data.cond_dropout=0"])
        parts = T.build_parts(cfg)
        mod = T.MCTrainModule(parts["unet"], parts["adapter"], True)
        with torch.no_grad():  # non-zero adapter so every branch carries gradient
            g = torch.Generator().manual_seed(5)
            for p in mod.adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        m = read_manifest(str(prep / "manifest.jsonl"))
        batch = next(iter(T.loader(ManifestDataset(m, cfg.data, 64), 1, 0, 1, 0)))
        loss, parts_ = T.compute_loss(mod, parts, T.face_model(cfg), batch, cfg, torch.Generator().manual_seed(1),
                                      torch.device("cpu"), torch.float32)
        loss.backward()
        assert parts_["loss_id"] > 0
        assert all(p.grad is None for p in mod.unet.parameters())
        grads[gc] = {n: p.grad for n, p in mod.adapter.named_parameters()}
    assert all(g is not None for g in grads[True].values())
    for n, g in grads[False].items():
        assert torch.allclose(g, grads[True][n], rtol=1e-4, atol=1e-7), n
