"""What the web page (serving/ui.py) does, without Gradio: check a photo, ask the server, explain failures.

Everything here talks to a running Triton endpoint through ``MotionCharacterClient``; the model is
never loaded in the web process. Only bytes the page itself read and checked reach the server: a
photo is read from the upload folder (never from a path a browser named), checked for size, format
and pixel count, decoded, and checked for exactly one face (or the face picked) before a request
is built.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .client import MotionCharacterClient, Progress, RemoteError, Result, ServerUnavailable, parse_url
from .request_args import Limits, decode_image

SWEEP = (0, 5, 10, 15, 20)  # intensities of the sweep, side by side
ACTIONS = ("talking", "smiling", "laughing", "nodding", "shaking head", "turning head", "waving", "blinking",
           "singing", "walking")
DEFAULT_SIZES = {"steps": 30, "frames": 16, "height": 512, "width": 512}  # a server that advertises none


class PageError(Exception):
    """A problem the person at the page can act on; the message says what to do."""


@dataclass
class Served:
    """What the server serves: versions, native sizes, limits (read when the page loads)."""

    url: str
    model: str
    versions: list[int] = field(default_factory=list)
    defaults: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    limits: Limits = field(default_factory=Limits)


@dataclass
class Outcome:
    video: bytes
    frames: int
    height: int
    width: int
    seed: int
    version: str
    seconds: float


def client(url: str, version: int = 0, timeout_s: float = 600.0) -> MotionCharacterClient:
    # one per request: a client is not thread-safe, and the page serves several people at once
    return MotionCharacterClient(url, timeout_s=timeout_s, retries=2, version=version)


def served(url: str) -> Served:
    """The served model's versions, defaults and limits; PageError when the server cannot answer."""
    try:
        with client(url, timeout_s=30) as c:
            return Served(url=url, model=c.model, versions=c.served_versions(),
                          defaults={**DEFAULT_SIZES, **c.defaults()}, limits=c.limits())
    except (ServerUnavailable, RemoteError) as e:
        raise PageError(explain(e, url)) from None


def read_photo(path: str | None, upload_dir: str | os.PathLike, max_bytes: int,
               max_pixels: int) -> tuple[bytes, np.ndarray]:
    """The encoded bytes of an uploaded photo and its RGB pixels, after its size, format and pixel
    count are checked (the header before anything is decoded).

    ``path`` must lie in ``upload_dir`` (Gradio's upload folder): the page reads nothing else."""
    if not path:
        raise PageError("Add a face photo first (upload one or use the webcam).")
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(upload_dir)) or not real.is_file():
        raise PageError("That photo is not one uploaded to this page: upload it again.")
    size = real.stat().st_size
    if size > max_bytes:
        raise PageError(f"The photo is too large: {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB limit. "
                        "Upload a smaller or more compressed photo (a JPEG of the face is plenty).")
    data = real.read_bytes()
    try:
        rgb = decode_image(data, max_bytes, max_pixels, name="photo")
    except ValueError as e:
        raise PageError(f"The photo cannot be used: {e}. Upload a PNG, JPEG, WebP or BMP photo of a "
                        "reasonable size.") from None
    return data, rgb


def check_face(rgb: np.ndarray, face_index: int) -> None:
    """Exactly one face in the photo, or the picked one (``face_index`` >= 0) exists: the project's
    own detector (motioncharacter.faces, the one the server runs), before anything is sent."""
    from .. import faces

    found = len(faces.detector().detect(rgb))
    if not found:
        raise PageError("No face found in the photo. Upload a photo where one face is clearly visible, "
                        "facing the camera and not too small.")
    if face_index >= found:
        raise PageError(f"The photo has {found} face(s): 'Face' must be between 0 and {found - 1} "
                        "(0 = the largest), or -1 for a photo of one person.")
    if face_index < 0 and found > 1:
        raise PageError(f"The photo has {found} faces. Upload a photo of one person, or pick a face "
                        "under Advanced ('Face': 0 = the largest).")


def explain(e: Exception, url: str) -> str:
    """A message for the page from a failure of the client or the server."""
    if isinstance(e, ServerUnavailable):
        return (f"The generation server at {url} is unreachable or busy ({e}). Try again in a minute; "
                "if it persists, check that `motioncharacter serve` (or the Triton service) is running.")
    if isinstance(e, RemoteError):
        text = str(e)
        if "face" in text:
            return f"The server found a problem with the face: {text}"
        return f"The server refused the request: {text}. Change the settings it names and try again."
    if isinstance(e, ValueError):  # refused before sending: over the server's byte limits
        return f"The request is too large for this server: {e}."
    return f"Unexpected error: {e}"


def generate(url: str, version: int, image: bytes, prompt: str, params: dict,
             on_step: Callable[[int, int], None] | None = None) -> Outcome:
    """One video; over gRPC with per-step progress through ``on_step``. PageError on any failure."""
    if not prompt.strip():
        raise PageError("Describe the video in the prompt first (e.g. 'a person talking to the camera').")
    t0 = time.monotonic()
    try:
        with client(url, version) as c:
            if parse_url(url)[0] == "grpc":
                result = None
                for event in c.stream(image, prompt, video=True, **params):
                    if isinstance(event, Progress):
                        if on_step:
                            on_step(event.step, event.total)
                    else:
                        result = event
            else:
                result = c.generate(image, prompt, video=True, **params)
    except (ServerUnavailable, RemoteError, ValueError) as e:
        raise PageError(explain(e, url)) from None
    assert isinstance(result, Result) and result.video is not None
    f, h, w = result.frames.shape[:3]
    return Outcome(video=result.video, frames=f, height=h, width=w, seed=int(params.get("seed", 0)),
                   version=result.version, seconds=time.monotonic() - t0)


def sweep(url: str, version: int, image: bytes, prompt: str, params: dict,
          on_step: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, float, list[Outcome]]:
    """The same request at each intensity of SWEEP: a grid video (tiles left to right, labelled), its
    frame rate, and each outcome. ``on_step(done, total)`` counts steps over all of them."""
    outcomes, videos = [], []
    for k, intensity in enumerate(SWEEP):
        def step(s: int, n: int, k=k) -> None:
            if on_step:
                on_step(k * n + s, len(SWEEP) * n)

        out = generate(url, version, image, prompt, {**params, "intensity": float(intensity)}, step)
        outcomes.append(out)
        frames, fps = decode_mp4(out.video)
        videos.append(frames)
    return grid(videos, [str(i) for i in SWEEP]), fps, outcomes


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """(F, H, W, 3) RGB frames of an mp4, and its frame rate."""
    import io

    import av

    with av.open(io.BytesIO(data)) as f:
        rate = f.streams.video[0].average_rate
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]), float(rate or 8)


def grid(videos: list[np.ndarray], labels: list[str]) -> np.ndarray:
    """(F, H + label strip, W * len(videos), 3): the videos side by side, each under its label."""
    import cv2

    f, h, w = videos[0].shape[:3]
    strip = max(16, h // 8)
    tiles = []
    for video, label in zip(videos, labels):
        head = np.full((strip, w, 3), 255, np.uint8)
        scale = strip / 40
        cv2.putText(head, label, (2, int(strip * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0),
                    max(1, int(scale * 2)), cv2.LINE_AA)
        tiles.append(np.concatenate([np.broadcast_to(head, (f, strip, w, 3)), video[:f]], axis=1))
    return np.ascontiguousarray(np.concatenate(tiles, axis=2))
