"""Per-clip cost of each data-preparation stage against decoding the same frames, side by side.

    .venv/bin/python bench/bench_prepare.py [CLIP_DIR] [--repeat 3]

Defaults to ../shared/data/clips (falls back to the generated fixtures when absent).
Every stage runs on the same 16 frames sampled at 4 fps; the table prints seconds per clip
(median over repeats) and the ratio to decode. Target: flow + intensity <= 3x decode.
A second table compares the text-overlay filter the old way (readtext at full size) and the new
way (coarse detection canvas, filters.ocr_canvas) in CPU seconds, with both decisions; target:
OCR <= 5x decode. Then clips per CPU-hour of the per-clip stages with either OCR.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from motioncharacter.components.prepare import filters
from motioncharacter.components.prepare.captions import OfflineCaptioner
from motioncharacter.components.prepare.flow import DISFlow, measure
from motioncharacter.components.prepare.settings import FilterSettings
from motioncharacter.components.prepare.stage import _evenly
from motioncharacter.video import open_video, probe, read_frames, sample_indices

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips"


def timed(fn, repeat):
    out, ts = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return out, statistics.median(ts)


def bench_clip(path: Path, repeat: int, ocr: bool) -> dict[str, float]:
    vr = open_video(path)
    info = probe(vr)
    idx = sample_indices(info.num_frames, info.fps, 4.0, 16)

    def decode():
        return read_frames(open_video(path), idx)

    c0 = cpu_seconds()
    frames, t = timed(decode, repeat)
    row = {"decode": t, "cpu:decode": (cpu_seconds() - c0) / repeat}
    faces, row["faces (16 frames)"] = timed(lambda: [filters.detector().detect(f) for f in frames], repeat)
    _, row["quality (PIQE)"] = timed(lambda: filters.piqe_score(frames[len(frames) // 2]), repeat)
    est = DISFlow()
    _, row["flow + intensity"] = timed(lambda: measure(frames, est, 256), repeat)
    one = [f[0] if f else None for f in faces]
    if all(one):
        cap = OfflineCaptioner()
        _, row["caption (landmarks)"] = timed(lambda: cap(frames, one), repeat)
    row["cpu:other stages"] = (cpu_seconds() - c0) / repeat
    if ocr:
        row.update(compare_ocr(frames[_evenly(len(frames), 2)]))
    return row


def compare_ocr(frames: np.ndarray) -> dict:
    """The text filter on the stage's 2 OCR frames, the old way (EasyOCR readtext: detection at the
    frame's own size, then recognition) and the new way (check_text at the configured canvas),
    in CPU seconds (this machine is shared; wall time would measure the neighbours) and wall."""
    fs = FilterSettings()
    filters.ocr_reader()  # load once, outside the timing

    def old():  # the filter as it was: readtext at full size
        worst = min(1.0, filters.readtext_fraction(frames))
        return worst > fs.max_text_fraction, worst

    def new():
        reason, info = filters.check_text(frames, fs.max_text_fraction, fs.ocr_canvas, fs.ocr_recheck_factor)
        return reason is not None, info["text_area_fraction"]

    row = {}
    for name, fn in (("old", old), ("new", new)):
        c, t = cpu_seconds(), time.perf_counter()
        (drop, frac) = fn()
        row[f"OCR {name}"] = time.perf_counter() - t
        row[f"cpu:OCR {name}"] = cpu_seconds() - c
        row[f"ocr:{name}"] = (drop, frac)
    return row


def print_ocr_table(rows: dict[str, dict]) -> None:
    fs = FilterSettings()
    print(f"\ntext filter, 2 frames, CPU seconds per clip: old = readtext at full size, new = canvas {fs.ocr_canvas} px"
          f" (+ full-size recheck within {fs.ocr_recheck_factor}x of the threshold)")
    print(f"{'clip':<28}{'decode':>9}{'OCR old':>9}{'OCR new':>9}{'old/new':>9}{'old/dec':>9}{'new/dec':>9}"
          f"{'old drop, frac':>18}{'new drop, frac':>18}")
    for name, r in rows.items():
        d, o, n = r["cpu:decode"], r["cpu:OCR old"], r["cpu:OCR new"]
        (od, of), (nd, nf) = r["ocr:old"], r["ocr:new"]
        print(f"{name:<28}{d:>8.3f}s{o:>8.2f}s{n:>8.2f}s{o / n:>8.1f}x{o / d:>8.1f}x{n / d:>8.1f}x"
              f"{str(od):>10} {of:>7.4f}{str(nd):>10} {nf:>7.4f}" + ("" if od == nd else "   DIFFERENT"))
    for way in ("old", "new"):
        per_clip = [r["cpu:other stages"] + r[f"cpu:OCR {way}"] for r in rows.values()]
        print(f"whole stage with the {way} OCR (decode, faces, quality, flow, caption, OCR; every clip reaching OCR): "
              f"{3600 / np.mean(per_clip):,.0f} clips per CPU-hour")


# ---- the whole stage: clips per CPU-hour ----------------------------------------------------
PAPER_CLIPS = 106_292  # the paper's dataset (appendix A)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_stage(folder: Path, shards: int, ocr: bool) -> None:
    """``prepare`` end to end (decode, every filter, flow, captions, face pool, artifacts, then the
    merge) as ``shards`` shards in a row, each into the shared output: clips per CPU-hour, and
    what that makes of the paper's dataset in CPU-hours and in wall time on ``shards`` pods."""
    from motioncharacter.components.prepare.settings import PrepareConfig
    from motioncharacter.components.prepare.stage import merge_shards, prepare
    from motioncharacter.config import load

    from motioncharacter.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES

    cfg = load(PrepareConfig, "prepare.yaml", overrides=[] if ocr else ["filters.ocr=false"])
    media = Path(tempfile.mkdtemp(prefix="bench-media-"))  # clips and stills only: no README counted as a clip
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES:
            (media / f.name).symlink_to(f.resolve())
    out = Path(tempfile.mkdtemp(prefix="bench-stage-"))
    c0, t0 = cpu_seconds(), time.perf_counter()
    walls = []
    for i in range(shards):
        t = time.perf_counter()
        prepare(str(media), str(out), cfg, progress=False, shard=(i, shards))
        walls.append(time.perf_counter() - t)
    summary = merge_shards(str(out), shards, cfg, track=False)
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    n = summary["inputs"]
    rate = n / cpu * 3600
    print(f"\nwhole stage ({'with' if ocr else 'without'} OCR), {shards} shard(s) then the merge, on {folder}:")
    print(f"  {n} inputs ({summary['kept']} kept) in {wall:.1f} s wall, {cpu:.1f} CPU-s "
          f"(shards {', '.join(f'{w:.1f}' for w in walls)} s)")
    print(f"  {rate:,.0f} clips per CPU-hour; the paper's {PAPER_CLIPS:,} clips: {PAPER_CLIPS / rate:,.1f} CPU-hours, "
          f"{PAPER_CLIPS / rate / shards:,.1f} h wall on {shards} one-core pods")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="?", default=str(SHARED))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-ocr", action="store_true")
    ap.add_argument("--stage-shards", type=int, default=0, metavar="N",
                    help="instead: time the whole stage as N shards + merge and print clips per CPU-hour")
    args = ap.parse_args()
    folder = Path(args.clips)
    if not folder.is_dir():
        from motioncharacter.fixtures import write_fixtures

        folder = write_fixtures(tempfile.mkdtemp(), velocities=(4, 16), bad_inputs=False)
        print(f"{args.clips} not found; using generated fixtures in {folder}")
    if args.stage_shards:
        bench_stage(folder, args.stage_shards, not args.no_ocr)
        return
    rows = {}
    for p in sorted(folder.glob("*.mp4")):
        rows[p.name] = bench_clip(p, args.repeat, not args.no_ocr)
    stages = list(dict.fromkeys(k for r in rows.values() for k in r if ":" not in k))
    print(f"\nseconds per clip (median of {args.repeat}), 16 frames at 4 fps; ratio = stage / decode")
    print(f"{'clip':<28}" + "".join(f"{s:>22}" for s in stages))
    for name, r in rows.items():
        cells = "".join(f"{r[s]:>11.3f}s {r[s] / r['decode']:>6.2f}x  " if s in r else f"{'-':>22}" for s in stages)
        print(f"{name:<28}{cells}")
    ratios = [r["flow + intensity"] / r["decode"] for r in rows.values()]
    print(f"\nflow + intensity / decode: median {np.median(ratios):.2f}x, max {max(ratios):.2f}x (target <= 3x)")
    if not args.no_ocr:
        print_ocr_table(rows)


if __name__ == "__main__":
    main()
