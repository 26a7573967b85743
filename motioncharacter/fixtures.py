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
    return crop(img, face, margin=0.25, size=face_px), _soft_ellipse(face_px)


def _soft_ellipse(h: int) -> np.ndarray:
    """(h, h, 1) alpha: an upright ellipse filling the patch, with a soft edge."""
    alpha = np.zeros((h, h), np.float32)
    cv2.ellipse(alpha, (h // 2, h // 2), (int(h * 0.42), int(h * 0.5)), 0, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(alpha, (0, 0), 3)[..., None]


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


# ---- the learning set: many identities, speeds, directions and backgrounds ------------------------
#
# For `demo --learn` (the mini model). Each clip is 16 source frames at 8 fps (8 frames at 4 fps,
# data preparation's sampling), the face crossing the frame centre on a straight line at ``v`` px
# per 4-fps step of a 512-px frame, in one of 8 directions, over a smooth random background.
# Identities are split: training clips use TRAIN_IDENTITIES, the held-out portraits (never seen in
# training) use HELDOUT_IDENTITIES.

LEARN_FRAMES = 16
TRAIN_IDENTITIES = ("grace_hopper", "astronaut", "tom_hanks", "group_0", "group_1")
HELDOUT_IDENTITIES = ("group_2", "group_3", "group_4", "group_5")


def identity_face(name: str, face_px: int = 320) -> np.ndarray:
    """A square face patch (RGB uint8) of a named package-shipped identity: ``grace_hopper``,
    ``astronaut``, ``tom_hanks`` (insightface's sample) or ``group_<k>``, the k-th largest face
    of insightface's group photo t1.jpg."""
    from .faces import crop, detector

    if name in ("grace_hopper", "astronaut"):
        img = package_face(name)
        face = detector().one(img, name)
    else:
        import insightface
        from PIL import Image

        base = Path(insightface.__file__).parent / "data" / "images"
        if name == "tom_hanks":
            with Image.open(base / "Tom_Hanks_54745.png") as im:  # an aligned 112-px crop: pad it
                img = cv2.copyMakeBorder(np.asarray(im.convert("RGB")), 40, 40, 40, 40, cv2.BORDER_REFLECT)
            face = detector().one(img, name)
        elif name.startswith("group_"):
            with Image.open(base / "t1.jpg") as im:
                img = np.asarray(im.convert("RGB"))
            faces = sorted(detector().detect(img), key=lambda f: f.box[0])  # left to right
            face = faces[int(name.split("_")[1])]
        else:
            raise ValueError(f"unknown identity {name!r}")
    return crop(img, face, margin=0.3, size=face_px)


def smooth_background(seed: int) -> np.ndarray:
    """A smooth random colour field (textured enough for optical flow to read zero motion)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(70, 190, 3).astype(np.float32)  # one muted colour, gently varying
    cells = rng.uniform(-20, 20, (3, 3, 3)).astype(np.float32)
    bg = cv2.resize(cells, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + bg, 0, 255).astype(np.uint8)


def linear_clip(v: float, face: np.ndarray, angle: float, background: np.ndarray,
                n: int = LEARN_FRAMES, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(n, 512, 512, 3): the face patch moving ``v`` px per 4-fps step (v/2 per 8-fps source
    frame) along ``angle`` (radians), passing the centre (+ offset) at the middle frame."""
    h = face.shape[0]
    alpha = _soft_ellipse(h)
    d = np.array([math.cos(angle), math.sin(angle)]) * v * SAMPLE_FPS / SRC_FPS
    frames = []
    for k in range(n):
        cx, cy = np.array([SIZE / 2 + offset[0], SIZE / 2 + offset[1]]) + d * (k - (n - 1) / 2)
        m = np.float32([[1, 0, cx - h / 2], [0, 1, cy - h / 2]])
        warped = cv2.warpAffine(face, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR).astype(np.float32)
        wa = cv2.warpAffine(alpha, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR)[..., None]
        frames.append(np.clip(background * (1 - wa) + warped * wa, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_learn_fixtures(out_dir: str | Path, clips_per_identity: int = 12, seed: int = 0) -> dict[str, Path]:
    """Training clips (``clips/``: speeds spread evenly over 0..20 for every training identity,
    random direction, background and offset) and held-out portraits (``heldout/``, one per
    held-out identity). Idempotent. Returns {"clips": dir, "heldout": dir}."""
    out = Path(out_dir)
    clips, held = out / "clips", out / "heldout"
    clips.mkdir(parents=True, exist_ok=True)
    held.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    speeds = np.linspace(0, 20, clips_per_identity)
    for i, name in enumerate(TRAIN_IDENTITIES):
        face = None
        for j, v in enumerate(rng.permutation(speeds)):
            angle = float(rng.integers(8)) * math.pi / 4
            off = tuple(rng.uniform(-25, 25, 2))
            bg_seed = int(rng.integers(1 << 30))
            p = clips / f"{name}_{j:02d}_v{v:04.1f}.mp4"
            if p.exists():
                continue
            face = identity_face(name) if face is None else face
            tmp = p.with_name("." + p.name + ".partial")
            tmp.write_bytes(encode_video(linear_clip(float(v), face, angle, smooth_background(bg_seed), offset=off),
                                         "mp4", SRC_FPS))
            tmp.replace(p)
    for k, name in enumerate(HELDOUT_IDENTITIES):
        p = held / f"{name}.png"
        if not p.exists():
            still = linear_clip(0.0, identity_face(name), 0.0, smooth_background(10_000 + k), n=1)[0]
            cv2.imwrite(str(p), cv2.cvtColor(still, cv2.COLOR_RGB2BGR))
    return {"clips": clips, "heldout": held}
