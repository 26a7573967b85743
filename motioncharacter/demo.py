"""``motioncharacter demo``: the README's main job on the project's own generated data.

Until the whole Kubeflow pipeline runs locally, the main job is data preparation:
generate the fixture clips (programmed motion of known magnitude + bad inputs) and
turn them into a training manifest, tracked in MLflow.
"""
from __future__ import annotations

from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the main job locally on generated fixtures (no downloads)",
                       description="Generate demo clips, prepare them into a dataset and log an MLflow run. "
                       "Uses the local stack (S3 + MLflow) when `motioncharacter stack up` is running, "
                       "local files and sqlite MLflow otherwise.")
    p.add_argument("--workdir", default="outputs/demo", help="where fixtures and results go (default: %(default)s)")
    p.add_argument("--output", help="dataset output folder or s3:// URI (default: WORKDIR/prepared)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from motioncharacter.components.prepare.settings import PrepareConfig
    from motioncharacter.components.prepare.stage import prepare, write_summary_table
    from motioncharacter.config import load
    from motioncharacter.fixtures import write_fixtures
    from motioncharacter.tracking import tracking_uri

    work = Path(args.workdir)
    print(f"[1/2] writing fixture clips to {work / 'fixtures'}")
    fixtures = write_fixtures(work / "fixtures")
    out = args.output or str(work / "prepared")
    print(f"[2/2] preparing the dataset into {out}")
    summary = prepare(str(fixtures), out, load(PrepareConfig, "prepare.yaml"))
    print(write_summary_table(summary))
    print(f"manifest:      {out}/manifest.jsonl")
    print(f"pictures:      {out}/contact_sheet.png, {out}/intensity_histogram.png")
    print(f"mlflow run:    {summary.get('mlflow_run_id')} at {tracking_uri()}")
    if tracking_uri().startswith("sqlite"):
        print(f"browse it:     .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}")
    return 0
