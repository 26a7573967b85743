"""``motioncharacter demo --learn``: prove, on this CPU, that the model learns what the paper claims.

The whole loop at small scale, through the project's own stages:

1. learning fixtures: package-shipped faces moving at programmed speeds over 0..20, several
   identities, directions and backgrounds (plus ../shared/data/clips when present), and
   held-out portraits of identities that training never sees;
2. ``data prepare`` (intensity from eq. 5-7, region masks from eq. 9);
3. ``train-base``: the ``mini`` base (VAE, UNet + motion modules) trained from scratch;
4. ``train`` (DeepSpeed, region-aware loss) of the MotionCharacter adapter on that frozen base,
   once per variant (``full``, ``no_motion_control``);
5. ``evaluate`` on the held-out portraits: ``full``, ``no_motion_control`` and ``full`` generated
   with ``--motion-scale 0``;
6. ``learn_report.json`` (intensity Spearman / MAE per variant, identity retrieval), the
   evaluations under ``eval/<variant>/`` and ``intensity_grid.gif``.

Settings: the packaged ``configs/learn.yaml`` (``--config`` to use another).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import yaml

from . import storage
from .config import PACKAGED_CONFIGS

log = logging.getLogger("motioncharacter.learn")
GRID_INTENSITIES = (0, 5, 10, 15, 20)


def load_learn_config(path: str | None = None) -> dict:
    cfg = yaml.safe_load((PACKAGED_CONFIGS / "learn.yaml").read_text())
    if path:
        cfg.update(yaml.safe_load(storage.read_bytes(path)) or {})
    return cfg


def _say(msg: str) -> None:
    print(f"[learn] {msg}", flush=True)


def _real_clips(dest: Path) -> int:
    """Link ../shared/data/clips (real footage, read in place, never committed) beside the fixtures."""
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "clips"
    n = 0
    if src.is_dir():
        for p in sorted(src.glob("*.mp4")):
            link = dest / f"real_{p.name}"
            if not link.exists():
                link.symlink_to(p)
            n += 1
    return n


def run_learn(output: str | Path, work_uri: str | None = None, cfg: dict | None = None,
              progress: bool = True) -> dict:
    """Run the whole learn loop; returns the report (also written to OUTPUT/learn_report.json).

    ``output`` is a local folder (report, evaluations, grid); ``work_uri`` (default
    OUTPUT/work) is where the stages exchange data: a folder or an s3:// prefix."""
    from motioncharacter.components.train.base import BaseSettings, train_base
    from motioncharacter.fixtures import write_learn_fixtures
    from motioncharacter.pipelines.steps import evaluate_step, prepare_step, train_step

    cfg = cfg or load_learn_config()
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # stages resume from what they find in the work area, so it is keyed by the settings: a re-run
    # with the same settings continues, changed settings start afresh
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    work = storage.join(work_uri or str(out / "work"), key)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round((time.perf_counter() - since) / 60, 2)
        _say(f"{name}: {timings[name]:.1f} min")
        return time.perf_counter()

    t = time.perf_counter()
    fx = cfg.get("fixtures") or {}
    dirs = write_learn_fixtures(out / "fixtures", clips_per_identity=int(fx.get("clips_per_identity", 12)))
    n_real = _real_clips(dirs["clips"]) if fx.get("real_clips", True) else 0
    _say(f"fixtures in {dirs['clips']} ({n_real} real clips from ../shared/data linked); "
         f"held-out portraits in {dirs['heldout']}")
    manifest = prepare_step(str(dirs["clips"]), storage.join(work, "prepared"), list(cfg.get("prepare") or []))
    t = lap("prepare", t)

    base_uri = storage.join(work, "mini")
    if storage.exists(storage.join(base_uri, "motioncharacter.json")):
        _say(f"mini base already trained at {base_uri}; reusing it")
        base_info = json.loads(storage.read_bytes(storage.join(base_uri, "motioncharacter.json")))["training"]
    else:
        _say("training the mini base from scratch (VAE, then UNet + motion modules)")
        base_info = train_base(manifest, base_uri, BaseSettings(**(cfg.get("base") or {})), progress=progress)
    t = lap("train_base", t)

    weights = {}
    for variant in cfg.get("variants") or ["full", "no_motion_control"]:
        _say(f"training the adapter on the frozen mini base: {variant}")
        weights[variant] = train_step(manifest, storage.join(work, "runs", variant), "", base_uri,
                                      int(cfg.get("adapter_steps", 400)), variant, list(cfg.get("train") or []))
        t = lap(f"train_{variant}", t)

    overrides = [_packaged(o) for o in cfg.get("evaluate") or []]
    runs = {v: (w, []) for v, w in weights.items()}
    if "full" in weights:
        runs["motion_scale_0"] = (weights["full"], ["generation.motion_scale=0"])
    report: dict = {}
    for name, (w, extra) in runs.items():
        _say(f"evaluating {name} on the held-out portraits")
        summary = json.loads(evaluate_step(w, str(dirs["heldout"]), str(out / "eval" / name), 0, overrides + extra,
                                           run_name=f"learn-{name}"))
        report[name] = adherence(summary)
        report[name]["identity"] = identity_retrieval(out / "eval" / name, dirs["heldout"])
        t = lap(f"evaluate_{name}", t)

    if "full" in weights:  # the mini preset: the base + the full variant's adapter, where --preset mini looks
        mini = out / "mini"
        if mini.exists():
            shutil.rmtree(mini)
        storage.download_dir(weights["full"], mini) if storage.is_s3(weights["full"]) else \
            shutil.copytree(weights["full"], mini)
        _say(f"mini preset: {mini} (--preset mini finds it from the working directory, or set "
             f"MOTIONCHARACTER_MINI)")
        grid = intensity_grid(weights["full"], sorted(dirs["heldout"].glob("*.png"))[0], out / "intensity_grid.gif",
                              overrides)
        _say(f"intensity grid: {grid}")
    report = {"minutes": round((time.perf_counter() - t0) / 60, 2), **report,
              "base": {k: base_info.get(k) for k in ("vae_psnr_db", "final_unet_loss", "clips", "minutes")},
              "stages_minutes": timings, "weights": weights,
              "recipe": "frozen base: the mini base is trained first, then only the adapter trains"}
    (out / "learn_report.json").write_text(json.dumps(report, indent=1))
    _say(f"report: {out / 'learn_report.json'}")
    return report


def _packaged(override: str) -> str:
    """``evalset.prompt_bank=NAME`` may name a packaged config file."""
    key, _, val = override.partition("=")
    if key == "evalset.prompt_bank" and val and not Path(val).exists() and (PACKAGED_CONFIGS / val).exists():
        return f"{key}={PACKAGED_CONFIGS / val}"
    return override


def adherence(summary: dict) -> dict:
    m = summary["metrics"]
    return {"intensity_spearman": m["intensity_spearman"].get("value"),
            "intensity_mae": m["intensity_mae"].get("value"), "n": summary["scored"]}


def identity_retrieval(eval_dir: Path, heldout: Path) -> dict:
    """For every generated video: is it closer to its own held-out reference than to every other
    held-out reference? Pixel-space similarity (cosine of mean-centred 32x32 face crops, averaged
    over frames); a stand-in for a face-recognition metric, which a 64-px face cannot feed."""
    import cv2

    from motioncharacter.video import load_image, open_video, read_frames

    def feat(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        s = min(h, w)
        c = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        c = c[s // 4: 3 * s // 4, s // 4: 3 * s // 4]  # the central half, where the face is
        v = cv2.resize(c, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        v -= v.mean()
        return v / (np.linalg.norm(v) + 1e-8)

    refs = {p.stem: feat(load_image(p)) for p in sorted(heldout.glob("*.png"))}
    hits = total = 0
    for line in (eval_dir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "video" not in row:
            continue
        vr = open_video(eval_dir / row["video"])
        frames = read_frames(vr, list(range(len(vr))))
        v = np.mean([feat(f) for f in frames], 0)
        sims = {k: float(v @ r) for k, r in refs.items()}
        hits += max(sims, key=sims.get) == Path(row["portrait"]).stem
        total += 1
    return {"retrieval_accuracy": hits / total if total else None, "n": total, "chance": 1 / max(1, len(refs)),
            "metric": "pixel-space cosine of central crops (stand-in; not a face-recognition model)"}


def intensity_grid(weights: str, portrait: Path, path: Path, overrides: list[str]) -> Path:
    """One held-out face at intensities 0, 5, 10, 15, 20, side by side, as an animated GIF."""
    from motioncharacter.components.evaluate.settings import EvalConfig
    from motioncharacter.config import load
    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.video import load_image, write_video

    from motioncharacter.components.evaluate.evalset import load_prompt_bank

    ecfg = load(EvalConfig, "evaluate.yaml", overrides=overrides)
    g = ecfg.generation
    prompt = load_prompt_bank(ecfg.evalset.prompt_bank)[1][0]
    action = (ecfg.evalset.actions or [""])[0]
    pipe = load_pipeline(weights=weights)
    d = pipe.defaults
    videos = [generate(pipe, image=str(portrait), prompt=prompt, action=action, intensity=float(i), seed=0,
                       guidance=g.guidance, frames=g.frames or d["frames"], steps=g.steps or d["steps"],
                       height=d["height"], width=d["width"], negative_prompt=g.negative_prompt)
              for i in GRID_INTENSITIES]
    import cv2

    scale = 2
    tiles = []
    for i, v in zip(GRID_INTENSITIES, videos):
        big = np.stack([cv2.resize(f, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) for f in v])
        for f in big:
            cv2.putText(f, f"M={i}", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(big)
    grid = np.concatenate(tiles, axis=2)
    from motioncharacter.video import contact_sheet

    # the same videos as a still: one row per intensity (reference | frames), for the README
    ref = load_image(portrait)
    contact_sheet([[ref, *v] for v in videos], [f"intensity {i}" for i in GRID_INTENSITIES],
                  cell=96).save(path.with_suffix(".png"))
    return write_video(grid, path, fps=4.0)
