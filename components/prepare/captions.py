"""Dual captions (appendix A.3): an overall description P and an action phrase A.

Two captioners share one interface, ``captioner(frames, faces) -> Caption``:

- ``OfflineCaptioner`` (default): measures facial signals over the sampled frames from
  68-point landmarks (dlib's predictor, driven by the YuNet face box) — mouth opening,
  smile, blink (eye aspect ratio), head turn (yaw), nod (pitch), head movement — and turns
  them into an action phrase by thresholds, plus a templated overall description.
- ``VLMCaptioner``: any OpenAI-compatible chat-completions endpoint serving a vision-
  language model (URL and model configurable; API key from ``MOTIONCHARACTER_VLM_API_KEY``
  or ``OPENAI_API_KEY``), for clusters that serve one.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from motioncharacter.faces import Face


@dataclass
class Caption:
    caption: str
    action: str
    source: str
    signals: dict = field(default_factory=dict)


# ---- action phrase from free text ------------------------------------------------------

_ING = r"[a-z]+ing"
_TAIL = r"(?:her|his|their|its|the|a|head|eyes|mouth|lips|brows|eyebrows|hand|hands|up|down|left|right|slowly|quickly|gently|widely|softly|around|side|to|camera|at)"
_ACTION_RE = re.compile(rf"\b(?:is|are|keeps|starts)\s+({_ING}(?:\s+(?:and\s+)?(?:{_ING}|{_TAIL}))*)")
_NOT_ACTIONS = {"wearing", "standing", "sitting", "something", "nothing", "anything", "being", "having", "during",
                "morning", "evening", "clothing", "building", "ceiling", "painting", "lighting", "king", "thing"}


def action_from_prompt(prompt: str) -> str:
    """The action phrase in a free-text prompt: "a man is talking" -> "talking".

    Takes the -ing phrase after "is/are" (with head/eye/mouth words and directions that
    belong to it); otherwise the first -ing word that is an action. "" when none.
    """
    text = prompt.lower().strip()
    for m in _ACTION_RE.finditer(text):
        phrase = m.group(1)
        words = phrase.split()
        if words[0] in _NOT_ACTIONS:
            continue
        # drop dangling connectors ("smiling at the" -> "smiling")
        while words and words[-1] in {"and", "the", "a", "at", "to", "her", "his", "their", "its"}:
            words.pop()
        return " ".join(words)
    for w in re.findall(rf"\b{_ING}\b", text):
        if w not in _NOT_ACTIONS:
            return w
    return ""


# ---- facial signals ----------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _landmark_model():
    import importlib.util

    import dlib

    # importing face_recognition_models needs pkg_resources (gone from new setuptools): find the file instead
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face_recognition_models is not installed (needed for 68-point landmarks)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    return dlib.shape_predictor(str(path))


def landmarks68(frame: np.ndarray, face: Face) -> np.ndarray:
    import dlib

    x, y, w, h = (int(round(v)) for v in face.box)
    shape = _landmark_model()(np.ascontiguousarray(frame), dlib.rectangle(x, y, x + w, y + h))
    return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float64)


def _ear(eye: np.ndarray) -> float:
    """Eye aspect ratio (Soukupova & Cech 2016): ~0.3 open, < 0.2 closed."""
    return (np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])) / (2 * np.linalg.norm(eye[0] - eye[3]) + 1e-8)


def frame_signals(lm: np.ndarray) -> dict[str, float]:
    """Scale-free signals from 68 landmarks, normalised by the inter-ocular distance."""
    left_eye, right_eye = lm[36:42], lm[42:48]
    eye_l, eye_r = left_eye.mean(0), right_eye.mean(0)
    iod = np.linalg.norm(eye_r - eye_l) + 1e-8
    eye_mid = (eye_l + eye_r) / 2
    nose = lm[30]
    mouth_mid = (lm[48] + lm[54]) / 2
    return {
        "mouth_open": float(np.linalg.norm(lm[62] - lm[66]) / iod),
        "mouth_width": float(np.linalg.norm(lm[54] - lm[48]) / iod),
        "ear": float((_ear(left_eye) + _ear(right_eye)) / 2),
        "yaw": float((nose[0] - eye_mid[0]) / iod),
        "pitch": float(np.linalg.norm(nose - eye_mid) / (np.linalg.norm(mouth_mid - eye_mid) + 1e-8)),
        "cx": float(eye_mid[0]), "cy": float(eye_mid[1]), "iod": float(iod),
    }


@dataclass
class ActionThresholds:
    talking_mouth_range: float = 0.12   # range of inner-lip gap / IOD
    smile_width_gain: float = 0.10      # max mouth width over its min, / IOD
    blink_ear: float = 0.20             # EAR below this in some frame...
    open_ear: float = 0.24              # ...while the median frame is above this
    turn_yaw_range: float = 0.18        # range of nose offset / IOD
    nod_pitch_range: float = 0.12
    move_range: float = 0.35            # range of eye-centre position / IOD


def action_from_signals(sig: list[dict[str, float]], t: ActionThresholds = ActionThresholds()) -> tuple[str, dict]:
    """Rule-based action phrase from per-frame signals; returns (phrase, summary numbers)."""
    def rng(k):
        v = np.array([s[k] for s in sig])
        return float(v.max() - v.min())

    ear = np.array([s["ear"] for s in sig])
    iod = float(np.median([s["iod"] for s in sig]))
    summary = {
        "mouth_open_range": rng("mouth_open"),
        "mouth_width_gain": rng("mouth_width"),
        "ear_min": float(ear.min()), "ear_median": float(np.median(ear)),
        "yaw_range": rng("yaw"), "pitch_range": rng("pitch"),
        "move_range": max(rng("cx"), rng("cy")) / iod,
    }
    actions = []
    if summary["mouth_open_range"] > t.talking_mouth_range:
        actions.append("talking")
    if summary["mouth_width_gain"] > t.smile_width_gain and "talking" not in actions:
        actions.append("smiling")
    if summary["yaw_range"] > t.turn_yaw_range:
        actions.append("turning head")
    elif summary["pitch_range"] > t.nod_pitch_range:
        actions.append("nodding")
    elif summary["move_range"] > t.move_range:
        actions.append("moving head")
    if summary["ear_min"] < t.blink_ear and summary["ear_median"] > t.open_ear:
        actions.append("blinking")
    return " and ".join(actions[:2]), summary


class OfflineCaptioner:
    name = "offline-landmarks"

    def __init__(self, thresholds: ActionThresholds | None = None):
        self.t = thresholds or ActionThresholds()

    def __call__(self, frames: np.ndarray, faces: list[Face]) -> Caption:
        sig = [frame_signals(landmarks68(f, face)) for f, face in zip(frames, faces)]
        action, summary = action_from_signals(sig, self.t)
        h, w = frames.shape[1:3]
        face_frac = float(np.median([f.area for f in faces])) / (h * w)
        shot = "close-up" if face_frac > 0.12 else "medium shot" if face_frac > 0.03 else "wide shot"
        light = "brightly lit" if frames.mean() > 140 else "dimly lit" if frames.mean() < 70 else "evenly lit"
        doing = action if action else "keeping still and looking ahead"
        caption = f"A {shot} video of a person {doing}, {light}."
        return Caption(caption=caption, action=action, source=self.name, signals=summary)


class VLMCaptioner:
    """Captions from an OpenAI-compatible vision-language endpoint (``POST {url}/chat/completions``)."""

    name = "vlm"
    PROMPT = ("These are frames of one short video of a person. Reply with JSON only: "
              '{"caption": "<one sentence describing the person, clothing, scene and what happens>", '
              '"action": "<a short action phrase for the face/body movement, e.g. talking, smiling, turning head; '
              'empty if none>"}')

    def __init__(self, url: str, model: str, timeout: float = 60.0, max_frames: int = 4):
        self.url, self.model, self.timeout, self.max_frames = url.rstrip("/"), model, timeout, max_frames

    def __call__(self, frames: np.ndarray, faces: list[Face]) -> Caption:
        import requests
        from PIL import Image

        picks = frames[np.linspace(0, len(frames) - 1, min(self.max_frames, len(frames))).astype(int)]
        content = [{"type": "text", "text": self.PROMPT}]
        for f in picks:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="JPEG", quality=85)
            content.append({"type": "image_url", "image_url": {
                "url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()}})
        headers = {"Content-Type": "application/json"}
        key = os.environ.get("MOTIONCHARACTER_VLM_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        try:
            r = requests.post(f"{self.url}/chat/completions", json=body, headers=headers, timeout=self.timeout)
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"]
        except Exception as e:
            from motioncharacter.faults import TransientError, is_transient

            kind = TransientError if is_transient(e) else RuntimeError  # down/5xx: retry later; 4xx: final
            raise kind(f"captioning endpoint {self.url} failed: {e}") from None
        m = re.search(r"\{.*\}", text, re.S)
        try:
            data = json.loads(m.group(0)) if m else {}
        except json.JSONDecodeError:
            data = {}
        caption = str(data.get("caption") or text).strip()
        action = str(data.get("action") or action_from_prompt(caption)).strip()
        return Caption(caption=caption, action=action, source=f"vlm:{self.model}")


def make_captioner(kind: str = "offline", url: str = "", model: str = ""):
    if kind in ("offline", "sidecar"):  # sidecar: inputs without a <input>.json get the offline captions
        return OfflineCaptioner()
    if kind == "vlm":
        if not url or not model:
            raise ValueError("captioner 'vlm' needs caption.url and caption.model")
        return VLMCaptioner(url, model)
    raise ValueError(f"unknown captioner {kind!r}: 'offline', 'vlm' or 'sidecar'")
