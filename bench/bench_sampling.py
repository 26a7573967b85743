"""Fewer sampling steps at the same output: the mini model (trained by `motioncharacter demo --learn`)
evaluated on the learn loop's held-out evaluation set with each sampler and step count, side by side.

    .venv/bin/python bench/bench_sampling.py [--weights outputs/learn/mini] [--configs ddim:25,dpm++:12,...]

For each configuration: intensity adherence (Spearman rho, MAE against the requested intensity),
PSNR of its videos against the baseline's (the first configuration, same seeds), seconds per video
(generation only) and the speed ratio against the baseline; all in one run. Needs outputs/learn (run `demo --learn`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = "ddim:25,dpm++:25,dpm++:12,dpm++:8,ddim:12"


def evaluate(weights: str, heldout: Path, out: Path, scheduler: str, steps: int) -> tuple[dict, float]:
    from motioncharacter.learn import _packaged, adherence, load_learn_config
    from motioncharacter.pipelines.steps import evaluate_step

    overrides = [_packaged(o) for o in load_learn_config().get("evaluate") or []]
    overrides += [f"generation.scheduler={scheduler}", f"generation.steps={steps}", "output.gifs=0"]
    summary = json.loads(evaluate_step(weights, str(heldout), str(out), 0, overrides, run_name=f"bench-{scheduler}-{steps}"))
    # generation time only: the metrics that follow cost the same for every sampler
    gen_s = sum(json.loads(x)["generation_s"] for x in (out / "results.jsonl").read_text().splitlines())
    return {**adherence(summary), "n": summary["scored"]}, gen_s / summary["scored"]


def timed(weights: str, heldout: Path, configs: list[tuple[str, int]], rounds: int = 3) -> dict:
    """Median seconds of one generation per configuration, interleaved round by round so that load
    from other processes hits every configuration alike (evaluation wall time does not show it)."""
    import statistics
    import time

    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.model.schedulers import use_scheduler

    pipe = load_pipeline(weights=weights)
    portrait = sorted(p for p in heldout.iterdir() if p.suffix in (".png", ".jpg"))[0]
    kw = dict(image=str(portrait), prompt="a person moving head", action="moving head", intensity=10.0,
              guidance=4.0, frames=8, height=pipe.defaults["height"], width=pipe.defaults["width"], seed=1)
    out: dict = {c: [] for c in configs}
    for _ in range(rounds + 1):  # the first round warms up
        for sched, steps in configs:
            use_scheduler(pipe, sched)
            t = time.perf_counter()
            generate(pipe, steps=steps, **kw)
            out[(sched, steps)].append(time.perf_counter() - t)
    return {c: statistics.median(v[1:]) for c, v in out.items()}


def videos(out: Path) -> dict[str, np.ndarray]:
    from motioncharacter.video import open_media

    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return {r["id"]: open_media(out / r["video"]).read(list(range(open_media(out / r["video"]).info.num_frames)))
            for r in rows}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=str(ROOT / "outputs" / "learn" / "mini"))
    ap.add_argument("--heldout", default=str(ROOT / "outputs" / "learn" / "fixtures" / "heldout"))
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="scheduler:steps,... (first = baseline)")
    ap.add_argument("--json", help="also write the table here")
    a = ap.parse_args()
    if not Path(a.weights, "motioncharacter.json").is_file() or not Path(a.heldout).is_dir():
        print(f"needs the mini model and its held-out set ({a.weights}, {a.heldout}): run `motioncharacter demo "
              "--learn` first", file=sys.stderr)
        return 1
    import os

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='mc-bench-')}/mlflow.db")
    work = Path(tempfile.mkdtemp(prefix="mc-sampling-"))
    configs = [(x.split(":")[0], int(x.split(":")[1])) for x in a.configs.split(",")]
    rows, base_videos = [], None
    for sched, steps in configs:
        out = work / f"{sched}-{steps}"
        r, _ = evaluate(a.weights, Path(a.heldout), out, sched, steps)
        vids = videos(out)
        base_videos = base_videos if base_videos is not None else vids
        p = [psnr(vids[k], base_videos[k]) for k in vids if k in base_videos]
        rows.append({"scheduler": sched, "steps": steps, **r, "psnr_vs_baseline": round(float(np.mean(p)), 2)})
        print(json.dumps(rows[-1]), flush=True)
    secs = timed(a.weights, Path(a.heldout), configs)
    for r in rows:
        r["s_per_video"] = round(secs[(r["scheduler"], r["steps"])], 3)
        r["speedup"] = round(secs[configs[0]] / secs[(r["scheduler"], r["steps"])], 2)
    print(f"\n{'sampler':<8}{'steps':>6}{'rho':>7}{'MAE':>7}{'PSNR dB':>9}{'s/video':>9}{'speedup':>9}")
    for r in rows:
        rho = f"{r['intensity_spearman']:.3f}" if r["intensity_spearman"] is not None else "n/a"
        print(f"{r['scheduler']:<8}{r['steps']:>6}{rho:>7}{r['intensity_mae']:>7.2f}{r['psnr_vs_baseline']:>9.2f}"
              f"{r['s_per_video']:>9.3f}{r['speedup']:>8.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
