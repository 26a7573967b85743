"""A tiny end-to-end evaluation logged to the real MLflow server (S3 artifacts), then compare."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.services, pytest.mark.slow]

SETTINGS = ["generation.frames=4", "generation.steps=1", "generation.guidance=1.0", "evalset.prompts_per_image=2",
            "evalset.intensities=[0,10,20]", "evalset.actions=['',talking]", "output.gifs=2"]


@pytest.fixture(scope="module")
def portraits(tmp_path_factory):
    import cv2

    from motioncharacter.fixtures import package_face

    d = tmp_path_factory.mktemp("portraits")
    for name in ("grace_hopper", "astronaut"):
        cv2.imwrite(str(d / f"{name}.png"), cv2.cvtColor(cv2.resize(package_face(name), (256, 256)), cv2.COLOR_RGB2BGR))
    (d / "notes.txt").write_text("not an image: ignored")
    return d


def _evaluate(args, capsys) -> str:
    from motioncharacter.cli import main

    assert main(args) == 0
    out = capsys.readouterr().out
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("mlflow run:"))


def test_evaluate_logs_to_mlflow_and_compare(stack, portraits, tmp_path, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from motioncharacter import storage

    out_uri = f"s3://{stack.bucket}/eval/run-a"
    sets = [a for s in SETTINGS for a in ("--set", s)]
    run_a = _evaluate(["evaluate", "--preset", "tiny", "--eval-set", str(portraits), "--output", out_uri,
                       "--limit", "3", "--name", "tiny-a", "--no-progress", *sets], capsys)
    run_b = _evaluate(["evaluate", "--preset", "tiny", "--eval-set", str(portraits), "--output", str(tmp_path / "b"),
                       "--limit", "3", "--name", "tiny-b", "--no-progress", *sets,
                       "--set", "generation.motion_scale=0.0"], capsys)

    # the object store holds the outputs
    files = {f.rsplit("/", 1)[-1] for f in storage.list_files(out_uri)}
    assert {"summary.json", "results.jsonl", "per_video.csv", "calibration.png", "contact_sheet.png"} <= files
    summary = json.loads(storage.read_bytes(f"{out_uri}/summary.json"))
    assert summary["scored"] == 3 and summary["prompt_bank_version"] == "1"
    m = summary["metrics"]
    assert m["clip_t"] == {"value": None, "reason": "no CLIP weights supplied (--clip-weights)"}
    rows = [json.loads(x) for x in storage.read_bytes(f"{out_uri}/results.jsonl").decode().splitlines()]
    assert sorted(r["intensity"] for r in rows) == [0.0, 10.0, 20.0]
    assert all(np.isfinite(r["metrics"]["intensity"]["value"]) for r in rows)
    # the summary is the rows' aggregate: per-video means, and the intensity adherence by hand
    for key in ("dynamic_degree_dis", "motion_smoothness_flowinterp"):
        per_video = [r["metrics"][key]["value"] for r in rows]
        assert m[key]["value"] == pytest.approx(np.mean(per_video)) and m[key]["n"] == 3
    assert 0.0 <= m["dynamic_degree_dis"]["value"] <= 1.0 and m["motion_smoothness_flowinterp"]["value"] <= 1.0
    req = np.array([r["intensity"] for r in rows])
    meas = np.array([r["metrics"]["intensity"]["value"] for r in rows])
    assert m["intensity_mae"]["value"] == pytest.approx(np.abs(meas - req).mean())
    if np.ptp(meas) == 0:
        assert m["intensity_spearman"] == {"value": None, "reason": "measured intensity is the same for every video"}
    else:  # Spearman's rho: Pearson's r of the ranks (ties get their mean rank)
        from scipy.stats import rankdata

        rho = np.corrcoef(rankdata(req), rankdata(meas))[0, 1]
        assert m["intensity_spearman"]["value"] == pytest.approx(rho) and m["intensity_spearman"]["n"] == 3

    # the MLflow run: metrics (never a number for an absent metric), reasons as tags, table, GIFs
    client = MlflowClient(stack.mlflow_uri)
    run = client.get_run(run_a)
    assert run.data.metrics["scored"] == 3
    assert "motion_smoothness_flowinterp" in run.data.metrics and "clip_t" not in run.data.metrics
    assert run.data.tags["absent.clip_t"].startswith("no CLIP weights")
    assert run.data.params["prompt_bank_version"] == "1"
    arts = {a.path for a in client.list_artifacts(run_a)}
    assert {"per_video.json", "per_video.csv", "calibration.png", "contact_sheet.png", "summary.json"} <= arts
    assert len(client.list_artifacts(run_a, "gifs")) == 2
    table = mlflow.load_table("per_video.json", run_ids=[run_a])
    assert len(table) == 3 and "motion_smoothness_flowinterp" in table.columns

    # compare: Table 1 layout, both runs, saved files
    from motioncharacter.cli import main

    cmp_dir = tmp_path / "cmp"
    assert main(["compare", run_a, run_b, "--output", str(cmp_dir)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    cols = ["Dover Score", "Motion Smoothness", "Dynamic Degree", "CLIP-I", "CLIP-T", "Face Similarity"]
    assert [header.index(c) for c in cols] == sorted(header.index(c) for c in cols)
    assert "tiny-a" in text and "tiny-b" in text and "[flowinterp]" in text
    assert "no CLIP weights supplied" in text            # the footnote says why CLIP-T is n/a
    assert {p.name for p in cmp_dir.iterdir()} == {"compare.md", "compare.csv", "compare.png"}

    from motioncharacter.cli import main as cli

    assert cli(["compare", "0" * 32]) == 1
    assert "not found" in capsys.readouterr().err


def test_rerun_resumes_finished_items(portraits, tmp_path):
    """A re-run into the same output reuses every finished item; other settings start afresh."""
    from motioncharacter.components.evaluate.settings import EvalConfig
    from motioncharacter.components.evaluate.stage import evaluate
    from motioncharacter.config import load

    cfg = load(EvalConfig, "evaluate.yaml", overrides=SETTINGS)
    out = str(tmp_path / "out")
    first = evaluate(str(portraits), out, cfg, preset="tiny", limit=2, track=False, progress=False)
    (Path(out) / "records").joinpath("stray.txt").write_text("ignored")
    again = evaluate(str(portraits), out, cfg, preset="tiny", limit=2, track=False, progress=False)
    assert first["resumed"] == 0 and again["resumed"] == 2
    assert again["metrics"] == first["metrics"]
    assert (Path(out) / "contact_sheet.png").is_file()  # pictures come back from the stored videos
    other = load(EvalConfig, "evaluate.yaml", overrides=SETTINGS + ["generation.motion_scale=0.0"])
    assert evaluate(str(portraits), out, other, preset="tiny", limit=1, track=False, progress=False)["resumed"] == 0
