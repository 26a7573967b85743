"""Video and image I/O shared by every stage: decoding (decord; Pillow for animated GIF / WebP /
APNG), sampling by time (``open_media(path).sample(fps, count)``), writing, contact sheets."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".gif", ".apng"}
ANIMATED_SUFFIXES = {".gif", ".webp", ".png", ".apng"}  # decoded by Pillow, with per-frame durations
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard for user images
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what user images may be: every other decoder is attack surface
VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg", "png", "gif")  # likewise for videos
MAX_VIDEO_SECONDS = 60  # control videos last seconds; a header declaring hours is hostile or a mistake
DEFAULT_FRAME_MS = 100  # browsers show a frame whose delay is missing or <= 10 ms for 100 ms
CFR_TOLERANCE_S = 0.0015  # frame gaps this close count as one rate: 1-ms time bases round 1/fps
_EPS = 1e-6  # seconds: float timestamps (decord's are float32) must not miss a frame's start


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


def _check_file(p: Path) -> None:
    if not p.is_file():
        raise VideoError("missing", f"{p}: no such file")
    if p.stat().st_size == 0:
        raise VideoError("empty", f"{p.name}: zero-length file")


def open_video(path: str | Path):
    """A decord VideoReader, or VideoError('unreadable' / 'empty') naming the file."""
    import decord

    p = Path(path)
    _check_file(p)
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


@dataclass
class Timeline:
    """When each frame is on screen: frame i from ``starts[i]`` (seconds, first frame at 0) until
    the next start, the last one until ``duration``. ``fps`` is the rate of a constant-rate video,
    0 for unevenly timed frames (variable-rate video, animated images)."""
    starts: np.ndarray
    duration: float
    fps: float = 0.0

    @classmethod
    def constant(cls, num_frames: int, fps: float) -> "Timeline":
        return cls(np.arange(num_frames) / fps, num_frames / fps, fps)

    @classmethod
    def from_durations(cls, seconds: list[float]) -> "Timeline":
        ends = np.cumsum(seconds)
        return cls(np.concatenate([[0.0], ends[:-1]]), float(ends[-1]))

    def sample(self, target_fps: float, count: int) -> list[int]:
        """Indices of the frames on screen at t_k = k / target_fps, k = 0.. while t_k < duration,
        at most ``count``; a frame held for several t_k (a merged GIF still) repeats."""
        if target_fps <= 0:
            raise ValueError("frame rates must be positive")
        if self.fps:  # constant rate: the nearest-frame rule prepared datasets were built with
            return sample_indices(len(self.starts), self.fps, target_fps, count)
        t = np.arange(count) / target_fps
        t = t[t < self.duration - _EPS]
        return (np.searchsorted(self.starts, t + _EPS, side="right") - 1).tolist()


def _video_timeline(vr, info: VideoInfo) -> Timeline:
    """Frame start times from decord; the container's constant rate when they are evenly spaced
    or unusable (missing, non-finite, not increasing)."""
    n = info.num_frames
    try:
        ts = np.asarray(vr.get_frame_timestamp(list(range(n))), np.float64).reshape(n, 2)
    except Exception:
        return Timeline.constant(n, info.fps)
    starts = ts[:, 0] - ts[0, 0]
    gaps = np.diff(starts)
    if n < 3 or not np.isfinite(ts).all() or (gaps <= 0).any() or np.ptp(gaps) <= CFR_TOLERANCE_S:
        return Timeline.constant(n, info.fps)
    # decord's end of the last frame is its start plus the packet duration
    end = ts[-1, 1] - ts[0, 0]
    return Timeline(starts, float(end if end > starts[-1] else starts[-1] + np.median(gaps)))


def _frame_seconds(frame: Image.Image) -> float:
    frame.load()  # WebP sets a frame's duration only once it is decoded
    ms = frame.info.get("duration") or 0
    return (ms if ms > 10 else DEFAULT_FRAME_MS) / 1000.0


class Media:
    """A video (decord) or animated GIF / WebP / APNG (Pillow) with its frame ``timeline``;
    frames are decoded on ``read`` only."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix.lower() in ANIMATED_SUFFIXES:
            self._vr = None
            sized = self._pillow(lambda frame: (frame.size, _frame_seconds(frame)))
            (w, h), seconds = sized[0][0], [sec for _, sec in sized]
            self.timeline = Timeline.from_durations(seconds)
            self.info = VideoInfo(w, h, len(seconds) / self.timeline.duration, len(seconds))
        else:
            self._vr = open_video(path)
            self.info = probe(self._vr)
            self.timeline = _video_timeline(self._vr, self.info)

    def _pillow(self, fn, wanted: set[int] | None = None) -> list:
        """``[fn(frame)]`` over the frames in order, only the ``wanted`` indices when given."""
        out, decoded = [], 0
        try:
            with Image.open(self.path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise VideoError("unreadable", f"{self.path.name} is {im.width}x{im.height}, over the "
                                     f"{MAX_IMAGE_PIXELS:,}-pixel limit")
                for i, frame in enumerate(ImageSequence.Iterator(im)):
                    if wanted is None or i in wanted:
                        out.append(fn(frame))
                        if wanted is not None and len(out) == len(wanted):
                            break
                    decoded = i + 1
        except VideoError:
            raise
        except Exception as e:
            raise VideoError("truncated" if decoded else "unreadable",
                             f"{self.path.name}: not a decodable animation ({str(e)[:120]})") from None
        if not out:
            raise VideoError("empty", f"{self.path}: animation has no frames")
        return out

    def read(self, indices: list[int]) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB frames at ``indices`` (repeats allowed)."""
        if self._vr is not None:
            return read_frames(self._vr, indices)
        wanted = sorted(set(indices))
        frames = dict(zip(wanted, self._pillow(lambda frame: np.asarray(frame.convert("RGB")), set(wanted))))
        if len(frames) < len(wanted):
            raise VideoError("truncated", f"{self.path.name}: frames {wanted[len(frames)]}.. could not be decoded")
        return np.stack([frames[i] for i in indices])

    def sample(self, fps: float, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(frames, their times t_k in seconds) sampled by time at ``fps``, at most ``count``."""
        idx = self.timeline.sample(fps, count)
        return self.read(idx), np.arange(len(idx)) / fps


def open_media(path: str | Path) -> Media:
    """Any video or animated image, to sample by time; VideoError('missing' / 'empty' / 'unreadable')."""
    p = Path(path)
    _check_file(p)
    return Media(p)


def is_animated(path: str | Path) -> bool:
    """True for a GIF / WebP / PNG holding more than one frame."""
    try:
        with Image.open(path) as im:
            return bool(getattr(im, "is_animated", False))
    except Exception:
        return False


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
    check_image_header(p, f"image {p}", max_pixels)  # before decoding: a small file can declare gigapixels
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"image {p} is not a readable image ({e})") from None


def check_image_header(source: bytes | str | Path, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an encoded image (bytes or a path) read from its header, nothing decoded.

    Refuses formats outside IMAGE_FORMATS and images over ``max_pixels``; ``name`` starts each message."""
    try:  # Image.open is lazy: it parses the header; pixels are decoded on first use only
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                        formats=IMAGE_FORMATS) as im:
            (w, h), fmt = im.size, im.format
    except Image.DecompressionBombError:  # over Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS)
        raise ValueError(f"{name} declares over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, over the "
                         f"{max_pixels:,}-pixel limit") from None
    except Exception:
        raise ValueError(f"{name} is not a readable image (expected PNG, JPEG, WebP or BMP)") from None
    if w * h > max_pixels:
        raise ValueError(f"{name} is {w}x{h} ({fmt}), over the {max_pixels:,}-pixel limit")
    return w, h


def check_video_header(source: bytes | str | Path, name: str, *, max_frames: int,
                       max_pixels: int = MAX_IMAGE_PIXELS, max_seconds: float = MAX_VIDEO_SECONDS) -> VideoInfo:
    """Size, rate and frame count of a video (encoded bytes or a path) from its container header.

    Refuses what is costly or risky to decode before any decoder runs: a codec outside VIDEO_CODECS,
    more than one video stream, frames over ``max_pixels``, more than ``max_frames`` frames or
    ``max_seconds``, or a length the header does not tell. ``name`` starts each message."""
    import av

    try:
        # skip_frame=all: ffmpeg's stream probe would otherwise decode frames (several, at full size)
        with av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source),
                     options={"skip_frame": "all"}) as c:
            streams = list(c.streams.video)
            s = streams[0] if len(streams) == 1 else None
            if s is not None:
                codec, w, h = s.codec_context.name, s.codec_context.width, s.codec_context.height
                fps = float(s.average_rate or s.guessed_rate or 0)
                seconds = float(s.duration * s.time_base) if s.duration else (c.duration or 0) / av.time_base
                frames = s.frames or int(math.ceil(seconds * fps))  # WebM/MKV headers hold no count
    except Exception:
        raise VideoError("unreadable", f"{name} is not a decodable video (corrupt, truncated or not a video)") from None
    if s is None:
        raise VideoError("unreadable", f"{name} has {len(streams)} video streams; send exactly one")
    if codec not in VIDEO_CODECS:
        raise VideoError("codec", f"{name} is {codec} video; accepted codecs: {', '.join(VIDEO_CODECS)}")
    if w * h > max_pixels:
        raise VideoError("size", f"{name} is {w}x{h} per frame, over the {max_pixels:,}-pixel limit")
    if w * h == 0 or frames <= 0:
        raise VideoError("unreadable", f"{name}: the header tells no frame size or length")
    if frames > max_frames:
        raise VideoError("length", f"{name} has {frames} frames, over the limit of {max_frames}")
    if seconds > max_seconds:
        raise VideoError("length", f"{name} lasts {seconds:.1f} s, over the limit of {max_seconds:g} s")
    return VideoInfo(width=w, height=h, fps=fps, num_frames=frames)


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
