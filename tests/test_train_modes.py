"""`motioncharacter train --set train.mode=id-animator|dreamoving` on the tiny preset (real CPU DeepSpeed
subprocesses): the trained module changes, losses are finite, a run resumed from the checkpoint a
kill leaves behind repeats the uninterrupted losses; with model.train_motion_module the trained
temporal layers are exported as motion_adapter/ and are what load_pipeline then runs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import latest, losses, prepared, run_train, train_cmd, train_env

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return prepared(tmp_path_factory)


def _train(prep, out, tmp, *extra):
    rc, log = run_train(train_cmd(prep / "manifest.jsonl", out, STEPS, "--set", "train.checkpoint_every=2", *extra),
                        train_env(tmp))
    assert rc == 0, log[-3000:]
    return log


def _resume_after_kill(prep, done, tmp, *extra):
    """The uninterrupted run's folder as a SIGKILL during step 3 leaves it (checkpoint step 2 the latest,
    steps.jsonl up to step 2, no final export), resumed to the end."""
    out = shutil.copytree(done, tmp / "killed")
    shutil.rmtree(out / "checkpoints" / f"step-{STEPS:08d}")
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    lines = (out / "steps.jsonl").read_text().splitlines()
    (out / "steps.jsonl").write_text("\n".join(lines[:2]) + "\n")
    for sub in ("face_adapter", "content_guider", "motion_adapter"):
        shutil.rmtree(out / sub, ignore_errors=True)
    rc, log = run_train(train_cmd(prep / "manifest.jsonl", out, STEPS, "--set", "train.checkpoint_every=2", "--resume",
                                  *extra), train_env(tmp))
    assert rc == 0 and "resumed from step-00000002 at step 2" in log, log[-3000:]
    return out


def _moved(trained, fresh) -> list[str]:
    a, b = trained.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _fresh(mode):
    from motioncharacter.components.train.modes import build_guider
    from motioncharacter.model.motion_module import motion_unet
    from motioncharacter.model.presets import build_tiny

    p = build_tiny(0)  # the run's initial model: the tiny preset's, seed 0
    return build_guider(mode, motion_unet(p["unet"], p["motion_adapter"]), 32, 128, seed=0, tiny=True)


def test_id_animator_mode_trains_resumes_and_exports_motion_modules(prep, tmp_path):
    from motioncharacter.model.face_adapter import IDAnimatorFaceAdapter
    from motioncharacter.model.features import guider_class
    from motioncharacter.model.inference import load_pipeline
    from motioncharacter.model.presets import build_tiny
    from motioncharacter.pipelines.steps import assemble_weights

    extra = ("--set", "train.mode=id-animator", "--set", "model.train_motion_module=true")
    out = tmp_path / "out"
    _train(prep, out, tmp_path, *extra)
    ls = losses(out)
    assert sorted(ls) == [1, 2, 3] and all(np.isfinite(v) for v in ls.values())
    assert not (out / "adapter").exists() and latest(out) == "step-00000003"
    assert (out / "checkpoints" / "step-00000002" / "face_adapter" / "config.json").is_file()
    folder = out / "face_adapter"
    trained = guider_class(folder).from_pretrained(folder)
    assert isinstance(trained, IDAnimatorFaceAdapter)
    moved = _moved(trained, _fresh("id-animator"))
    assert any(k.startswith("image_proj.") for k in moved) and any("to_v_face" in k for k in moved)
    assert any("lora.up" in k for k in moved)  # the LoRA left its zero start

    resumed = _resume_after_kill(prep, out, tmp_path, *extra)
    assert losses(resumed) == ls

    # the trained temporal layers: exported, not the base's, and what a pipeline on the assembled folder runs
    from diffusers import MotionAdapter

    exported = MotionAdapter.from_pretrained(out / "motion_adapter", use_safetensors=True)
    base = build_tiny(0)["motion_adapter"]
    assert _moved(exported, base), "the exported motion modules equal the base's: they did not train"
    weights = assemble_weights(str(out), "tiny", "", str(tmp_path / "weights"))
    pipe = load_pipeline(weights=weights)
    unet = pipe.unet.state_dict()
    for k, v in exported.state_dict().items():
        assert torch.equal(unet[k], v), k
    from motioncharacter.model.features import component  # --mode id-animator reads face_adapter/ from there

    assert not _moved(component(pipe, "face_adapter"), trained)

    # a registered version carries both trained parts, and assembles into the same folder
    import uuid

    from motioncharacter import registry

    v = registry.register_adapter(str(out / "face_adapter"), train_run_id="", name=f"modes-{uuid.uuid4().hex[:8]}",
                                  lineage={registry.BASE_TAG: "preset:tiny"}, parts=["face_adapter", "motion_adapter"])
    served, assembled = registry.weights_for(v)
    assert assembled and registry.registered_version_of(served)["uri"] == v.uri
    for sub in ("face_adapter", "motion_adapter"):
        for f in (out / sub).glob("*.safetensors"):
            assert (Path(served) / sub / f.name).read_bytes() == f.read_bytes(), f


def test_dreamoving_mode_trains_the_content_guider_and_resumes(prep, tmp_path):
    from motioncharacter.model.content_guider import ContentGuider

    extra = ("--set", "train.mode=dreamoving", "--set", "data.cloth_dropout=0.0")
    out = tmp_path / "out"
    _train(prep, out, tmp_path, *extra)
    ls = losses(out)
    assert sorted(ls) == [1, 2, 3] and all(np.isfinite(v) for v in ls.values())
    assert not (out / "motion_adapter").exists()  # the temporal layers did not train
    trained = ContentGuider.from_pretrained(out / "content_guider", use_safetensors=True)
    moved = _moved(trained, _fresh("dreamoving"))
    for part in ("face_resampler.", "cloth_resampler.", "face_id_proj.", "to_v_face", "to_v_cloth"):
        assert any(part in k for k in moved), f"{part} did not train"

    resumed = _resume_after_kill(prep, out, tmp_path, *extra)
    assert losses(resumed) == ls


def test_unknown_mode_is_refused():
    from motioncharacter.components.train.settings import TrainConfig
    from motioncharacter.config import ConfigError, load

    with pytest.raises(ConfigError, match="train.mode must be one of motioncharacter, id-animator, dreamoving"):
        load(TrainConfig, "train.yaml", overrides=["train.mode=animator"])
