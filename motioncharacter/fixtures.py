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


# ---- the learning set: real people, programmed and real motion, captions blind to intensity ---------
#
# For `demo --learn` (the mini model). Each clip is 16 source frames at 8 fps (8 frames at 4 fps,
# data preparation's sampling). With ../shared/data/people (see people.py) whole people are held
# out: their first photo is the evaluation reference. Training clips are
#   * programmed motion of every photo of every training person: a camera window around the face
#     panning at ``v`` px per 4-fps step of a 512-px frame (v spread over 0..20), in one of 8
#     directions, with a small rotation and zoom drift;
#   * the real talking-head videos, face-centred, with the intensity data preparation measures.
# Every clip carries a sidecar ``<clip>.json`` (caption, action, person) that data preparation
# reads (caption.captioner=sidecar): caption and action are drawn independently of the speed, so
# nothing but the intensity label tells the model how much to move. Without ../shared the
# package-shipped faces stand in, and the loop says so.

LEARN_FRAMES = 16
FACE_MARGIN = 0.6      # crop side = face box x (1 + 2 margin): the face is ~45 % of the frame
TRAIN_IDENTITIES = ("grace_hopper", "astronaut", "tom_hanks", "group_0", "group_1")
HELDOUT_IDENTITIES = ("group_2", "group_3", "group_4", "group_5")
SHOTS = ("A close-up video of a person", "A medium shot video of a person")
LIGHTS = ("evenly lit", "brightly lit", "dimly lit")
ACTIONS = ("moving head", "talking", "turning head", "nodding")
EVAL_ACTION = "moving head"


def learn_caption(rng: np.random.Generator) -> tuple[str, str]:
    """(caption, action), drawn without looking at the clip's motion."""
    action = ACTIONS[int(rng.integers(len(ACTIONS)))]
    return f"{SHOTS[int(rng.integers(len(SHOTS)))]} {action}, {LIGHTS[int(rng.integers(len(LIGHTS)))]}.", action


def learn_prompts(action: str = EVAL_ACTION) -> list[str]:
    """The evaluation prompts: the training captions' own templates, with ``action``."""
    return [f"{s} {action}, {light}." for s in SHOTS for light in LIGHTS]


def identity_face(name: str, face_px: int = 320) -> np.ndarray:
    """A square face patch (RGB uint8) of a named package-shipped identity: ``grace_hopper``,
    ``astronaut``, ``tom_hanks`` (insightface's sample) or ``group_<k>``, the k-th face from the
    left of insightface's group photo t1.jpg."""
    from .faces import crop

    img, face = _package_identity(name)
    return crop(img, face, margin=FACE_MARGIN, size=face_px)


def _package_identity(name: str):
    from .faces import detector

    if name in ("grace_hopper", "astronaut"):
        img = package_face(name)
        return img, detector().one(img, name)
    import insightface
    from PIL import Image

    base = Path(insightface.__file__).parent / "data" / "images"
    if name == "tom_hanks":
        with Image.open(base / "Tom_Hanks_54745.png") as im:  # an aligned 112-px crop: pad it
            img = cv2.copyMakeBorder(np.asarray(im.convert("RGB")), 60, 60, 60, 60, cv2.BORDER_REPLICATE)
        return img, detector().one(img, name)
    if name.startswith("group_"):
        with Image.open(base / "t1.jpg") as im:
            img = np.asarray(im.convert("RGB"))
        faces = sorted(detector().detect(img), key=lambda f: f.box[0])  # left to right
        return img, faces[int(name.split("_")[1])]
    raise ValueError(f"unknown identity {name!r}")


def camera_clip(img: np.ndarray, face, v: float, angle: float, rng: np.random.Generator,
                n: int = LEARN_FRAMES, size: int = SIZE) -> np.ndarray:
    """(n, size, size, 3): a square window around ``face`` panning so the picture moves ``v`` px per
    4-fps step of a ``size``-px frame along ``angle``, with a rotation and zoom drift that grow with
    ``v`` (none at 0, so a still clip measures still).

    The window never leaves the photo: replicated borders streak, and optical flow on streaks is
    ambiguous (DIS read 13 at v = 0 and Farneback 190 at v = 20 on tight crops). Its side is the face
    box x (1 + 2 FACE_MARGIN), capped so the whole pan fits in the photo, and the path is shifted
    inwards where the face is near an edge."""
    x, y, w, h = face.box
    ih, iw = img.shape[:2]
    travel = (n - 1) * v * SAMPLE_FPS / SRC_FPS / size  # the pan's length, as a fraction of the side
    d = np.array([math.cos(angle), math.sin(angle)])
    fit = min((iw - 1) / (1 + travel * abs(d[0]) + 0.02), (ih - 1) / (1 + travel * abs(d[1]) + 0.02))
    side = min(max(w, h) * (1 + 2 * FACE_MARGIN), fit)
    step = d * v * SAMPLE_FPS / SRC_FPS * side / size
    drift = min(1.0, v / 10)
    rot = rng.uniform(-0.4, 0.4) * drift     # degrees per source frame
    zoom = rng.uniform(-0.006, 0.006) * drift
    half = (n - 1) / 2
    # the centre path c + step * t, t in [-half, half], shifted so every window (rotated and zoomed
    # windows reach a little further: 1 % margin) lies inside the photo
    reach = np.abs(step) * half + side / 2 * 1.01
    centre = np.clip(np.array([x + w / 2, y + h / 2]), reach, np.array([iw - 1, ih - 1]) - reach)
    frames = []
    for k in range(n):
        t = k - half
        px, py = centre + step * t
        s = size / side * (1 + zoom * t)
        m = cv2.getRotationMatrix2D((float(px), float(py)), rot * t, s)
        m[:, 2] += np.array([size / 2 - px, size / 2 - py])
        frames.append(cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REPLICATE))
    return np.stack(frames)


def face_centred_video(path: Path, n: int = LEARN_FRAMES, size: int = SIZE) -> np.ndarray | None:
    """``n`` frames at SRC_FPS from the middle of a real video, cropped around its face like the
    programmed clips (the face found on the first of them; None when there is none)."""
    from .faces import detector
    from .video import open_media

    media = open_media(path)
    idx = media.timeline.sample(SRC_FPS, 10_000)
    if len(idx) < n:
        return None
    mid = (len(idx) - n) // 2
    frames = media.read(idx[mid:mid + n])
    found = detector().detect(frames[0])
    if not found:
        return None
    face = max(found, key=lambda f: f.area)
    x, y, w, h = face.box
    side = max(w, h) * (1 + 2 * FACE_MARGIN)
    m = np.float32([[size / side, 0, size / 2 - (x + w / 2) * size / side],
                    [0, size / side, size / 2 - (y + h / 2) * size / side]])
    return np.stack([cv2.warpAffine(f, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
                     for f in frames])


def _put(path: Path, data: bytes) -> None:
    tmp = path.with_name("." + path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _sidecar(path: Path, rng: np.random.Generator, person: str, source: str) -> None:
    import json

    caption, action = learn_caption(rng)
    _put(path.with_suffix(".json"), json.dumps({"caption": caption, "action": action, "person": person,
                                                "source": source}).encode())


def _reference_still(img: np.ndarray, face, size: int = SIZE) -> np.ndarray:
    return camera_clip(img, face, 0.0, 0.0, np.random.default_rng(0), n=1, size=size)[0]


def write_learn_fixtures(out_dir: str | Path, clips_per_identity: int = 12, seed: int = 0, people: bool = True,
                         heldout: int = 12, clips_per_photo: int = 1, max_train_people: int = 0) -> dict:
    """Training clips (``clips/``, each with its sidecar) and held-out references (``heldout/``,
    one photo per held-out person). Idempotent. Returns {"clips", "heldout", "source",
    "train_people", "heldout_people"}: ``source`` is "people" (../shared/data/people, split by
    person) or "package" (the package-shipped faces: 5 identities x ``clips_per_identity``)."""
    from .faces import detector
    from .people import people_dir, split_people
    from .video import load_image

    out = Path(out_dir)
    clips, held = out / "clips", out / "heldout"
    clips.mkdir(parents=True, exist_ok=True)
    held.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    root = people_dir() if people else None

    def programmed(name: str, get, speeds) -> None:
        img = face = None
        for j, v in enumerate(speeds):
            angle = float(rng.integers(8)) * math.pi / 4
            crng = np.random.default_rng(rng.integers(1 << 30))
            p = clips / f"{name}_{j:02d}_v{v:04.1f}.mp4"
            if not p.exists():
                if img is None:
                    img, face = get()
                _put(p, encode_video(camera_clip(img, face, float(v), angle, crng), "mp4", SRC_FPS))
            if not p.with_suffix(".json").exists():
                _sidecar(p, crng, name.split("__")[0], "programmed")

    if root is None:
        for name in TRAIN_IDENTITIES:
            programmed(name, lambda name=name: _package_identity(name),
                       rng.permutation(np.linspace(0, 20, clips_per_identity)))
        for name in HELDOUT_IDENTITIES:
            p = held / f"{name}.png"
            if not p.exists():
                cv2.imwrite(str(p), cv2.cvtColor(_reference_still(*_package_identity(name)), cv2.COLOR_RGB2BGR))
        return {"clips": clips, "heldout": held, "source": "package", "train_people": list(TRAIN_IDENTITIES),
                "heldout_people": list(HELDOUT_IDENTITIES)}

    split = split_people(root, heldout=heldout, seed=seed)
    if max_train_people:  # a quick run (tests): the first N training people
        split.train = split.train[:max_train_people]

    def photo(path: Path):
        img = load_image(path)
        found = detector().detect(img)
        if not found:
            raise ValueError(f"no face in {path}")
        return img, max(found, key=lambda f: f.area)

    for person in split.train:
        for k, ph in enumerate(person.photos):
            speeds = rng.uniform(0, 20, clips_per_photo)
            programmed(f"{person.name}__{k}", lambda ph=ph: photo(ph), speeds)
        for k, vid in enumerate(person.videos):
            p = clips / f"{person.name}__video{k}.mp4"
            srng = np.random.default_rng(rng.integers(1 << 30))  # drawn first: a resumed run draws the same
            if p.exists() or (clips / f".{p.name}.skip").exists():
                continue
            try:
                frames = face_centred_video(vid)
            except Exception:  # an unreadable video is data preparation's to report; here it is skipped
                frames = None
            if frames is None:
                (clips / f".{p.name}.skip").touch()
                continue
            _put(p, encode_video(frames, "mp4", SRC_FPS))
            _sidecar(p, srng, person.name, "video")
    for person in split.heldout:
        p = held / f"{person.name}.png"
        if not p.exists():
            cv2.imwrite(str(p), cv2.cvtColor(_reference_still(*photo(person.photos[0])), cv2.COLOR_RGB2BGR))
    return {"clips": clips, "heldout": held, "source": "people", "train_people": [p.name for p in split.train],
            "heldout_people": [p.name for p in split.heldout]}
