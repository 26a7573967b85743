"""Per-clip cost of each data-preparation stage against decoding the same frames, side by side.

    .venv/bin/python bench/bench_prepare.py [CLIP_DIR] [--repeat 3]

Defaults to ../shared/data/clips (falls back to the generated fixtures when absent).
Every stage runs on the same 16 frames sampled at 4 fps; the table prints seconds per clip
(median over repeats) and the ratio to decode. Target: flow + intensity <= 3x decode.
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

    frames, t = timed(decode, repeat)
    row = {"decode": t}
    faces, row["faces (16 frames)"] = timed(lambda: [filters.detector().detect(f) for f in frames], repeat)
    _, row["quality (PIQE)"] = timed(lambda: filters.piqe_score(frames[len(frames) // 2]), repeat)
    est = DISFlow()
    _, row["flow + intensity"] = timed(lambda: measure(frames, est, 256), repeat)
    one = [f[0] if f else None for f in faces]
    if all(one):
        cap = OfflineCaptioner()
        _, row["caption (landmarks)"] = timed(lambda: cap(frames, one), repeat)
    if ocr:
        filters.ocr_reader()  # load once, outside the timing
        _, row["OCR (2 frames)"] = timed(lambda: filters.check_text(frames[[0, len(frames) // 2]], 0.01), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="?", default=str(SHARED))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-ocr", action="store_true")
    args = ap.parse_args()
    folder = Path(args.clips)
    if not folder.is_dir():
        from motioncharacter.fixtures import write_fixtures

        folder = write_fixtures(tempfile.mkdtemp(), velocities=(4, 16), bad_inputs=False)
        print(f"{args.clips} not found; using generated fixtures in {folder}")
    rows = {}
    for p in sorted(folder.glob("*.mp4")):
        rows[p.name] = bench_clip(p, args.repeat, not args.no_ocr)
    stages = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"\nseconds per clip (median of {args.repeat}), 16 frames at 4 fps; ratio = stage / decode")
    print(f"{'clip':<28}" + "".join(f"{s:>22}" for s in stages))
    for name, r in rows.items():
        cells = "".join(f"{r[s]:>11.3f}s {r[s] / r['decode']:>6.2f}x  " if s in r else f"{'-':>22}" for s in stages)
        print(f"{name:<28}{cells}")
    ratios = [r["flow + intensity"] / r["decode"] for r in rows.values()]
    print(f"\nflow + intensity / decode: median {np.median(ratios):.2f}x, max {max(ratios):.2f}x (target <= 3x)")


if __name__ == "__main__":
    main()
