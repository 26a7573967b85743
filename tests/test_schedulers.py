"""Sampler choice (model/schedulers.py): the pipeline really samples with the chosen scheduler, the
training configuration carries over, and generate / evaluate / deploy all pass it on."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny():
    from motioncharacter.model.inference import load_pipeline

    return load_pipeline(preset="tiny")


def test_switching_keeps_the_training_configuration(tiny):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from motioncharacter.model.schedulers import make_scheduler

    base = tiny.scheduler.config
    dpm = make_scheduler("dpm++", base)
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == "dpmsolver++"
    for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert dpm.config[k] == base[k], k
    assert isinstance(make_scheduler("ddim", dpm.config), DDIMScheduler)
    with pytest.raises(ValueError, match="unknown scheduler 'euler'; choose from ddim, dpm"):
        make_scheduler("euler", base)


def test_the_chosen_sampler_changes_the_video_and_ddim_is_the_default(tiny):
    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.model.schedulers import use_scheduler
    from serving_fixtures import face_image

    kw = dict(image=face_image(), prompt="a person", steps=3, frames=8, height=64, width=64, guidance=1.0, seed=5)
    default = generate(tiny, **kw)
    explicit_ddim = generate(load_pipeline(preset="tiny", scheduler="ddim"), **kw)
    assert np.array_equal(default, explicit_ddim)
    dpm_pipe = use_scheduler(load_pipeline(preset="tiny"), "dpm++")
    dpm = generate(dpm_pipe, **kw)
    assert np.array_equal(dpm, generate(dpm_pipe, **kw))  # deterministic: multistep state resets per call
    assert np.abs(dpm.astype(int) - default.astype(int)).max() > 0


def test_evaluate_and_deploy_carry_the_scheduler(tmp_path):
    from motioncharacter.components.evaluate.settings import EvalConfig
    from motioncharacter.components.evaluate.stage import _item_key
    from motioncharacter.config import load
    from motioncharacter.serving.repository import DeployOptions

    class Item:
        id = "x"

        def to_dict(self):
            return {"id": "x"}

    a = load(EvalConfig, "evaluate.yaml")
    b = load(EvalConfig, "evaluate.yaml", overrides=["generation.scheduler=dpm++"])
    assert _item_key(Item(), {}, a, "m") != _item_key(Item(), {}, b, "m")  # no resume across samplers
    opts = DeployOptions(preset="tiny", scheduler="dpm++", default_steps=12)
    from motioncharacter.serving.repository import export_repository

    export_repository(str(tmp_path / "repo"), opts)
    cfg = (tmp_path / "repo" / "motioncharacter" / "config.pbtxt").read_text()
    assert 'key: "scheduler" value: { string_value: "dpm++" }' in cfg
    assert 'key: "default_steps" value: { string_value: "12" }' in cfg
    with pytest.raises(ValueError, match="--scheduler must be one of"):
        DeployOptions(preset="tiny", scheduler="euler").check()


def test_generate_url_refuses_a_sampler_chosen_at_deploy_time(tmp_path, capsys):
    from PIL import Image

    from motioncharacter.cli import main
    from serving_fixtures import face_image

    Image.fromarray(face_image()).save(tmp_path / "f.png")
    rc = main(["generate", "--url", "http://127.0.0.1:9", "--image", str(tmp_path / "f.png"), "--prompt", "a",
               "--out", str(tmp_path / "v.mp4"), "--scheduler", "dpm++"])
    assert rc == 1 and "scheduler are chosen when the server is deployed" in capsys.readouterr().err
