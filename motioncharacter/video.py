"""Video and image I/O shared by every stage: decoding (decord), sampling, writing, contact sheets."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif"}
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard for user images


class VideoError(ValueError):
    """An input that cannot be decoded; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class VideoInfo:
    width: int
    height: int
    fps: float
    num_frames: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0


def open_video(path: str | Path):
    """A decord VideoReader, or VideoError('unreadable' / 'empty') naming the file."""
    import decord

    p = Path(path)
    if not p.is_file():
        raise VideoError("missing", f"{p}: no such file")
    if p.stat().st_size == 0:
        raise VideoError("empty", f"{p.name}: zero-length file")
    try:
        vr = decord.VideoReader(str(p), num_threads=1)
    except Exception as e:  # decord raises DECORDError/RuntimeError with ffmpeg's text
        raise VideoError("unreadable", f"{p.name}: not a decodable video (corrupt, truncated or not a video)") from None
    if len(vr) == 0:
        raise VideoError("empty", f"{p}: video has no frames")
    return vr


def probe(vr) -> VideoInfo:
    h, w = vr[0].shape[:2]
    fps = float(vr.get_avg_fps() or 0.0)
    if not math.isfinite(fps) or fps <= 0:
        fps = 25.0
    return VideoInfo(width=w, height=h, fps=fps, num_frames=len(vr))


def sample_indices(num_frames: int, src_fps: float, target_fps: float, count: int, start: int = 0) -> list[int]:
    """Frame indices at ``target_fps`` from ``start``, at most ``count`` of them, never past the end.

    >>> sample_indices(100, 25.0, 4.0, 4)
    [0, 6, 12, 19]
    """
    if target_fps <= 0 or src_fps <= 0:
        raise ValueError("frame rates must be positive")
    step = src_fps / target_fps
    out = []
    for k in range(count):
        i = start + int(round(k * step))
        if i >= num_frames:
            break
        out.append(i)
    return out


def read_frames(vr, indices: list[int]) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB; a truncated stream raises VideoError('truncated')."""
    try:
        return vr.get_batch(indices).asnumpy()
    except Exception as e:
        raise VideoError("truncated", f"decoding frames {indices[0]}..{indices[-1]} failed ({str(e)[:120]})") from None


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """RGB uint8 array; refuses unreadable files and images over ``max_pixels`` with a clear message."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {p} does not exist")
    try:
        with Image.open(p) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"image {p} is {im.width}x{im.height}, over the {max_pixels:,}-pixel limit")
            return np.asarray(im.convert("RGB"))
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"image {p} is not a readable image ({e})") from None


def resize_short(frames: np.ndarray, short: int) -> np.ndarray:
    """Resize (N,H,W,3) frames so the short side is ``short``, keeping aspect ratio."""
    import cv2

    h, w = frames.shape[1:3]
    s = short / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, size, interpolation=interp) for f in frames])


def encode_video(frames: np.ndarray, fmt: str = "mp4", fps: float = 8.0) -> bytes:
    """Encode (F,H,W,3) uint8 frames to mp4 (H.264 via PyAV) or gif bytes."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (F,H,W,3) uint8 frames, got {frames.dtype} {frames.shape}")
    if fmt == "gif":
        buf = io.BytesIO()
        imgs = [Image.fromarray(f) for f in frames]
        imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:],
                     duration=int(round(1000 / fps)), loop=0)
        return buf.getvalue()
    if fmt != "mp4":
        raise ValueError(f"unknown video format {fmt!r} (mp4 or gif)")
    import av
    from fractions import Fraction

    # H.264 with yuv420p needs even sizes; pad by edge replication rather than crop.
    h, w = frames.shape[1:3]
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_video(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Write frames to ``path``; the suffix (.mp4 or .gif) picks the format."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    data = encode_video(frames, fmt, fps)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def contact_sheet(rows: list[list[np.ndarray]], labels: list[str] | None = None, cell: int = 128) -> Image.Image:
    """A grid of thumbnails, one row per list, with an optional label on each row."""
    from PIL import ImageDraw

    ncols = max((len(r) for r in rows), default=1)
    label_h = 14 if labels else 0
    sheet = Image.new("RGB", (ncols * cell, len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        y = r * (cell + label_h)
        if labels:
            draw.text((2, y + 1), labels[r][:120], fill="black")
        for c, img in enumerate(row):
            thumb = Image.fromarray(np.asarray(img, dtype=np.uint8)).convert("RGB")
            thumb.thumbnail((cell, cell))
            sheet.paste(thumb, (c * cell, y + label_h))
    return sheet
