"""Faster sampling at the same output: the mini model (trained by `motioncharacter demo --learn`)
evaluated on the learn loop's held-out evaluation set with each sampler, step count and speed option
(model/acceleration.py), side by side.

    .venv/bin/python bench/bench_sampling.py [--weights outputs/learn/mini] [--configs ddim:25,dpm++:12,...]
    .venv/bin/python bench/bench_sampling.py --configs ddim:25,ddim:25:cache_interval=2,ddim:25:action_tokens=eot

A configuration is SAMPLER:STEPS[:OPTION=VALUE+OPTION=VALUE...] (caching off unless named). For each: intensity adherence
(Spearman rho, MAE against the requested intensity), motion smoothness, face similarity, PSNR of its
videos against the baseline's (the first configuration, same seeds), seconds per video (generation
only) and the speed ratio against the baseline; all in one run. Needs outputs/learn (run `demo --learn`).
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


def parse_config(text: str) -> tuple[str, int, dict]:
    sched, steps, *opts = text.split(":")
    acc = dict(kv.split("=", 1) for kv in opts[0].split("+")) if opts and opts[0] else {}
    return sched, int(steps), acc


def label(config: tuple[str, int, dict]) -> str:
    sched, steps, acc = config
    return ":".join([sched, str(steps)] + (["+".join(f"{k}={v}" for k, v in acc.items())] if acc else []))


def evaluate(weights: str, heldout: Path, out: Path, scheduler: str, steps: int, acc: dict) -> tuple[dict, float]:
    from motioncharacter.learn import _packaged, adherence, load_learn_config
    from motioncharacter.pipelines.steps import evaluate_step

    overrides = [_packaged(o) for o in load_learn_config().get("evaluate") or []]
    overrides += [f"generation.scheduler={scheduler}", f"generation.steps={steps}", "output.gifs=0"]
    overrides += [f"generation.acceleration.{k}={v}" for k, v in {"cache_interval": 1, **acc}.items()]
    summary = json.loads(evaluate_step(weights, str(heldout), str(out), 0, overrides,
                                       run_name=f"bench-{label((scheduler, steps, acc))}"))
    # generation time only: the metrics that follow cost the same for every sampler
    gen_s = sum(json.loads(x)["generation_s"] for x in (out / "results.jsonl").read_text().splitlines())
    m = summary["metrics"]
    extra = {k: m[k].get("value") for k in ("motion_smoothness_flowinterp", "face_sim_sface") if k in m}
    return {**adherence(summary), **extra, "n": summary["scored"]}, gen_s / summary["scored"]


def timed(weights: str, heldout: Path, configs: list[tuple[str, int, dict]], rounds: int = 3) -> dict:
    """Median seconds of one generation per configuration, interleaved round by round so that load
    from other processes hits every configuration alike (evaluation wall time does not show it)."""
    import statistics
    import time

    from motioncharacter.model.acceleration import Acceleration
    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.model.schedulers import use_scheduler

    pipe = load_pipeline(weights=weights)
    portrait = sorted(p for p in heldout.iterdir() if p.suffix in (".png", ".jpg"))[0]
    kw = dict(image=str(portrait), prompt="a person moving head", action="moving head", intensity=10.0,
              guidance=4.0, frames=8, height=pipe.defaults["height"], width=pipe.defaults["width"], seed=1)
    out: dict = {label(c): [] for c in configs}
    for _ in range(rounds + 1):  # the first round warms up
        for sched, steps, acc in configs:
            use_scheduler(pipe, sched)
            pipe.acceleration = Acceleration.from_params({"cache_interval": 1, **acc})  # per-step options only
            t = time.perf_counter()
            generate(pipe, steps=steps, **kw)
            out[label((sched, steps, acc))].append(time.perf_counter() - t)
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
    configs = [parse_config(x) for x in a.configs.split(",")]
    rows, base_videos = [], None
    for sched, steps, acc in configs:
        name = label((sched, steps, acc))
        out = work / name.replace(":", "_").replace("+", "_")
        r, _ = evaluate(a.weights, Path(a.heldout), out, sched, steps, acc)
        vids = videos(out)
        base_videos = base_videos if base_videos is not None else vids
        p = [psnr(vids[k], base_videos[k]) for k in vids if k in base_videos]
        rows.append({"config": name, **r, "psnr_vs_baseline": round(float(np.mean(p)), 2)})
        print(json.dumps(rows[-1]), flush=True)
    secs = timed(a.weights, Path(a.heldout), configs)
    for r in rows:
        r["s_per_video"] = round(secs[r["config"]], 3)
        r["speedup"] = round(secs[label(configs[0])] / secs[r["config"]], 2)
    w = max(len(r["config"]) for r in rows) + 2
    print(f"\n{'configuration':<{w}}{'rho':>7}{'MAE':>7}{'smooth':>8}{'face':>7}{'PSNR dB':>9}{'s/video':>9}"
          f"{'speedup':>9}")
    for r in rows:
        rho = f"{r['intensity_spearman']:.3f}" if r["intensity_spearman"] is not None else "n/a"
        sm, fc = r.get("motion_smoothness_flowinterp"), r.get("face_sim_sface")
        print(f"{r['config']:<{w}}{rho:>7}{r['intensity_mae']:>7.2f}{sm if sm is None else round(sm, 4)!s:>8}"
              f"{fc if fc is None else round(fc, 3)!s:>7}{r['psnr_vs_baseline']:>9.2f}{r['s_per_video']:>9.3f}"
              f"{r['speedup']:>8.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
