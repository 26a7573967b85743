"""The data-preparation stage: inputs (folder or s3:// prefix) -> OUT/manifest.jsonl + per-clip artifacts.

Work happens in a local staging folder (OUT itself when it is local). Each input's
artifacts are written first and its record (records/<key>.json) last, then both are
copied to OUT when OUT is s3://: a crash never leaves a record without its artifacts,
and a re-run skips every input whose record exists (key = content hash + settings hash).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from motioncharacter import storage
from motioncharacter.config import to_dict
from motioncharacter.faults import TransientError, is_transient
from motioncharacter.faces import crop
from motioncharacter.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoError, is_animated, load_image, open_media

from . import filters
from .captions import Caption, make_captioner
from .flow import REFERENCE_SHORT_SIDE, make_estimator, measure
from .resample import balance_weights, cap, histogram_png
from .settings import PrepareConfig

log = logging.getLogger(__name__)
SCHEMA_VERSION = 3  # 2: tracked face filter, animated inputs and VFR video sampled by time; 3: landmarks
TRANSIENT_TRIES = 3        # per input, for failures of a service rather than of the input
TRANSIENT_BACKOFF_S = 2.0  # doubled after each try


def settings_hash(cfg: PrepareConfig) -> str:
    d = to_dict(cfg)
    d.pop("experiment", None)
    return hashlib.sha256(json.dumps([SCHEMA_VERSION, d], sort_keys=True).encode()).hexdigest()[:8]


def content_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


class PrepareIncomplete(TransientError):
    """Some inputs failed for a transient reason through every retry. Everything else is saved;
    a re-run (or the pipeline step's retry) resumes and tries only those again."""

    def __init__(self, summary: dict):
        n = summary["dropped_by_reason"]["transient"]
        super().__init__(f"prepare {summary['output']}: {n} input(s) failed for a transient reason (a service "
                         "down or timing out, see the log); the other results are saved: re-run to retry them")
        self.summary = summary


class Dropped(Exception):
    def __init__(self, reasons: list[str], info: dict | None = None):
        super().__init__("; ".join(reasons))
        self.reasons, self.info = reasons, info or {}


@dataclass
class Tools:
    """Models loaded once per run."""
    cfg: PrepareConfig

    def __post_init__(self):
        f = self.cfg.flow
        self.estimator = make_estimator(f.estimator, f.raft_weights or None)
        self.captioner = make_captioner(self.cfg.caption.captioner, self.cfg.caption.url, self.cfg.caption.model)
        self.clip_iqa = filters.ClipIQA(self.cfg.filters.clip_iqa_weights) if self.cfg.filters.clip_iqa_weights else None


def _evenly(n: int, k: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def _check_frames(frames: np.ndarray, cfg: PrepareConfig, tools: Tools, info: dict, reasons: list[str]) -> list:
    """Faces, quality and text-overlay filters on sampled frames, after the ``reasons`` found
    so far (all cheap checks run, for a full account); returns the kept person's face in each
    frame, None where the tracker did not find it (see ``_detected``)."""
    fc = cfg.filters
    reason, faces, face_info = filters.check_faces(frames, fc.min_face_confidence, fc.face_min_presence,
                                                   fc.face_min_size)
    info.update(face_info)
    if reason:
        reasons.append(reason)
    reason, q = filters.check_quality(frames[len(frames) // 2], fc.max_piqe, tools.clip_iqa, fc.min_clip_iqa)
    info.update(q)
    if reason:
        reasons.append(reason)
    if fc.ocr and not reasons:  # OCR is the expensive one: skip it for clips already dropped
        reason, t = filters.check_text(frames[_evenly(len(frames), fc.ocr_frames)], fc.max_text_fraction,
                                       fc.ocr_canvas, fc.ocr_recheck_factor)
        info.update(t)
        if reason:
            reasons.append(reason)
    if reasons:
        raise Dropped(reasons, info)
    return faces


def _detected(faces: list) -> list[int]:
    """Frames where the kept face was detected. Landmarks and face crops come only from these:
    a box carried over from another frame would put them on whatever is there now."""
    return [i for i, f in enumerate(faces) if f is not None]


def _analyse_video(path: Path, cfg: PrepareConfig, tools: Tools, info: dict, sidecar: dict | None = None):
    s = cfg.sampling
    try:
        media = open_media(path)
    except VideoError as e:
        raise Dropped([f"unreadable: {e}"]) from None
    vi = media.info
    info.update(width=vi.width, height=vi.height, source_fps=round(vi.fps, 3), source_frames=vi.num_frames)
    reasons = []
    r = filters.check_resolution(vi.width, vi.height, cfg.filters.min_short_side)
    if r:
        reasons.append(r)
    idx = media.timeline.sample(s.fps, s.num_frames)
    if len(idx) < s.min_frames:
        reasons.append(f"too_short: {len(idx)} frames at {s.fps} fps (< {s.min_frames}); "
                       f"{media.timeline.duration:.1f} s long")
    if not idx:
        raise Dropped(reasons, info)
    try:
        frames = media.read(idx)
    except VideoError as e:
        raise Dropped(reasons + [f"unreadable: {path.name}: {e}"], info) from None
    faces = _check_frames(frames, cfg, tools, info, reasons)
    m_raw, _, masks = measure(frames, tools.estimator, cfg.flow.short_side, cfg.flow.mask_normalize)
    seen = _detected(faces)
    caption = sidecar_caption(sidecar) if sidecar else tools.captioner(frames[seen], [faces[i] for i in seen])
    return frames, faces, m_raw, masks, caption, False


def _analyse_image(path: Path, cfg: PrepareConfig, tools: Tools, info: dict):
    try:
        img = load_image(path)
    except (ValueError, FileNotFoundError) as e:
        raise Dropped([f"unreadable: {e}"]) from None
    h, w = img.shape[:2]
    info.update(width=w, height=h)
    r = filters.check_resolution(w, h, cfg.filters.min_short_side)
    faces = _check_frames(img[None], cfg, tools, info, [r] if r else [])
    n = cfg.sampling.num_frames
    short = cfg.flow.short_side
    mh, mw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    masks = np.ones((n, mh, mw), np.float32)  # a static clip: no motion anywhere, eq. 9 gives 1.0
    caption = Caption(caption="A close-up portrait photo of a person, keeping still and looking ahead.",
                      action="", source="still")
    return img[None], faces, 0.0, masks, caption, True


def _save_artifacts(stage_dir: Path, clip_id: str, frames, faces, masks, cfg: PrepareConfig, key: str) -> dict:
    """Frames as JPEG, masks as float16 npz, face pool crops; returns manifest paths (relative)."""
    o = cfg.output
    base = Path("clips") / clip_id
    d = stage_dir / base
    (d / "frames").mkdir(parents=True, exist_ok=True)
    (d / "faces").mkdir(parents=True, exist_ok=True)
    enc = [int(cv2.IMWRITE_JPEG_QUALITY), o.frame_quality]
    frame_paths = []
    for i, f in enumerate(frames):
        p = base / "frames" / f"{i:03d}.jpg"
        cv2.imwrite(str(stage_dir / p), cv2.cvtColor(f, cv2.COLOR_RGB2BGR), enc)
        frame_paths.append(p.as_posix())
    if len(frames) == 1:  # a still becomes a static clip of num_frames identical frames
        frame_paths = frame_paths * cfg.sampling.num_frames
    np.savez_compressed(d / "masks.npz", masks=masks.astype(np.float16))
    rng = np.random.default_rng(int(key[:8], 16) ^ o.seed)
    seen = _detected(faces)
    picks = sorted(rng.choice(seen, size=min(o.face_pool, len(seen)), replace=False).tolist())
    face_paths = []
    for i in picks:
        p = base / "faces" / f"{i:03d}.jpg"
        cv2.imwrite(str(stage_dir / p), cv2.cvtColor(crop(frames[i], faces[i], size=o.face_size), cv2.COLOR_RGB2BGR), enc)
        face_paths.append(p.as_posix())
    # the kept face's 5 landmarks per frame (pixels of the saved frame; None where it was not
    # detected): the ID loss aligns decoded frames to the ArcFace template with them
    landmarks = [None if f is None else np.round(f.landmarks.astype(np.float64), 2).tolist() for f in faces]
    if len(frames) == 1:
        landmarks = landmarks * cfg.sampling.num_frames
    return {"frames": frame_paths, "masks": (base / "masks.npz").as_posix(), "faces": face_paths,
            "landmarks": landmarks}


def sidecar_caption(sidecar: dict) -> Caption:
    return Caption(caption=str(sidecar.get("caption") or ""), action=str(sidecar.get("action") or ""),
                   source="sidecar")


def read_sidecar(uri: str) -> dict | None:
    """``caption.captioner=sidecar``: the JSON beside an input (``clip.mp4`` -> ``clip.json``) with
    its ``caption``, ``action`` and optionally ``person`` (kept in the record, so training can
    find other photos of the same person); None when there is none."""
    side = uri[: -len(Path(uri).suffix)] + ".json" if Path(uri).suffix else uri + ".json"
    if side == uri or not storage.exists(side):
        return None
    try:
        data = json.loads(storage.read_bytes(side))
    except json.JSONDecodeError as e:
        raise ValueError(f"caption sidecar {side} is not JSON ({e.msg})") from None
    if not isinstance(data, dict) or not str(data.get("caption") or "").strip():
        raise ValueError(f"caption sidecar {side} must be a JSON object with a non-empty 'caption'")
    return data


def process_input(local: Path, name: str, key: str, cfg: PrepareConfig, tools: Tools, stage_dir: Path,
                  sidecar: dict | None = None) -> dict:
    """Analyse one input and write its artifacts; never raises for a bad input. ``sidecar``: its
    caption, action and person (``caption.captioner=sidecar``)."""
    rec = {"clip": name, "key": key, "kept": False, "reasons": [], "motion_intensity": None,
           "caption": None, "action": None}
    info: dict = {}
    suffix = local.suffix.lower()
    t0 = time.perf_counter()
    try:
        if suffix in VIDEO_SUFFIXES or is_animated(local):  # an animated WebP / PNG is a clip, not a still
            result = _analyse_video(local, cfg, tools, info, sidecar)
        elif suffix in IMAGE_SUFFIXES:
            result = _analyse_image(local, cfg, tools, info)
        else:
            raise Dropped([f"unreadable: {name} is not a video or image (suffix {suffix or 'none'!r})"])
        frames, faces, m_raw, masks, caption, still = result
        clip_id = f"{Path(name).stem[:40]}-{key[:8]}"
        paths = _save_artifacts(stage_dir, clip_id, frames, faces, masks, cfg, key)
        rec.update(kept=True, motion_intensity=round(cap(m_raw), 4), motion_intensity_raw=round(m_raw, 4),
                   caption=caption.caption, action=caption.action, caption_source=caption.source,
                   still=still, num_frames=len(paths["frames"]), fps=cfg.sampling.fps, **paths)
        if sidecar and sidecar.get("person"):
            rec["person"] = str(sidecar["person"])
        if caption.signals:
            info["facial_signals"] = {k: round(v, 4) for k, v in caption.signals.items()}
    except Dropped as d:
        rec["reasons"] = d.reasons
        info.update(d.info)
    except Exception as e:  # a bug or an unexpected decoder failure must not stop the batch
        if is_transient(e):  # a service down, not a bad input: the caller retries, nothing is final
            raise
        log.exception("unexpected failure on %s", name)
        rec["reasons"] = [f"error: {type(e).__name__}: {e}"]
    rec["info"] = info
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _existing_records(output: str) -> dict[str, dict]:
    """Records of inputs finished by earlier runs into the same output, by key."""
    records_uri = storage.join(output, "records")
    if not storage.is_s3(output) and not Path(records_uri).is_dir():
        return {}
    recs = {}
    for uri in storage.list_files(records_uri):
        if uri.endswith(".json"):
            r = json.loads(storage.read_bytes(uri))
            recs[r["key"]] = r
    return recs


def _contact_sheet(kept: list[dict], stage_dir: Path, path: Path, output_uri: str | None = None,
                   max_rows: int = 12) -> Path | None:
    """Face crop + 6 frames per kept clip. Artifacts of clips finished by an earlier run (another
    pod, a KFP retry: a fresh cache) are fetched from ``output_uri`` first."""
    from motioncharacter.video import contact_sheet

    def rgb(rel: str) -> np.ndarray:
        local = stage_dir / rel
        if not local.is_file() and output_uri:
            storage.download_file(storage.join(output_uri, rel), local)
        return cv2.cvtColor(cv2.imread(str(local)), cv2.COLOR_BGR2RGB)

    rows, labels = [], []
    for r in kept[:max_rows]:
        rows.append([rgb(r["faces"][0])] + [rgb(p) for p in r["frames"][:: max(1, len(r["frames"]) // 6)][:6]])
        labels.append(f"{r['clip']}  M={r['motion_intensity']:.1f}  action='{r['action']}'")
    if not rows:
        return None
    contact_sheet(rows, labels, cell=112).save(path)
    return path


def list_inputs(input_uri: str) -> list[str]:
    """The stage's inputs, sorted (hidden files left out): the listing every shard splits alike."""
    files = [u for u in storage.list_files(input_uri) if not Path(u).name.startswith(".")]
    stems = {u[: -len(Path(u).suffix)] for u in files if Path(u).suffix.lower() != ".json"}
    # a caption sidecar (clip.json beside clip.mp4) travels with its input; any other file is an input
    inputs = [u for u in files if not (Path(u).suffix.lower() == ".json" and u[:-5] in stems)]
    if not inputs:
        raise ValueError(f"input {input_uri} holds no files")
    return inputs


def shard_inputs(inputs: list[str], index: int, count: int) -> list[str]:
    """Shard ``index`` of ``count``: contiguous, near-equal slices of the sorted listing, so the
    shards in order are the listing in order. Which shard does an input does not matter for
    resuming: records are keyed by content + settings in the one shared OUT/records/."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}: need count >= 1 and 0 <= index < count")
    q, r = divmod(len(inputs), count)
    start = index * q + min(index, r)
    return inputs[start:start + q + (index < r)]


def shard_file(output_uri: str, index: int, count: int) -> str:
    return storage.join(output_uri, "shards", f"{index}-of-{count}.json")


def _stage_dir(output_uri: str) -> Path:
    remote = storage.is_s3(output_uri)
    d = (storage.cache_dir() / "prepare" / hashlib.sha256(output_uri.encode()).hexdigest()[:16]
         if remote else Path(output_uri))
    (d / "records").mkdir(parents=True, exist_ok=True)
    return d


def prepare(input_uri: str, output_uri: str, cfg: PrepareConfig, *, track: bool = True, progress: bool = True,
            shard: tuple[int, int] | None = None) -> dict:
    """Run the stage; returns the summary (also written to OUT/summary.json).

    With ``shard=(i, n)`` only the i-th of n slices of the listing is processed (records and
    artifacts into OUT as usual) and its records go to OUT/shards/i-of-n.json instead of a
    manifest; ``merge_shards`` then writes the one manifest over all shards."""
    if shard is not None:
        return _prepare_shard(input_uri, output_uri, cfg, *shard, progress=progress)
    t_start = time.perf_counter()
    if track:  # fail before the work, not after it, when the tracking server is down
        from motioncharacter.tracking import check_server

        check_server()
    records, resumed, estimator = _process(list_inputs(input_uri), output_uri, cfg, progress)
    return _finish(records, resumed, estimator, input_uri, output_uri, cfg, track, time.perf_counter() - t_start)


def _prepare_shard(input_uri: str, output_uri: str, cfg: PrepareConfig, index: int, count: int,
                   progress: bool) -> dict:
    t_start = time.perf_counter()
    mine = shard_inputs(list_inputs(input_uri), index, count)
    records, resumed, estimator = _process(mine, output_uri, cfg, progress)
    result = {"input": input_uri, "output": output_uri, "shard": index, "shards": count, "inputs": len(records),
              "resumed": resumed, "flow_estimator": estimator, "settings_hash": settings_hash(cfg),
              "seconds": round(time.perf_counter() - t_start, 2), "records": records}
    storage.write_bytes(shard_file(output_uri, index, count), json.dumps(result).encode())
    transient = sum(filters.reason_code(x) == "transient" for r in records for x in r["reasons"])
    if transient:
        raise PrepareIncomplete({"output": output_uri, "dropped_by_reason": {"transient": transient}})
    return {k: v for k, v in result.items() if k != "records"}


def merge_shards(output_uri: str, count: int, cfg: PrepareConfig, *, track: bool = True) -> dict:
    """One manifest from the ``count`` shards in OUT/shards/, with the intensity resampling
    weights recomputed over the whole dataset; the same outputs as an unsharded ``prepare``."""
    t_start = time.perf_counter()
    if track:
        from motioncharacter.tracking import check_server

        check_server()
    parts = []
    for i in range(count):
        uri = shard_file(output_uri, i, count)
        if not storage.exists(uri):
            raise FileNotFoundError(f"shard {i} of {count} has no results at {uri}: run "
                                    f"`motioncharacter data prepare INPUT --output {output_uri} --shard {i}/{count}`")
        parts.append(json.loads(storage.read_bytes(uri)))
    hashes = {p["settings_hash"] for p in parts}
    if hashes != {settings_hash(cfg)}:
        raise ValueError(f"shards in {output_uri} were prepared with settings {sorted(hashes)}, the merge has "
                         f"{settings_hash(cfg)}: give the merge the shards' --config/--set")
    records = [r for p in parts for r in p["records"]]
    estimator = next((p["flow_estimator"] for p in parts if p["inputs"]), cfg.flow.estimator)
    work_s = sum(p["seconds"] for p in parts) + time.perf_counter() - t_start
    summary = _finish(records, sum(p["resumed"] for p in parts), estimator, parts[0]["input"], output_uri, cfg,
                      track, work_s, shards=count)
    return summary


def _process(inputs: list[str], output_uri: str, cfg: PrepareConfig, progress: bool) -> tuple[list, int, str]:
    """(records in input order, how many were resumed, flow estimator name) for ``inputs``."""
    from tqdm import tqdm

    remote = storage.is_s3(output_uri)
    stage_dir = _stage_dir(output_uri)
    done = _existing_records(output_uri)
    shash = settings_hash(cfg)
    tools: list[Tools] = []  # loaded on the first input that needs them
    records, resumed = [], 0
    bar = tqdm(inputs, desc="prepare", unit="clip", disable=not progress)

    def one(uri: str, name: str) -> tuple[dict, bool]:
        """(record, resumed) of one input; a new final record is persisted, artifacts first."""
        side = read_sidecar(uri) if cfg.caption.captioner == "sidecar" else None
        with storage.local_file(uri) as local:
            key = f"{content_hash(local)}-{shash}"
            if side:  # a changed sidecar is a changed input
                key += "-" + hashlib.sha256(json.dumps(side, sort_keys=True).encode()).hexdigest()[:8]
            if key in done:
                return dict(done[key]), True
            tools or tools.append(Tools(cfg))
            rec = process_input(local, name, key, cfg, tools[0], stage_dir, side)
            rec_rel = f"records/{key}.json"
            if remote and rec["kept"]:  # artifacts first, record last: a crash in between only repeats work
                for p in sorted(set(rec["frames"] + rec["faces"] + [rec["masks"]])):
                    storage.upload_file(stage_dir / p, storage.join(output_uri, p))
            storage.write_bytes(storage.join(output_uri, rec_rel) if remote else str(stage_dir / rec_rel),
                                json.dumps(rec, indent=1).encode())
            done[key] = rec
            return rec, False

    for uri in bar:
        name = Path(uri).name
        delay = TRANSIENT_BACKOFF_S
        for attempt in range(1, TRANSIENT_TRIES + 1):
            try:
                rec, was_resumed = one(uri, name)
                break
            except Exception as e:  # noqa: BLE001 - only transient failures are retried
                if not is_transient(e):
                    raise
                log.warning("%s: transient failure (try %d of %d): %s", name, attempt, TRANSIENT_TRIES, e)
                if attempt == TRANSIENT_TRIES and isinstance(e, storage.StoreUnavailable):
                    raise  # the output store itself is gone: no other input can be saved either
                if attempt == TRANSIENT_TRIES:  # not recorded: the next run tries this input again
                    rec, was_resumed = {"clip": name, "key": None, "kept": False, "motion_intensity": None,
                                        "reasons": [f"transient: {type(e).__name__}: {e}"], "info": {}}, False
                else:
                    time.sleep(delay)
                    delay *= 2
        resumed += was_resumed
        rec.update(clip=name, source=uri)
        records.append(rec)
        bar.set_postfix(kept=sum(r["kept"] for r in records), dropped=sum(not r["kept"] for r in records))
    return records, resumed, tools[0].estimator.name if tools else cfg.flow.estimator


def _finish(records: list[dict], resumed: int, estimator: str, input_uri: str, output_uri: str, cfg: PrepareConfig,
            track: bool, seconds: float, shards: int = 1) -> dict:
    """Resampling weights over all ``records``, manifest, summary, histogram, contact sheet, MLflow run."""
    remote = storage.is_s3(output_uri)
    stage_dir = _stage_dir(output_uri)
    shash = settings_hash(cfg)
    kept = [r for r in records if r["kept"]]
    weights = balance_weights(np.array([r["motion_intensity"] for r in kept]), cfg.output.bins)
    for r, w in zip(kept, weights):
        r["sample_weight"] = round(float(w), 6)
    manifest = "".join(json.dumps(r) + "\n" for r in records)
    drop_counts: dict[str, int] = {}
    for r in records:
        for code in {filters.reason_code(x) for x in r["reasons"]}:
            drop_counts[code] = drop_counts.get(code, 0) + 1
    ms = np.array([r["motion_intensity"] for r in kept]) if kept else np.zeros(0)
    summary = {
        "input": input_uri, "output": output_uri, "inputs": len(records), "kept": len(kept),
        "dropped": len(records) - len(kept), "dropped_by_reason": drop_counts, "resumed": resumed,
        "stills": sum(bool(r.get("still")) for r in kept),
        "motion_intensity": {"mean": float(ms.mean()) if ms.size else None,
                             "median": float(np.median(ms)) if ms.size else None,
                             "max": float(ms.max()) if ms.size else None,
                             "scale": f"pixels of displacement per {1 / cfg.sampling.fps:.2f} s step at a "
                                      f"{REFERENCE_SHORT_SIDE}-px short side, capped at 20"},
        "flow_estimator": estimator,
        "captioner": cfg.caption.captioner, "settings_hash": shash,
        "seconds": round(seconds, 2), "shards": shards,
    }
    (stage_dir / "manifest.jsonl").write_text(manifest)
    (stage_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    hist = histogram_png(ms, weights, stage_dir / "intensity_histogram.png", cfg.output.bins)
    sheet = _contact_sheet(kept, stage_dir, stage_dir / "contact_sheet.png", output_uri if remote else None)
    if remote:
        for f in ("manifest.jsonl", "summary.json", "intensity_histogram.png", "contact_sheet.png"):
            if (stage_dir / f).exists():
                storage.upload_file(stage_dir / f, storage.join(output_uri, f))
    if track:
        _log_run(cfg, summary, stage_dir, [hist, sheet])
    if drop_counts.get("transient"):
        raise PrepareIncomplete(summary)
    return summary


def _log_run(cfg: PrepareConfig, summary: dict, stage_dir: Path, images: list) -> None:
    from motioncharacter import tracking

    with tracking.run(cfg.experiment, run_name="prepare", tags={"stage": "prepare"}) as run:
        tracking.log_params({**to_dict(cfg), "input": summary["input"], "output": summary["output"]})
        tracking.log_metrics({"inputs": summary["inputs"], "kept": summary["kept"],
                              "dropped": {**summary["dropped_by_reason"], "total": summary["dropped"]},
                              "motion_intensity": {"mean": summary["motion_intensity"]["mean"]}})
        for f in ("manifest.jsonl", "summary.json"):
            tracking.log_artifact(stage_dir / f)
        for img in images:
            if img:
                tracking.log_artifact(img)
        summary["mlflow_run_id"] = run.info.run_id


def write_summary_table(summary: dict) -> str:
    lines = [f"inputs {summary['inputs']}  kept {summary['kept']}  dropped {summary['dropped']}"
             f"  (resumed {summary['resumed']})"]
    for code, n in sorted(summary["dropped_by_reason"].items()):
        lines.append(f"  dropped for {code:<13} {n}")
    mi = summary["motion_intensity"]
    if mi["mean"] is not None:
        lines.append(f"motion intensity mean {mi['mean']:.2f}  median {mi['median']:.2f}  max {mi['max']:.2f}  ({mi['scale']})")
    return "\n".join(lines)


