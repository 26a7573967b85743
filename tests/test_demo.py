"""The README's main job, in its quick data-only form (the whole pipeline run is test_pipeline_local)."""
from __future__ import annotations

import json


def test_demo_data_only_without_services(tmp_path, monkeypatch, capsys):
    from motioncharacter.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOTIONCHARACTER_STATE_DIR", str(tmp_path / "no-stack"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MOTIONCHARACTER_S3_ENDPOINT", raising=False)
    assert main(["demo", "--no-stack", "--data-only", "--workdir", "w"]) == 0
    out = capsys.readouterr().out
    manifest = tmp_path / "w" / "prepared" / "manifest.jsonl"
    assert f"manifest: {manifest}" in out and f"mlflow: sqlite:///{tmp_path / 'mlflow.db'}" in out
    recs = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert sum(r["kept"] for r in recs) == 6 and len(recs) == 12
    assert (tmp_path / "mlflow.db").is_file()
