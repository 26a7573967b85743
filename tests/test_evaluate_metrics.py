"""Evaluation metrics on constructed cases with hand-computed answers (no services, no generation)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from motioncharacter.components.evaluate import metrics as M
from motioncharacter.components.evaluate.evalset import build_items, load_prompt_bank
from motioncharacter.components.evaluate.settings import EvalSetSettings

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def _texture(size=96, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    small = (rng.random((size // 6, size // 6, 3)) * 255).astype(np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def scorer():
    from motioncharacter.components.evaluate.score import Scorer

    return Scorer()


# ---- dynamic degree ------------------------------------------------------------------------

def test_top5_flow_is_mean_of_the_largest_five_percent():
    mag = np.zeros((10, 10))
    mag.flat[:5] = 10.0          # exactly 5 % of the pixels
    mag.flat[5:10] = 1.0
    assert M.top5_flow(mag) == pytest.approx(10.0)


def test_dynamic_degree_vbench_rule():
    # 16 frames at short side 256: threshold 6 px, 4 moving pairs needed, the last 2 pairs ignored
    mags = np.zeros((15, 20, 20))
    mags[:3] = 7.0
    assert M.dynamic_degree(mags, 256) == 0.0          # 3 moving pairs < 4
    mags[13:] = 7.0
    assert M.dynamic_degree(mags, 256) == 0.0          # the last two pairs do not count
    mags[5] = 7.0
    assert M.dynamic_degree(mags, 256) == 1.0          # 4 moving pairs
    assert M.dynamic_degree(mags, 512) == 0.0          # threshold scales to 12 px at 512


def test_static_video_has_dynamic_degree_zero(scorer):
    frames = np.repeat(_texture()[None], 16, 0)
    out = scorer.flow_metrics(frames)
    assert out["dynamic_degree_dis"]["value"] == 0.0
    assert out["intensity"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert out["motion_smoothness_flowinterp"]["value"] == pytest.approx(1.0)


def test_fast_motion_is_dynamic(scorer):
    tex = _texture(160)
    frames = np.stack([np.roll(tex, 12 * i, axis=1) for i in range(16)])  # 12 px a frame at short side 160
    assert scorer.flow_metrics(frames)["dynamic_degree_dis"]["value"] == 1.0


# ---- motion smoothness ---------------------------------------------------------------------

def test_motion_smoothness_hand_case():
    frames = np.zeros((3, 4, 4, 3), np.uint8)
    frames[1] = 51                      # the odd frame the averaging interpolator cannot re-create
    avg = lambda a, b: ((a.astype(int) + b) // 2).astype(np.uint8)  # noqa: E731
    assert M.motion_smoothness(frames, avg) == pytest.approx((255 - 51) / 255)


def test_flow_interpolation_recreates_a_translation():
    tex = _texture(96)
    a, mid, b = (np.roll(tex, s, axis=1) for s in (0, 3, 6))
    from motioncharacter.components.prepare.flow import DISFlow

    got = M.FlowInterpolator(DISFlow())(a, b)
    blend = ((a.astype(int) + b) // 2)
    core = np.s_[:, 12:-12]
    assert np.abs(got[core].astype(int) - mid[core]).mean() < 0.5 * np.abs(blend[core] - mid[core]).mean()


def test_shuffled_frames_lower_smoothness(scorer):
    from motioncharacter.fixtures import motion_clip

    frames = motion_clip(8, size=128)[::2][:16]
    shuffled = frames[np.random.default_rng(0).permutation(len(frames))]
    smooth = scorer.flow_metrics(frames)["motion_smoothness_flowinterp"]["value"]
    rough = scorer.flow_metrics(shuffled)["motion_smoothness_flowinterp"]["value"]
    assert smooth > rough


# ---- similarities, adherence, absence ------------------------------------------------------

def test_cosine_and_spearman():
    assert M.mean_similarity(np.array([1.0, 0.0]), np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(0.5)
    assert M.spearman([0, 5, 10, 20], [1.0, 2.0, 9.0, 30.0])["value"] == pytest.approx(1.0)
    assert M.spearman([0, 5, 10, 20], [30.0, 9.0, 2.0, 1.0])["value"] == pytest.approx(-1.0)
    same = M.spearman([10, 10, 10], [1.0, 2.0, 3.0])
    assert same["value"] is None and "same intensity" in same["reason"]


def test_aggregate_keeps_reasons_and_never_invents_numbers():
    assert M.aggregate([M.present(1.0), M.absent("x"), M.present(0.0)]) == {"value": 0.5, "n": 2}
    assert M.aggregate([M.absent("no face"), M.absent("other")]) == {"value": None, "reason": "no face"}
    assert M.present(float("nan"))["value"] is None


def test_missing_weights_are_reported_absent_with_reason(scorer):
    out = scorer.score(np.repeat(_texture()[None], 4, 0), prompt="a person")
    assert out["clip_t"] == {"value": None, "reason": "no CLIP weights supplied (--clip-weights)"}
    assert out["dover"]["value"] is None and "--dover-model" in out["dover"]["reason"]
    assert out["face_sim_sface"]["value"] is None


def _face_video(img: np.ndarray, n: int = 6) -> np.ndarray:
    """Small shifts and scales of a still: a stand-in 'generated' video of that person."""
    import cv2

    h, w = img.shape[:2]
    out = []
    for i in range(n):
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 2.0 * i - 5, 1.0 + 0.02 * i)
        out.append(cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT))
    return np.stack(out)


def test_same_person_scores_higher_package_faces(scorer):
    from motioncharacter.fixtures import package_face

    grace, astro = package_face("grace_hopper"), package_face("astronaut")
    same = scorer.face_similarity(_face_video(grace), grace)
    other = scorer.face_similarity(_face_video(astro), grace)
    assert scorer.face_key == "face_sim_sface"
    assert same["value"] > other["value"] + 0.3


@pytest.mark.skipif(not (FACES / "examples_obama.jpg").exists() or not (FACES / "examples_biden.jpg").exists(),
                    reason="../shared/data/faces (examples_obama.jpg, examples_biden.jpg) is not present")
def test_same_person_scores_higher_shared_faces(scorer):
    from motioncharacter.video import load_image

    obama, biden = load_image(FACES / "examples_obama.jpg"), load_image(FACES / "examples_biden.jpg")
    same = scorer.face_similarity(_face_video(obama), obama)["value"]
    other = scorer.face_similarity(_face_video(biden), obama)["value"]
    assert same > other + 0.3
    assert scorer.face_similarity(_face_video(biden), biden)["value"] > other + 0.3


# ---- optional models, in the real formats --------------------------------------------------

TINY_CLIP = {"model_cfg": {"embed_dim": 32,
                           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
             "preprocess_cfg": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]}}


def test_clip_metrics_from_an_open_clip_folder(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    from motioncharacter.components.evaluate.score import MetricWeights, Scorer

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP["model_cfg"])
    (tmp_path / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    s = Scorer(MetricWeights(clip_weights=str(tmp_path)))
    frames = np.repeat(_texture(64)[None], 4, 0)
    out = s.clip_scores(frames, frames[0], "a person talking", "talking", ["talking", "smiling"])
    assert out["clip_i"]["value"] == pytest.approx(1.0, abs=1e-5)   # frames identical to the reference
    assert -1 <= out["clip_t"]["value"] <= 1
    assert out["action_top1"]["value"] in (0.0, 1.0)


def test_torchscript_amt_and_dover(tmp_path):
    import torch

    from motioncharacter.components.evaluate.models import AMTInterpolator, DoverScorer

    class Avg(torch.nn.Module):
        def forward(self, a, b, t):
            return a * (1 - t) + b * t

    class Const(torch.nn.Module):
        def forward(self, v):
            return v.float().mean().reshape(1) * 0 + 0.75

    torch.jit.save(torch.jit.script(Avg()), str(tmp_path / "amt.pt"))
    torch.jit.save(torch.jit.script(Const()), str(tmp_path / "dover.pt"))
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    frames[1] = 51
    assert M.motion_smoothness(frames, AMTInterpolator(str(tmp_path / "amt.pt"))) == pytest.approx((255 - 51) / 255)
    assert DoverScorer(str(tmp_path / "dover.pt"))(frames) == pytest.approx(0.75)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript"):
        AMTInterpolator(str(tmp_path / "bad.pt"))


# ---- eval set and CLI ----------------------------------------------------------------------

def test_eval_set_is_deterministic_and_covers_intensities():
    version, bank = load_prompt_bank()
    assert version and len(bank) >= 24
    s = EvalSetSettings(prompts_per_image=3, actions=["", "talking"], intensities=[0, 10, 20], seed=0)
    items = build_items(["a/p1.jpg", "a/p2.jpg"], bank, s)
    assert len(items) == 6 and items == build_items(["a/p1.jpg", "a/p2.jpg"], bank, s)
    assert [i.intensity for i in items[:3]] == [0, 10, 20]
    assert [i.action for i in items] == ["", "", "", "talking", "talking", "talking"]
    assert len({i.seed for i in items}) == 6 and len({i.id for i in items}) == 6
    assert [i.id for i in build_items(["a/p1.jpg", "a/p2.jpg"], bank, s, limit=2)] == [i.id for i in items[:2]]
    assert {i.prompt_id for i in items if i.portrait == "a/p1.jpg"} == {0, 1, 2}


def test_metrics_cli_scores_a_gif(tmp_path, capsys):
    from motioncharacter.cli import main
    from motioncharacter.fixtures import motion_clip, package_face
    from motioncharacter.video import write_video

    import cv2

    gif = write_video(motion_clip(12, size=128)[::2][:8], tmp_path / "v.gif")
    ref = tmp_path / "ref.png"
    cv2.imwrite(str(ref), cv2.cvtColor(package_face("grace_hopper"), cv2.COLOR_RGB2BGR))
    assert main(["metrics", str(gif), "--reference", str(ref), "--prompt", "a woman", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    m = out["metrics"]
    assert out["frames"] == 8
    assert m["face_sim_sface"]["value"] > 0.5
    assert m["clip_t"]["value"] is None and "--clip-weights" in m["clip_t"]["reason"]
    assert m["intensity"]["value"] > 3 and "motion_smoothness_flowinterp" in m


def test_evaluate_cli_errors_are_clear(capsys, tmp_path):
    from motioncharacter.cli import main

    assert main(["evaluate", "--preset", "tiny", "--output", str(tmp_path)]) == 1
    assert "--eval-set" in capsys.readouterr().err
    assert main(["evaluate", "--preset", "tiny", "--eval-set", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--no-track"]) == 1
    assert "no portrait images" in capsys.readouterr().err


def test_compare_table_layout_marks_and_footnotes():
    from motioncharacter.components.evaluate.compare import COLUMNS, table

    def row(label, ms, dd):
        cells = {c: {"key": keys[0], "value": None, "reason": f"why {c}"} for c, keys in COLUMNS}
        cells["Motion Smoothness"] = {"key": "motion_smoothness_flowinterp", "value": ms}
        cells["Dynamic Degree"] = {"key": "dynamic_degree", "value": dd}
        return {"run_id": label, "label": label, "cells": cells}

    md, notes = table([row("a", 0.9, 0.2), row("b", 0.95, 0.4), row("c", 0.8, 0.3)])
    lines = md.splitlines()
    assert lines[0] == ("| Method | Dover Score | Motion Smoothness | Dynamic Degree | CLIP-I | CLIP-T | "
                        "Face Similarity | Intensity rho (ours) |")
    b = next(x for x in lines if x.startswith("| b |"))
    c = next(x for x in lines if x.startswith("| c |"))
    assert "**0.950 [flowinterp]**" in b and "**0.400**" in b and "<u>0.300</u>" in c
    assert "n/a (" in b and "b / CLIP-T: why CLIP-T" in notes


def test_unsplash_photo_ids_and_offline_error(tmp_path, monkeypatch):
    from motioncharacter.components.evaluate import fetch

    assert fetch.photo_id("https://unsplash.com/photos/a-woman-with-a-black-dress-y42-7lT5hjM") == "y42-7lT5hjM"
    urls = tmp_path / "list.txt"
    urls.write_text("https://unsplash.com/photos/a-close-up-01RAM49zduU\n")
    monkeypatch.setattr(fetch, "DOWNLOAD", "http://127.0.0.1:9/{id}")  # nothing listens on the discard port
    with pytest.raises(fetch.OfflineError, match="offline"):
        fetch.fetch(str(tmp_path / "out"), str(urls), progress=False)
