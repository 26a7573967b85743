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
    p.add_argument("--shard", type=_shard, metavar="I/N",
                   help="process only slice I (0-based) of N of the sorted input listing, writing its records to "
                        "OUT/shards/I-of-N.json instead of a manifest (no MLflow run); `data merge` then writes "
                        "the manifest. Shards share OUT/records/, so any shard resumes what another finished")
    p.set_defaults(func=_prepare)

    m = dsub.add_parser(
        "merge", help="merge the N shards of a sharded prepare into one manifest",
        description="Read OUT/shards/0-of-N.json ... (N-1)-of-N.json written by `data prepare --shard I/N`, "
        "recompute the intensity resampling weights over the whole dataset and write OUT/manifest.jsonl, "
        "summary.json, the histogram and the contact sheet, exactly as one unsharded prepare would, and "
        "log the MLflow run.",
        epilog="example: motioncharacter data merge s3://clips/prepared/v1 --shards 8 --set filters.ocr=false")
    m.add_argument("output", help="the shards' --output folder or s3://bucket/prefix")
    m.add_argument("--shards", type=int, required=True, metavar="N", help="how many shards were run")
    m.add_argument("--config", help="the shards' YAML settings file (the merge checks they match)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="the shards' --set overrides (repeatable)")
    m.add_argument("--no-track", action="store_true", help="do not log an MLflow run")
    m.set_defaults(func=_merge)

    f = dsub.add_parser("fixtures", help="write the project's generated demo/test clips (programmed motion)",
                        description="Generate face clips with programmed motion of known magnitude (v px per "
                        "4-fps step at 512 px) from package-shipped face images, plus bad inputs.")
    f.add_argument("output", help="folder to write into")
    f.set_defaults(func=_fixtures)
    data.set_defaults(func=lambda a: data.print_help() or 2)


def _prepare(args) -> int:
    from motioncharacter.config import load
    from motioncharacter.faults import TransientError

    from .settings import PrepareConfig

    cfg = load(PrepareConfig, "prepare.yaml", args.config, args.overrides)
    try:
        return _prepare_or_incomplete(args, cfg)
    except TransientError as e:  # e.g. the object store unreachable through every retry
        print(f"error: {e}\nevery clip finished before this is saved; run the same command again to resume",
              file=sys.stderr)
        return 75  # EX_TEMPFAIL, as for an incomplete run


def _prepare_or_incomplete(args, cfg) -> int:
    from .stage import PrepareIncomplete, prepare, write_summary_table

    if args.shard:
        try:
            done = prepare(args.input, args.output, cfg, progress=not args.no_progress, shard=args.shard)
        except PrepareIncomplete as e:
            print(f"error: {e}", file=sys.stderr)
            return 75
        print(f"shard {done['shard']} of {done['shards']}: {done['inputs']} inputs ({done['resumed']} resumed) "
              f"in {done['seconds']} s; merge with `motioncharacter data merge {args.output} --shards {done['shards']}`")
        return 0
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


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N), refused with the reason when it names no shard."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r} is not I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def _merge(args) -> int:
    from motioncharacter.config import load

    from .settings import PrepareConfig
    from .stage import PrepareIncomplete, merge_shards, write_summary_table

    cfg = load(PrepareConfig, "prepare.yaml", args.config, args.overrides)
    try:
        summary = merge_shards(args.output, args.shards, cfg, track=not args.no_track)
    except PrepareIncomplete as e:
        print(write_summary_table(e.summary))
        print(f"error: {e}", file=sys.stderr)
        return 75
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
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
