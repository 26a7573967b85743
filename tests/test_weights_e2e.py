"""An assembled weights folder through the whole platform: `weights tiny` writes the layout `weights
assemble` produces; it trains (DeepSpeed), the trained adapter assembles back into a weights folder,
which generates, evaluates and deploys. Training changed the output: the base and the trained
folder generate different videos from the same request."""
from __future__ import annotations

import numpy as np
import pytest
from train_fixtures import prepared, run_train, train_cmd, train_env

from motioncharacter.cli import main

pytestmark = pytest.mark.slow


def test_an_assembled_folder_trains_evaluates_and_deploys(tmp_path_factory, tmp_path, capsys):
    from motioncharacter.components.evaluate.settings import EvalConfig
    from motioncharacter.components.evaluate.stage import evaluate
    from motioncharacter.config import load
    from motioncharacter.fixtures import package_face
    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.pipelines.steps import assemble_weights

    base = tmp_path / "base"
    assert main(["weights", "tiny", str(base), "--no-adapter"]) == 0
    assert main(["weights", "check", str(base)]) == 0
    assert capsys.readouterr().out.strip().endswith("usable")

    cmd = train_cmd(prepared(tmp_path_factory) / "manifest.jsonl", tmp_path / "run", 2,
                    "--set", "optim.lr=0.05", "--set", "loss.id_loss=false")  # a folder counts as real weights
    i = cmd.index("--preset")
    cmd[i:i + 2] = ["--weights", str(base)]  # the folder, not the preset
    rc, log = run_train(cmd, train_env(tmp_path))
    assert rc == 0, log[-3000:]
    trained = assemble_weights(str(tmp_path / "run"), "", str(base), str(tmp_path / "trained"))
    assert (tmp_path / "trained" / "adapter" / "config.json").is_file()

    request = dict(image=package_face("grace_hopper"), prompt="a woman smiling", action="smiling", intensity=8,
                   steps=2, frames=4, height=64, width=64, guidance=1.0, seed=3)
    before = generate(load_pipeline(weights=str(base)), **request)
    after = generate(load_pipeline(weights=trained), **request)
    assert before.shape == after.shape == (4, 64, 64, 3)
    # the base has no adapter/ (a zero-output one: base AnimateDiff); the trained adapter changes the video
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 0.5

    faces = tmp_path / "faces"
    faces.mkdir()
    import cv2

    cv2.imwrite(str(faces / "grace.png"), cv2.cvtColor(package_face("grace_hopper"), cv2.COLOR_RGB2BGR))
    cfg = load(EvalConfig, "evaluate.yaml", overrides=[
        "generation.frames=4", "generation.steps=1", "generation.guidance=1.0", "evalset.prompts_per_image=1",
        "evalset.intensities=[0,20]", "evalset.actions=[talking]", "output.gifs=0"])
    result = evaluate(str(faces), str(tmp_path / "eval"), cfg, weights=trained, limit=1, track=False,
                      progress=False)
    assert result["metrics"] and (tmp_path / "eval" / "summary.json").is_file()

    repo = tmp_path / "repo"
    assert main(["deploy", "--weights", trained, "--model-repository", str(repo)]) == 0
    config = (repo / "motioncharacter" / "config.pbtxt").read_text()
    assert trained in config  # the version serves the trained folder
