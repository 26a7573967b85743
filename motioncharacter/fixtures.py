"""The project's own generated test/demo data: face clips with programmed motion of known magnitude.

Faces come from images that ship inside installed packages (matplotlib's Grace Hopper,
scikit-image's astronaut), so a fresh clone can build this set offline. Each motion
clip pastes the face onto a static textured background and moves it on a circle so
that, between consecutive frames *sampled at 4 fps*, it moves exactly ``v`` pixels on
a 512-px frame: the analytic motion intensity (eq. 5-7, foreground = the moving face)
is ``v``. Bad inputs (corrupt, truncated, low-res, text overlay, two faces) are
included so the demo shows every drop reason.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from .video import encode_video

SIZE = 512
SRC_FPS = 8.0        # fixture frame rate; sampling at 4 fps takes every 2nd frame
SAMPLE_FPS = 4.0
NUM_FRAMES = 40      # 5 s, enough for 16 frames at 4 fps
RADIUS = 70.0


def package_face(name: str = "grace_hopper") -> np.ndarray:
    """An RGB face image that ships inside an installed package."""
    if name == "grace_hopper":
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    elif name == "astronaut":
        import skimage

        p = Path(skimage.__file__).parent / "data" / "astronaut.png"
    else:
        raise ValueError(f"unknown package face {name!r}")
    from PIL import Image

    with Image.open(p) as im:  # PIL, not cv2: libpng warns about astronaut.png's colour profile
        return np.asarray(im.convert("RGB"))


def _background(seed: int = 0) -> np.ndarray:
    """Static, textured (so flow is well-defined and zero), deterministic."""
    rng = np.random.default_rng(seed)
    noise = rng.random((SIZE // 8, SIZE // 8, 3)).astype(np.float32)
    bg = cv2.resize(noise, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    bg = 0.55 * bg + 0.25 * np.dstack([xx, yy, 1 - xx])
    return np.clip(bg * 255, 0, 255).astype(np.uint8)


def _face_layer(name: str, face_px: int = 220) -> tuple[np.ndarray, np.ndarray]:
    """A square face patch and a soft elliptical alpha mask."""
    from .faces import crop, detector

    img = package_face(name)
    face = detector().one(img, name)
    patch = crop(img, face, margin=0.25, size=face_px)
    alpha = np.zeros((face_px, face_px), np.float32)
    cv2.ellipse(alpha, (face_px // 2, face_px // 2), (int(face_px * 0.42), int(face_px * 0.5)), 0, 0, 360, 1.0, -1)
    return patch, cv2.GaussianBlur(alpha, (0, 0), 3)[..., None]


def circle_positions(v: float, n: int = NUM_FRAMES, radius: float = RADIUS) -> np.ndarray:
    """Centre offsets (n, 2) on a circle; frames 2 apart (one 4-fps step) are ``v`` px apart."""
    if v <= 0:
        return np.zeros((n, 2))
    step_per_sample = 2 * math.asin(min(1.0, v / (2 * radius)))  # chord length v
    theta = np.arange(n) * step_per_sample * SAMPLE_FPS / SRC_FPS
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], 1)


def motion_clip(v: float, face: str = "grace_hopper", size: int = SIZE, second_face: str | None = None,
                text: str | None = None, seed: int = 0) -> np.ndarray:
    """(NUM_FRAMES, size, size, 3) uint8 frames with the face moving ``v`` px per 4-fps step at 512 px."""
    bg = _background(seed)
    patch, alpha = _face_layer(face)
    frames = []
    for dx, dy in circle_positions(v):
        out = bg.astype(np.float32)
        layers = [(patch, alpha, SIZE / 2 + dx, SIZE / 2 + dy)]
        if second_face:
            p2, a2 = _face_layer(second_face, 150)
            layers = [(patch, alpha, SIZE * 0.3 + dx, SIZE / 2 + dy), (p2, a2, SIZE * 0.75, SIZE * 0.3)]
        for p, a, cx, cy in layers:
            h = p.shape[0]
            m = np.float32([[1, 0, cx - h / 2], [0, 1, cy - h / 2]])  # sub-pixel placement
            warped = cv2.warpAffine(p, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR)
            wa = cv2.warpAffine(a, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR)[..., None]
            out = out * (1 - wa) + warped.astype(np.float32) * wa
        frame = np.clip(out, 0, 255).astype(np.uint8)
        if text:
            for row in range(3):
                cv2.putText(frame, text, (20, SIZE - 30 - 60 * row), cv2.FONT_HERSHEY_SIMPLEX, 1.6,
                            (255, 255, 255), 5, cv2.LINE_AA)
        frames.append(frame)
    frames = np.stack(frames)
    if size != SIZE:
        frames = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])
    return frames


def write_fixtures(out_dir: str | Path, velocities: tuple[float, ...] = (0, 4, 8, 16), bad_inputs: bool = True) -> Path:
    """Write the fixture set into ``out_dir`` (idempotent: existing files are kept)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, make) -> None:
        p = out / name
        if not p.exists():
            tmp = p.with_name("." + p.name + ".partial")
            tmp.write_bytes(make())
            tmp.replace(p)

    for v in velocities:
        put(f"grace_v{v:02.0f}.mp4", lambda v=v: encode_video(motion_clip(v), "mp4", SRC_FPS))
    put("astronaut_v06.mp4", lambda: encode_video(motion_clip(6, face="astronaut", seed=1), "mp4", SRC_FPS))
    put("portrait_astronaut.png", lambda: cv2.imencode(".png", cv2.cvtColor(
        cv2.resize(package_face("astronaut"), (512, 512)), cv2.COLOR_RGB2BGR))[1].tobytes())
    if bad_inputs:
        put("lowres_v08.mp4", lambda: encode_video(motion_clip(8, size=320), "mp4", SRC_FPS))
        put("two_faces_v06.mp4", lambda: encode_video(motion_clip(6, second_face="astronaut"), "mp4", SRC_FPS))
        put("subtitles_v06.mp4", lambda: encode_video(motion_clip(6, text="BREAKING NEWS 24/7"), "mp4", SRC_FPS))
        put("corrupt.mp4", lambda: np.random.default_rng(0).bytes(20000))
        put("empty.mp4", lambda: b"")
        put("truncated.mp4", lambda: (out / "grace_v08.mp4").read_bytes()[:6000]
            if (out / "grace_v08.mp4").exists() else encode_video(motion_clip(8), "mp4", SRC_FPS)[:6000])
    return out
