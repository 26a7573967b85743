"""``motioncharacter evaluate``, ``motioncharacter metrics`` and ``motioncharacter compare``."""
from __future__ import annotations

import argparse
import json

METRIC_HELP = (
    "metrics: face_sim_sface (SFace, offline) or face_sim_arcface (--arcface-pack); clip_i / clip_t (--clip-weights); "
    "dynamic_degree (VBench, RAFT: --raft-weights) or dynamic_degree_dis (same rule on OpenCV DIS flow); "
    "motion_smoothness (VBench, AMT: --amt-model) or motion_smoothness_flowinterp (odd frames re-created by "
    "DIS-flow interpolation); dover (--dover-model); intensity (eq. 5-7, DIS flow, 512-px scale). "
    "A metric that cannot be computed is reported as null with its reason.")


def _weights_args(p, prefix: str = "") -> None:
    p.add_argument("--arcface-pack", metavar="DIR_OR_URI", help="insightface model pack: face similarity with ArcFace "
                   "(the paper's) instead of the offline SFace")
    p.add_argument("--clip-weights", metavar="PATH_OR_URI", help="open_clip folder (open_clip_config.json + "
                   "open_clip_model.safetensors) or checkpoint file: enables CLIP-I, CLIP-T and action adherence")
    p.add_argument("--clip-model", metavar="ARCH", help="open_clip architecture when --clip-weights is a file, e.g. ViT-H-14")
    p.add_argument("--raft-weights", metavar="FILE_OR_URI", help="torchvision raft_large state dict (.safetensors): "
                   "VBench dynamic degree with RAFT")
    p.add_argument("--amt-model", metavar="FILE_OR_URI", help="AMT TorchScript export: VBench motion smoothness")
    p.add_argument("--dover-model", metavar="FILE_OR_URI", help="DOVER TorchScript export: Dover score")


WEIGHT_KEYS = ("arcface_pack", "clip_weights", "clip_model", "raft_weights", "amt_model", "dover_model")


def _weight_overrides(args) -> list[str]:
    return [f"metrics.{k}={getattr(args, k)}" for k in WEIGHT_KEYS if getattr(args, k, None)]


def add_commands(sub) -> None:
    e = sub.add_parser(
        "evaluate", help="generate the eval set's videos and score them (paper Table 1 metrics + intensity adherence)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a checkpoint on portraits x prompt bank x actions x intensities (MotionCharacter\n"
        "sec. 4.1). Writes videos, results.jsonl, per_video.csv, summary.json, calibration.png and a\n"
        "contact sheet to --output and logs an MLflow run. " + METRIC_HELP,
        epilog="examples:\n  motioncharacter evaluate --preset tiny --eval-set ./unsplash50 --output ./eval --limit 4\n"
               "  motioncharacter evaluate fetch-unsplash50 --out ./unsplash50")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="DIR_OR_URI", help="weights folder or s3:// URI (diffusers layout), or a "
                     "registered version (models:/NAME/VERSION, models:/NAME@ALIAS), which the evaluation is linked to")
    src.add_argument("--preset", choices=["tiny", "mini"],
                     help="tiny: small random models for a CPU smoke run; mini: the small model trained here by `demo --learn`")
    e.add_argument("--eval-set", metavar="DIR_OR_URI", help="folder or s3:// prefix of portrait images")
    e.add_argument("--output", "-o", metavar="DIR_OR_URI", help="where videos and results go (folder or s3://)")
    e.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N items (a quick run)")
    e.add_argument("--config", help="YAML overriding motioncharacter/configs/evaluate.yaml")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set evalset.intensities=[0,20] (repeatable)")
    _weights_args(e)
    e.add_argument("--name", help="MLflow run name (default: eval-<weights folder or preset>); compare uses it as label")
    e.add_argument("--device", default="cpu", help="torch device for generation, e.g. cuda")
    e.add_argument("--no-track", action="store_true", help="do not log an MLflow run")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=_evaluate)
    esub = e.add_subparsers(dest="evaluate_command", metavar="ACTION")
    f = esub.add_parser("fetch-unsplash50", help="download the 50 Unsplash-50 portraits (needs internet)",
                        description="Download the Unsplash-50 evaluation portraits from unsplash.com into a folder "
                        "to pass as --eval-set. Fails with a clear message when offline.")
    f.add_argument("--out", required=True, help="folder to write NN_<photo id>.jpg into")
    f.add_argument("--urls", help="local copy of the URL list (default: download " + "LCM-Lookahead's unsplash_50.txt)")
    f.add_argument("--max-side", type=int, default=1024, help="downscale so the long side is at most this (0 = keep)")
    f.set_defaults(func=_fetch)

    m = sub.add_parser("metrics", help="score an existing video or GIF with the evaluation metrics",
                       description="Score any video (mp4/gif/...) so other systems' outputs can be compared. "
                       "Frames are sampled by time at --fps (VBench samples ~8 fps): a GIF / WebP / APNG frame or a "
                       "variable-rate video frame counts for as long as it is shown. " + METRIC_HELP)
    m.add_argument("video", help="video, GIF, animated WebP or APNG file (local or s3://)")
    m.add_argument("--reference", metavar="FACE", help="reference portrait: face similarity and CLIP-I")
    m.add_argument("--prompt", metavar="TEXT", help="the text prompt: CLIP-T")
    m.add_argument("--action", metavar="PHRASE", help="requested action phrase: action adherence (with CLIP)")
    m.add_argument("--face-index", type=int, help="which face of the reference (0 = largest) when it has several")
    m.add_argument("--fps", type=float, default=8.0, help="sampling rate for the frames scored")
    m.add_argument("--max-frames", type=int, default=64, help="score at most this many frames")
    _weights_args(m)
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=_metrics)

    c = sub.add_parser("compare", help="evaluation runs side by side in the layout of the paper's Table 1",
                       description="Fetch evaluation runs from MLflow and print a side-by-side table (paper Table 1 "
                       "columns + intensity adherence); saves compare.md, compare.csv and bar plots compare.png.")
    c.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="MLflow run ids of `motioncharacter evaluate` runs, "
                   "or registered versions (models:/NAME/VERSION, models:/NAME@ALIAS): the evaluation linked to each")
    c.add_argument("--labels", help="comma-separated row labels (default: run names)")
    c.add_argument("--output", "-o", default="compare", help="folder or s3:// prefix for the table and plots")
    c.set_defaults(func=_compare)


def _evaluate(args) -> int:
    from motioncharacter.cli import UserError
    from motioncharacter.config import load

    from .settings import EvalConfig
    from .stage import evaluate

    if not (args.weights or args.preset):
        raise UserError("pass --weights DIR_OR_URI or --preset tiny")
    if not args.eval_set or not args.output:
        raise UserError("pass --eval-set (portraits folder or s3:// prefix) and --output (folder or s3://)")
    cfg = load(EvalConfig, "evaluate.yaml", args.config, args.overrides + _weight_overrides(args))
    s = evaluate(args.eval_set, args.output, cfg, weights=args.weights, preset=args.preset, device=args.device,
                 limit=args.limit, track=not args.no_track, progress=not args.no_progress, run_name=args.name)
    print(format_metrics(s["metrics"]))
    print(f"videos: {s['scored']} scored, {s['skipped']} skipped; results: {args.output.rstrip('/')}/summary.json")
    if s.get("mlflow_run_id"):
        print(f"mlflow run: {s['mlflow_run_id']}")
    return 0


def format_metrics(metrics: dict) -> str:
    width = max(len(k) for k in metrics) if metrics else 0
    out = []
    for k, v in metrics.items():
        extra = ", ".join(f"{e} {x:.3g}" if isinstance(x, float) else f"{e} {x}"
                          for e, x in v.items() if e not in ("value", "reason"))
        out.append(f"{k:<{width}}  " + (f"{v['value']:.4f}" + (f"  ({extra})" if extra else "")
                                        if v.get("value") is not None else f"n/a ({v.get('reason', '')})"))
    return "\n".join(out)


def _fetch(args) -> int:
    from .fetch import fetch

    files = fetch(args.out, args.urls, args.max_side)
    print(f"{len(files)} portraits in {args.out}; evaluate with --eval-set {args.out}")
    return 0


def _metrics(args) -> int:
    from motioncharacter import storage
    from motioncharacter.video import load_image

    from .score import MetricWeights, Scorer

    w = MetricWeights(**{k: getattr(args, k) or "" for k in WEIGHT_KEYS})
    with storage.local_file(args.video) as p:
        frames, fps = read_any(p, args.fps, args.max_frames)
    ref = None
    if args.reference:
        with storage.local_file(args.reference) as p:
            ref = load_image(p)
    result = Scorer(w).score(frames, reference=ref, prompt=args.prompt, action=args.action,
                             face_index=args.face_index)
    if args.json:
        print(json.dumps({"video": args.video, "frames": len(frames), "metrics": result}, indent=1))
    else:
        print(f"{args.video}: {len(frames)} frames at {fps:g} fps")
        print(format_metrics(result))
    return 0


def read_any(path, fps: float, max_frames: int):
    """(frames, fps used) from a video or animated GIF / WebP / APNG, sampled by time at ``fps``."""
    from motioncharacter.video import open_media

    media = open_media(path)
    # a constant-rate video is never sampled faster than it was encoded (no repeated frames, as
    # before); animated images and variable-rate video repeat a frame for as long as it is shown
    use = min(fps, media.timeline.fps) if media.timeline.fps else fps
    return media.sample(use, max_frames)[0], use


def _compare(args) -> int:
    from .compare import compare

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    r = compare(args.run_ids, args.output, labels)
    print(r["text"])
    print(f"saved: {args.output.rstrip('/')}/compare.md, compare.csv, compare.png")
    return 0
