"""``motioncharacter evaluate``: generate the eval set's videos, score them, aggregate, plot, log.

Writes into OUTPUT (a folder or s3:// prefix): ``videos/<item>.mp4``, ``results.jsonl`` (one
line per item with every metric or its absence reason), ``per_video.csv``, ``summary.json``
(aggregates + intensity adherence), ``calibration.png`` and ``contact_sheet.png``; the same
go to an MLflow run (metrics, a per-video table, GIFs).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from motioncharacter import storage

from . import metrics as M
from .evalset import build_items, list_portraits, load_prompt_bank
from ...model.acceleration import Acceleration
from .settings import EvalConfig

log = logging.getLogger(__name__)
TABLE1_ORDER = ["dover", "motion_smoothness", "dynamic_degree", "clip_i", "clip_t", "face_sim"]


def summarize(rows: list[dict]) -> dict:
    """Aggregate per-video metric dicts; add intensity adherence and action adherence."""
    scored = [r for r in rows if "metrics" in r]
    keys = list(dict.fromkeys(k for r in scored for k in r["metrics"]))
    agg = {k: M.aggregate([r["metrics"].get(k) for r in scored]) for k in keys}
    req = [r["intensity"] for r in scored]
    meas = [M.value(r["metrics"].get("intensity")) for r in scored]
    agg["intensity_spearman"] = M.spearman(req, meas)
    errs = [abs(m - q) for q, m in zip(req, meas) if m is not None]
    agg["intensity_mae"] = M.present(np.mean(errs)) if errs else M.absent("no intensity measured")
    if "action_top1" in agg:
        agg["action_accuracy"] = agg.pop("action_top1")
    return {"videos": len(rows), "scored": len(scored), "skipped": len(rows) - len(scored), "metrics": agg}


def calibration_plot(rows: list[dict], path: Path, rho: dict | None = None) -> Path:
    """Requested vs measured intensity: every video, the mean per requested value, and y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["intensity"], M.value(r["metrics"].get("intensity"))) for r in rows if "metrics" in r]
    pts = [(q, m) for q, m in pts if m is not None]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 20], [0, 20], "k--", lw=1, label="ideal (measured = requested)")
    if pts:
        q, m = map(np.asarray, zip(*pts))
        ax.scatter(q, m, s=14, alpha=0.5, label="videos")
        levels = np.unique(q)
        ax.plot(levels, [m[q == lv].mean() for lv in levels], "o-", color="C3", label="mean per requested")
    title = "intensity adherence"
    if rho and rho.get("value") is not None:
        title += f" (Spearman rho = {rho['value']:.2f})"
    ax.set(xlabel="requested motion intensity", ylabel="measured intensity (eq. 5-7, DIS flow)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _flat(row: dict) -> dict:
    out = {k: row[k] for k in ("id", "prompt_id", "action", "intensity", "seed") if k in row}
    out["portrait"] = Path(row["portrait"]).name
    out["generation_s"] = row.get("generation_s")
    out["skipped"] = row.get("skipped", "")
    for k, v in row.get("metrics", {}).items():
        out[k] = v.get("value")
    return out


def _write_tables(rows: list[dict], stage: Path) -> list[dict]:
    flat = [_flat(r) for r in rows]
    cols = list(dict.fromkeys(k for f in flat for k in f))
    with open(stage / "results.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    with open(stage / "per_video.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        w.writerows(flat)
    return flat


def _model_fingerprint(weights: str | None, preset: str | None) -> str:
    """Names the model, and for a local folder also its files' sizes and times, so retrained
    weights written to the same folder are not mistaken for the evaluated ones."""
    if preset:
        return f"preset:{preset}"
    parts = [str(weights)]
    if weights and not storage.is_s3(weights) and Path(weights).is_dir():
        for f in sorted(Path(weights).rglob("*")):
            if f.is_file():
                st = f.stat()
                parts.append(f"{f.relative_to(weights)}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def _item_key(item, gen: dict, cfg: EvalConfig, model: str) -> str:
    from dataclasses import asdict

    blob = json.dumps([item.to_dict(), gen, asdict(cfg.metrics), model] +
                      ([cfg.generation.scheduler] if cfg.generation.scheduler else []) +
                      ([asdict(cfg.generation.acceleration)] if cfg.generation.acceleration != Acceleration() else []) +
                      ([cfg.generation.dtype] if cfg.generation.dtype != "auto" else []),
                      sort_keys=True, default=str)
    return f"{item.id}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def _finished(output: str) -> dict[str, dict]:
    """Per-item records an earlier (possibly killed) run left in ``output``, by key."""
    rec_uri = storage.join(output, "records")
    if not storage.is_s3(output) and not Path(rec_uri).is_dir():
        return {}
    try:
        uris = [u for u in storage.list_files(rec_uri) if u.endswith(".json")]
    except storage.StorageError:
        return {}
    return {Path(u).stem: json.loads(storage.read_bytes(u)) for u in uris}


def _frames_of(output: str, rel: str) -> np.ndarray:
    from motioncharacter.video import open_video, read_frames

    with storage.local_file(storage.join(output, rel)) as p:
        vr = open_video(p)
        return read_frames(vr, list(range(len(vr))))


def evaluate(eval_set: str, output: str, cfg: EvalConfig, *, weights: str | None = None, preset: str | None = None,
             device: str = "cpu", limit: int | None = None, track: bool = True, progress: bool = True,
             run_name: str | None = None) -> dict:
    from tqdm import tqdm

    from motioncharacter.faces import FaceError
    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.model.precision import running
    from motioncharacter.video import contact_sheet, load_image, write_video

    from .score import Scorer

    if preset == "mini":  # a trained folder: fingerprint its files like any other weights
        from motioncharacter.model.presets import mini_weights

        weights, preset = mini_weights(), None
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    weights, version, assembled = _registered(weights, track)
    portraits = list_portraits(eval_set)
    bank_version, bank = load_prompt_bank(cfg.evalset.prompt_bank)
    items = build_items(portraits, bank, cfg.evalset, limit)
    m = cfg.metrics
    pipe = load_pipeline(weights=weights, preset=preset, device=device, arcface_pack=m.arcface_pack or None,
                         scheduler=cfg.generation.scheduler or None, acceleration=cfg.generation.acceleration,
                         dtype=cfg.generation.dtype)
    scorer = Scorer(m, flow_short_side=m.flow_short_side)
    g = cfg.generation
    gen = dict(frames=g.frames, steps=g.steps or pipe.defaults["steps"], height=g.height or pipe.defaults["height"],
               width=g.width or pipe.defaults["width"], guidance=g.guidance, id_scale=g.id_scale,
               motion_scale=g.motion_scale, negative_prompt=g.negative_prompt)
    face_index = None if cfg.evalset.face_index < 0 else cfg.evalset.face_index

    local_out = not storage.is_s3(output)
    stage = Path(output) if local_out else Path(tempfile.mkdtemp(prefix="mc-eval-", dir=storage.cache_dir()))
    (stage / "videos").mkdir(parents=True, exist_ok=True)
    (stage / "records").mkdir(parents=True, exist_ok=True)
    done, model_id = _finished(output), _model_fingerprint(weights, preset)
    refs: dict[str, np.ndarray] = {}
    rows, sheet_rows, sheet_labels, gifs = [], [], [], []
    resumed = 0
    for item in tqdm(items, desc="evaluate", unit="video", disable=not progress):
        key = _item_key(item, gen, cfg, model_id)
        if item.portrait not in refs:
            with storage.local_file(item.portrait) as p:
                refs[item.portrait] = load_image(p)
        ref = refs[item.portrait]
        if key in done:  # finished by an earlier run with the same model and settings
            row, resumed = done[key], resumed + 1
            rows.append(row)
            if "video" in row and (len(gifs) < cfg.output.gifs or len(sheet_rows) < cfg.output.contact_rows):
                frames = _frames_of(output, row["video"])
                _pictures(item, row, ref, frames, stage, cfg, g.fps, gifs, sheet_rows, sheet_labels, write_video)
            continue
        row = item.to_dict()
        rows.append(row)
        t = time.perf_counter()
        try:
            frames = generate(pipe, image=ref, prompt=item.prompt, action=item.action, intensity=item.intensity,
                              seed=item.seed, face_index=face_index, **gen)
        except FaceError as e:  # e.g. Unsplash-50 entry 39, a group photo
            row["skipped"] = str(e)
            log.warning("skipping %s: %s", item.id, e)
            _save_record(stage, output, key, row, local_out)
            continue
        row["generation_s"] = time.perf_counter() - t
        video = write_video(frames, stage / "videos" / f"{item.id}.mp4", fps=g.fps)
        row["video"] = video.relative_to(stage).as_posix()
        t = time.perf_counter()
        row["metrics"] = scorer.score(frames, reference=ref, prompt=item.prompt, action=item.action,
                                      action_bank=cfg.evalset.actions, face_index=face_index)
        row["metrics_s"] = time.perf_counter() - t
        _save_record(stage, output, key, row, local_out)
        _pictures(item, row, ref, frames, stage, cfg, g.fps, gifs, sheet_rows, sheet_labels, write_video)

    summary = summarize(rows)
    summary.update(resumed=resumed, eval_set=eval_set, prompt_bank_version=bank_version, items=len(items),
                   face_metric=scorer.face_key, generation=gen, dtype=running(pipe),
                   model=weights or f"preset:{preset}")
    flat = _write_tables(rows, stage)
    calibration_plot(rows, stage / "calibration.png", summary["metrics"].get("intensity_spearman"))
    if sheet_rows:
        contact_sheet(sheet_rows, sheet_labels).save(stage / "contact_sheet.png")
    if version:
        summary["registered_model"] = version
    if track:
        summary["mlflow_run_id"] = _log_run(cfg, summary, flat, stage, gifs, run_name, weights, preset, limit)
        if version:  # the version now names the run that scored it, and the run the version
            from motioncharacter import registry

            registry.link_evaluation(version["name"], version["version"], summary["mlflow_run_id"],
                                     summary["metrics"], weights=None if assembled else weights)
    (stage / "summary.json").write_text(json.dumps(summary, indent=1))
    if not local_out:
        storage.upload_dir(stage, output)
    summary["output"] = output
    return summary


def _registered(weights: str | None, track: bool) -> tuple[str | None, dict | None, bool]:
    """(weights folder to load, the registered version it is, whether it was assembled here):
    a models:/ reference resolves through the registry; a folder holding a registered adapter
    (the pipeline's assembled weights) is that adapter's version."""
    from motioncharacter import registry

    if registry.is_reference(weights):
        v = registry.resolve(weights)
        path, assembled = registry.weights_for(v)
        log.info("%s is %s: weights %s", weights, v.uri, path)
        return path, {"name": v.name, "version": v.version, "uri": v.uri}, assembled
    marker = registry.registered_version_of(weights) if track else None
    if not marker:
        return weights, None, False
    try:  # the marker may come from another registry (a copied folder): link only to the same version
        v = registry.resolve(marker["uri"])
    except registry.RegistryError as e:
        v, why = None, str(e)
    if v is None or v.source != marker.get("source"):
        log.warning("%s names %s, which this registry does not hold (%s); the evaluation is not linked to it",
                    weights, marker["uri"], why if v is None else f"its source is {v.source}")
        return weights, None, False
    return weights, {"name": v.name, "version": v.version, "uri": v.uri}, False


def _save_record(stage: Path, output: str, key: str, row: dict, local_out: bool) -> None:
    """The item's video first, its record last (to ``output`` at once when remote): a killed run
    keeps every finished item."""
    rec = stage / "records" / f"{key}.json"
    rec.write_text(json.dumps(row, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    if not local_out:
        if "video" in row:
            storage.upload_file(stage / row["video"], storage.join(output, row["video"]))
        storage.upload_file(rec, storage.join(output, "records", rec.name))


def _pictures(item, row, ref, frames, stage, cfg, fps, gifs, sheet_rows, sheet_labels, write_video) -> None:
    """GIFs and contact-sheet rows for the first items."""
    if len(gifs) < cfg.output.gifs:
        gifs.append(write_video(frames, stage / "gifs" / f"{item.id}.gif", fps=fps))
    if len(sheet_rows) < cfg.output.contact_rows:
        step = max(1, len(frames) // 8)
        sheet_rows.append([ref, *frames[::step][:8]])
        mi = M.value(row["metrics"].get("intensity"))
        sheet_labels.append(f"{item.id}  requested {item.intensity:g}, measured "
                            f"{'n/a' if mi is None else f'{mi:.1f}'}")


def _log_run(cfg, summary, flat, stage: Path, gifs, run_name, weights, preset, limit) -> str:
    import dataclasses

    import mlflow

    from motioncharacter import tracking

    name = run_name or f"eval-{Path(str(weights).rstrip('/')).name if weights else preset}"
    with tracking.run(cfg.experiment, run_name=name, tags={"stage": "evaluate"}) as run:
        tracking.log_params({"config": dataclasses.asdict(cfg), "model": summary["model"],
                             "eval_set": summary["eval_set"], "limit": limit,
                             "prompt_bank_version": summary["prompt_bank_version"],
                             "generation": summary["generation"]})
        agg = summary["metrics"]
        mlflow.log_metrics({k: v["value"] for k, v in agg.items() if v.get("value") is not None})
        mlflow.log_metrics({"videos": summary["videos"], "scored": summary["scored"], "skipped": summary["skipped"]})
        # absent metrics keep their reason next to the run, so compare can show why
        mlflow.set_tags({f"absent.{k}": v["reason"][:4000] for k, v in agg.items() if v.get("value") is None})
        mlflow.set_tag("face_metric", summary["face_metric"])
        if flat:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(flat), artifact_file="per_video.json")
        for f in ("results.jsonl", "per_video.csv", "calibration.png", "contact_sheet.png"):
            if (stage / f).exists():
                mlflow.log_artifact(str(stage / f))
        mlflow.log_text(json.dumps(summary, indent=1), "summary.json")
        for gif in gifs:
            mlflow.log_artifact(str(gif), "gifs")
        return run.info.run_id
