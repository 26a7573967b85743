"""`motioncharacter demo --learn` in a few steps: every stage of the learning loop runs and writes
what the report promises. (The full run, whose figures the README quotes, is `demo --learn`
itself: about 25 minutes, a benchmark, not CI.) Also the mini base's own pieces: the VAE learns
to reconstruct, and the trained UNet + motion modules survive the split into the diffusers layout."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml


@pytest.fixture
def no_services(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOTIONCHARACTER_STATE_DIR", str(tmp_path / "no-stack"))
    for var in ("MLFLOW_TRACKING_URI", "MOTIONCHARACTER_S3_ENDPOINT", "MOTIONCHARACTER_MINI"):
        monkeypatch.delenv(var, raising=False)
    # in-process training sets RANK/MASTER_PORT (and keeps that port bound); later tests' training
    # subprocesses must not inherit them, or they collide on the port (EADDRINUSE)
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in dist_vars}
    yield tmp_path
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.slow
def test_demo_learn_fast_runs_every_stage(no_services, capsys, monkeypatch):
    from motioncharacter.cli import main
    from motioncharacter.learn import GRID_INTENSITIES, load_learn_config

    tmp = no_services
    cfg = load_learn_config()
    cfg.update(fixtures={"clips_per_identity": 2, "real_clips": False}, base={"vae_steps": 3, "unet_steps": 3},
               adapter_steps=2)
    cfg["evaluate"] = cfg["evaluate"] + ["evalset.prompts_per_image=2", "generation.steps=2"]
    cfg["train"] = cfg["train"] + ["optim.warmup_steps=0"]  # so 2 steps move the weights
    (tmp / "fast.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["demo", "--learn", "--no-stack", "--output", "out", "--learn-config", "fast.yaml"]) == 0
    assert "intensity_spearman" in capsys.readouterr().out

    out = tmp / "out"
    report = json.loads((out / "learn_report.json").read_text())
    assert report["minutes"] > 0
    for variant in ("full", "no_motion_control", "motion_scale_0"):
        r = report[variant]
        assert r["n"] == 8  # 4 held-out faces x 2 prompts
        assert r["intensity_mae"] is not None and r["intensity_mae"] >= 0
        assert r["intensity_spearman"] is None or -1 <= r["intensity_spearman"] <= 1
        ev = out / "eval" / variant
        rows = [json.loads(x) for x in (ev / "results.jsonl").read_text().splitlines()]
        assert {row["intensity"] for row in rows} <= set(map(float, GRID_INTENSITIES)) and len(rows) == 8
        assert all((ev / row["video"]).is_file() for row in rows)
        assert (ev / "calibration.png").is_file() and (ev / "contact_sheet.png").is_file()
        # evaluated on faces training never saw
        assert {json.loads(x)["clip"].rsplit("_", 2)[0] for x in
                next((out / "work").glob("*/prepared/manifest.jsonl")).read_text().splitlines()}.isdisjoint(
            {"group_2", "group_3", "group_4", "group_5"})
        assert {row["portrait"].rsplit("/", 1)[-1] for row in rows} == {f"group_{k}.png" for k in range(2, 6)}
    summary = json.loads((out / "eval" / "motion_scale_0" / "summary.json").read_text())
    assert summary["generation"]["motion_scale"] == 0.0
    assert json.loads((out / "eval" / "full" / "summary.json").read_text())["generation"]["motion_scale"] == 1.0

    # the trained mini model is a normal weights folder: base + the full variant's adapter
    from motioncharacter.model.inference import load_pipeline
    pipe = load_pipeline(weights=report["weights"]["full"])
    assert pipe.defaults == {"frames": 8, "height": 64, "width": 64, "steps": 25}
    from PIL import Image

    with Image.open(out / "intensity_grid.gif") as grid:  # 5 tiles of 128 px side by side, 8 frames
        assert grid.size == (len(GRID_INTENSITIES) * 128, 128) and grid.n_frames == 8
    # the ablation trained no motion branch: its out-projections are still exactly zero
    ablated = load_pipeline(weights=report["weights"]["no_motion_control"]).adapter
    assert all(float(layer.out_motion.weight.abs().max()) == 0 for layer in ablated.mc_layers.values())
    assert any(float(layer.out_motion.weight.abs().max()) > 0 for layer in pipe.adapter.mc_layers.values())
    # --preset mini finds the trained model where demo --learn left it
    assert (out / "mini" / "motioncharacter.json").is_file()
    monkeypatch.setenv("MOTIONCHARACTER_MINI", str(out / "mini"))
    mini = load_pipeline(preset="mini")
    assert mini.defaults["steps"] == 25 and mini.scheduler.config.prediction_type == "v_prediction"


def test_preset_mini_says_how_to_get_it(no_services, capsys):
    from PIL import Image

    from motioncharacter.cli import main
    from motioncharacter.fixtures import package_face
    from motioncharacter.model.inference import load_pipeline

    with pytest.raises(FileNotFoundError, match="demo --learn"):
        load_pipeline(preset="mini")
    Image.fromarray(package_face()).save(no_services / "face.png")
    assert main(["generate", "--preset", "mini", "--image", "face.png", "--prompt", "a person",
                 "--out", "o.mp4"]) == 1
    assert "demo --learn" in capsys.readouterr().err


def _clips(n=6, f=8, seed=0):
    """Smooth random 64x64 clips in [-1, 1] (a blob on a gradient), (N, F, 3, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(3, 1, 1, generator=g) * 2 - 1
        cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
        frames = [c * 0.5 + 0.4 * torch.exp(-((xx - cx - 0.05 * k) ** 2 + (yy - cy) ** 2) / 0.1)[None] - 0.2 * yy
                  for k in range(f)]
        out.append(torch.stack(frames))
    return torch.stack(out).clamp(-1, 1)


def test_mini_vae_learns_to_reconstruct():
    from motioncharacter.components.train.base import BaseSettings, build_mini, reconstruction_psnr, train_vae

    s = BaseSettings(vae_steps=60, vae_batch=8, warmup=5)
    vae = build_mini(s)["vae"]
    clips = _clips()
    before = reconstruction_psnr(vae, clips)
    losses = train_vae(vae, clips, s)
    after = reconstruction_psnr(vae, clips)
    assert after > before + 5, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_mini_export_is_lossless(tmp_path):
    """The UNetMotionModel trained in one piece is saved as unet/ + motion_adapter/ (the layout of
    SD1.5 + AnimateDiff) and loads back to exactly the same predictions."""
    from motioncharacter.components.train.base import BaseSettings, build_mini, save_weights
    from motioncharacter.model.loading import load_components
    from motioncharacter.model.motion_module import motion_unet

    s = BaseSettings()
    parts = build_mini(s)
    unet = motion_unet(parts["unet"], parts["motion_adapter"])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in unet.parameters():  # as if trained: every weight, motion modules included, moved
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_weights(unet, parts, tmp_path / "w", {"defaults": {"frames": 8, "height": 64, "width": 64, "steps": 25}})
    back = load_components(str(tmp_path / "w"))
    x = torch.randn(1, 8, 8, 8, 8, generator=g)
    txt = torch.randn(8, 77, 32, generator=g)
    with torch.no_grad():
        a = unet(x, torch.tensor(300), encoder_hidden_states=txt).sample
        b = back["unet"](x, torch.tensor(300), encoder_hidden_states=txt).sample
    assert torch.equal(a, b)
    assert back["info"]["defaults"]["steps"] == 25
