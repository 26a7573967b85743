"""``motioncharacter data prepare|fixtures``."""
from __future__ import annotations

import argparse
import sys


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="prepare training data from face videos and portraits",
                          description="Data preparation (MotionCharacter appendix A).")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION")

    p = dsub.add_parser(
        "prepare", help="filter, caption and measure motion of clips into a training manifest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn a folder or s3:// prefix of face videos and portrait photos into a training dataset:\n"
        "filters (resolution, quality, text overlay, exactly one face), optical-flow motion intensity\n"
        "(eq. 5-7, on a 512-px scale) and region masks (eq. 9), captions + action phrases, a face pool,\n"
        "intensity resampling weights. Writes OUT/manifest.jsonl (one line per input, with the reasons\n"
        "for every drop), OUT/summary.json, a histogram and a contact sheet, and logs an MLflow run.\n"
        "Re-running skips inputs already finished (content hash + settings hash).",
        epilog="example: motioncharacter data prepare ./clips --output s3://clips/prepared/v1 --set filters.ocr=false")
    p.add_argument("input", help="folder, single file or s3://bucket/prefix of .mp4/.mov/... videos and .jpg/.png stills")
    p.add_argument("--output", "-o", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--config", help="YAML file overriding motioncharacter/configs/prepare.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set sampling.fps=8 (repeatable)")
    p.add_argument("--no-track", action="store_true", help="do not log an MLflow run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_prepare)

    f = dsub.add_parser("fixtures", help="write the project's generated demo/test clips (programmed motion)",
                        description="Generate face clips with programmed motion of known magnitude (v px per "
                        "4-fps step at 512 px) from package-shipped face images, plus bad inputs.")
    f.add_argument("output", help="folder to write into")
    f.set_defaults(func=_fixtures)
    data.set_defaults(func=lambda a: data.print_help() or 2)


def _prepare(args) -> int:
    from motioncharacter.config import load

    from .settings import PrepareConfig
    from .stage import PrepareIncomplete, prepare, write_summary_table

    cfg = load(PrepareConfig, "prepare.yaml", args.config, args.overrides)
    try:
        summary = prepare(args.input, args.output, cfg, track=not args.no_track, progress=not args.no_progress)
    except PrepareIncomplete as e:
        print(write_summary_table(e.summary))
        print(f"error: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: worth retrying (a pipeline step's retry policy resumes it)
    print(write_summary_table(summary))
    print(f"manifest: {args.output.rstrip('/')}/manifest.jsonl")
    if summary.get("mlflow_run_id"):
        print(f"mlflow run: {summary['mlflow_run_id']}")
    return 0


def _fixtures(args) -> int:
    from motioncharacter.fixtures import write_fixtures

    out = write_fixtures(args.output)
    print(f"fixtures written to {out}")
    return 0
