"""Turn one Triton request's tensors into ``generate()`` keyword arguments, or say clearly what is wrong.

No model code: the Python backend calls it with a getter over the request's inputs, and tests call
it directly. Every problem raises ValueError with a message that names the input and the limit.
Sizes are checked before anything is decoded, and image/video headers before their pixels.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

from motioncharacter.video import check_image_header, check_video_header

# Input name -> (Triton type, numpy dtype, optional, default). Defaults follow
# motioncharacter.model.inference.generate; the order is the order in config.pbtxt.
INPUTS: dict[str, tuple[str, type, bool, object]] = {
    "image": ("TYPE_STRING", np.object_, False, None),
    "prompt": ("TYPE_STRING", np.object_, False, None),
    "negative_prompt": ("TYPE_STRING", np.object_, True, ""),
    "action": ("TYPE_STRING", np.object_, True, ""),
    "intensity": ("TYPE_FP32", np.float32, True, 10.0),
    "id_scale": ("TYPE_FP32", np.float32, True, 1.0),      # lambda in the paper
    "motion_scale": ("TYPE_FP32", np.float32, True, 1.0),  # alpha in the paper
    "steps": ("TYPE_INT32", np.int32, True, 30),
    "guidance": ("TYPE_FP32", np.float32, True, 8.0),
    "frames": ("TYPE_INT32", np.int32, True, 16),
    "height": ("TYPE_INT32", np.int32, True, 512),
    "width": ("TYPE_INT32", np.int32, True, 512),
    "seed": ("TYPE_INT64", np.int64, True, 0),
    "face_index": ("TYPE_INT32", np.int32, True, -1),      # -1: exactly one face expected
    # ID-Animator / DreaMoving features (motioncharacter.model.features); -1 / "" = not set
    "mode": ("TYPE_STRING", np.object_, True, ""),         # motioncharacter | id-animator | dreamoving
    "mix_image": ("TYPE_STRING", np.object_, True, b""),   # second identity, encoded image bytes
    "mix_ratio": ("TYPE_FP32", np.float32, True, -1.0),
    "face_weight": ("TYPE_FP32", np.float32, True, -1.0),  # alpha_f (dreamoving)
    "cloth_image": ("TYPE_STRING", np.object_, True, b""), # cloth/body image prompt (dreamoving)
    "cloth_weight": ("TYPE_FP32", np.float32, True, -1.0), # alpha_c
    "pose_video": ("TYPE_STRING", np.object_, True, b""),  # mp4 bytes of pose maps, one per frame
    "pose_keypoints": ("TYPE_STRING", np.object_, True, ""),  # OpenPose-style keypoint JSON
    "depth_video": ("TYPE_STRING", np.object_, True, b""), # mp4 bytes of depth maps
    "pose_scale": ("TYPE_FP32", np.float32, True, 1.0),
    "depth_scale": ("TYPE_FP32", np.float32, True, 1.0),
    "context_length": ("TYPE_INT32", np.int32, True, 0),   # FreeNoise window; 0 = automatic
    "context_stride": ("TYPE_INT32", np.int32, True, 4),
    # SparseCtrl keyframes: one encoded image per keyframe, and the frame index of each
    "sparse_images": ("TYPE_STRING", np.object_, True, ()),
    "sparse_frames": ("TYPE_INT32", np.int32, True, ()),
    "sparse_scale": ("TYPE_FP32", np.float32, True, 1.0),
}
LIST_INPUTS = ("sparse_images", "sparse_frames")  # dims [ -1 ]: any number of values
BYTES_INPUTS = ("image", "mix_image", "cloth_image", "pose_video", "depth_video")
MAX_INTENSITY = 20.0  # motion intensity M is capped at 20 in the data (paper, eq. 7)


@dataclass
class Limits:
    """Per-deployment request limits (config.pbtxt parameters ``limit_*``)."""

    max_frames: int = 32
    max_resolution: int = 512        # largest height or width
    max_steps: int = 100
    max_prompt_chars: int = 1000
    max_image_bytes: int = 20_000_000    # each encoded image
    max_image_pixels: int = 40_000_000   # each image, and each frame of a control video
    max_video_bytes: int = 20_000_000    # each control video (pose_video, depth_video) and pose_keypoints
    max_video_seconds: int = 60          # control videos; their frame count is capped at 4 x max_frames
    max_request_bytes: int = 64_000_000  # all inputs together

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "Limits":
        kw = {f.name: int(params[f"limit_{f.name}"]) for f in fields(cls) if f"limit_{f.name}" in params}
        return cls(**kw)

    def as_parameters(self) -> dict[str, str]:
        return {f"limit_{k}": str(v) for k, v in asdict(self).items()}


def _text(value: np.ndarray, name: str) -> str:
    item = value.reshape(-1)[0]
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"input '{name}' is not valid UTF-8 text") from None
    return str(item)


def _scalar(value: np.ndarray, name: str):
    if value.size != 1:
        raise ValueError(f"input '{name}' must hold exactly one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0]


# Per-input byte caps (Limits field names); every input also counts towards max_request_bytes.
BYTE_LIMITS = {"image": "max_image_bytes", "mix_image": "max_image_bytes", "cloth_image": "max_image_bytes",
               "sparse_images": "max_image_bytes", "pose_video": "max_video_bytes",
               "depth_video": "max_video_bytes", "pose_keypoints": "max_video_bytes"}


def _nbytes(value) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    return np.asarray(value).nbytes


def check_sizes(values: dict, limits: Limits) -> None:
    """Refuse an input, or a request, over its byte limit from sizes alone: before anything is decoded.

    ``values``: input name -> value (a list for LIST_INPUTS). The client runs it before sending too."""
    total = 0
    for name, value in values.items():
        items = list(value) if name in LIST_INPUTS else [value]
        for i, item in enumerate(items):
            n = _nbytes(item)
            total += n
            limit = BYTE_LIMITS.get(name)
            if limit and n > getattr(limits, limit):
                label = f"{name}[{i}]" if name in LIST_INPUTS else name
                raise ValueError(f"input '{label}' is {n:,} bytes, over this server's limit of "
                                 f"{getattr(limits, limit):,} ({limit})")
    if total > limits.max_request_bytes:
        raise ValueError(f"the request's inputs are {total:,} bytes together, over this server's limit of "
                         f"{limits.max_request_bytes:,} (max_request_bytes)")


def decode_image(data: bytes, max_bytes: int, max_pixels: int, name: str = "image") -> np.ndarray:
    """Encoded PNG/JPEG/WebP/BMP bytes -> RGB uint8 (H, W, 3); the header is checked before decoding."""
    import cv2

    if not data:
        raise ValueError(f"input '{name}' is empty: send an encoded PNG or JPEG image")
    if len(data) > max_bytes:
        raise ValueError(f"input '{name}' is {len(data):,} bytes, over this server's limit of {max_bytes:,}")
    # a 60 KB PNG can declare 9000x9000: refuse it before a decoder allocates the pixels
    check_image_header(data, f"input '{name}'", max_pixels)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:  # a valid header over truncated or corrupt pixel data
        raise ValueError(f"input '{name}' is not a readable image (its pixel data does not decode)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# Absolute paths and URIs (s3://bucket/key, file:///...): server internals a client must not see.
_INTERNAL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"]*|(?<![\w.~/-])~?/[^\s'\"(),:;]+")


def scrub(message: str) -> str:
    """``message`` with absolute paths and URIs replaced by <path> / <uri>, for error replies."""
    return _INTERNAL.sub(lambda m: "<uri>" if "://" in m.group() else "<path>", message)


SIZE_INPUTS = ("frames", "height", "width", "steps")  # absent: the served model's own defaults


def model_defaults(params: dict[str, str]) -> dict[str, int]:
    """The served model's generation defaults (config.pbtxt parameters ``default_*``, set by deploy)."""
    return {k: int(params[f"default_{k}"]) for k in SIZE_INPUTS if params.get(f"default_{k}")}


def parse(get: Callable[[str], np.ndarray | None], limits: Limits, defaults: dict | None = None) -> dict:
    """Keyword arguments for ``generate(pipe, **kw)`` from a getter of input arrays (None = absent).

    ``defaults`` (the served model's native frames/height/width/steps) fill absent size inputs."""
    raw = {}
    for name, (_, dtype, optional, default) in INPUTS.items():
        value = get(name)
        if value is None:
            if not optional:
                raise ValueError(f"required input '{name}' is missing")
            raw[name] = (defaults or {}).get(name, default)
            continue
        value = np.asarray(value)
        if name in LIST_INPUTS:
            raw[name] = list(value.reshape(-1))
        elif dtype is np.object_:
            if value.size != 1:
                raise ValueError(f"input '{name}' must hold exactly one value, got shape {list(value.shape)}")
            raw[name] = value.reshape(-1)[0] if name in BYTES_INPUTS else _text(value, name)
        else:
            raw[name] = _scalar(value, name).item()
    check_sizes(raw, limits)

    image = raw["image"]
    if not isinstance(image, (bytes, bytearray)):
        image = str(image).encode()
    kw: dict = {"image": decode_image(bytes(image), limits.max_image_bytes, limits.max_image_pixels)}

    for name in ("prompt", "negative_prompt", "action"):
        text = raw[name]
        if len(text) > limits.max_prompt_chars:
            raise ValueError(f"input '{name}' is {len(text)} characters long, over this server's limit of "
                             f"{limits.max_prompt_chars}")
        kw[name] = text
    if not kw["prompt"].strip():
        raise ValueError("input 'prompt' is empty: describe the video to generate")

    intensity = float(raw["intensity"])
    if not math.isfinite(intensity) or not 0.0 <= intensity <= MAX_INTENSITY:
        raise ValueError(f"input 'intensity' must be a number in [0, {MAX_INTENSITY:g}], got {intensity}")
    kw["intensity"] = intensity
    for name in ("id_scale", "motion_scale", "guidance"):
        v = float(raw[name])
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"input '{name}' must be a finite number >= 0, got {v}")
        kw[name] = v

    def bounded(name: str, lo: int, hi: int, limit_name: str) -> int:
        v = int(raw[name])
        if v < lo:
            raise ValueError(f"input '{name}' must be at least {lo}, got {v}")
        if v > hi:
            raise ValueError(f"input '{name}' is {v}, over this server's limit of {hi} ({limit_name})")
        return v

    kw["steps"] = bounded("steps", 1, limits.max_steps, "max_steps")
    kw["frames"] = bounded("frames", 1, limits.max_frames, "max_frames")
    for name in ("height", "width"):
        v = bounded(name, 8, limits.max_resolution, "max_resolution")
        if v % 8:
            raise ValueError(f"input '{name}' must be a multiple of 8 (the VAE downsamples by 8), got {v}")
        kw[name] = v
    seed = int(raw["seed"])
    if seed < 0:
        raise ValueError(f"input 'seed' must be >= 0, got {seed}")
    kw["seed"] = seed
    face_index = int(raw["face_index"])
    kw["face_index"] = None if face_index < 0 else face_index
    kw.update(parse_features(raw, limits))
    return kw


def parse_features(raw: dict, limits: Limits) -> dict:
    """The feature inputs that were set, as ``inference.generate`` keywords (checked again there)."""
    kw: dict = {}
    if raw["mode"]:
        kw["mode"] = raw["mode"]
    for name in ("mix_image", "cloth_image"):
        data = raw[name]
        data = data.encode() if isinstance(data, str) else bytes(data)
        if data:
            kw[name] = decode_image(data, limits.max_image_bytes, limits.max_image_pixels, name)
    for name in ("pose_video", "depth_video"):
        data = raw[name]
        data = data.encode() if isinstance(data, str) else bytes(data)
        if data:  # decoded later, at the output size (control.load_maps); its header is checked now
            check_video_header(data, f"input '{name}'", max_frames=4 * limits.max_frames,
                               max_pixels=limits.max_image_pixels, max_seconds=limits.max_video_seconds)
            kw[name] = data
    text = raw["pose_keypoints"]
    if text:
        if not text.lstrip().startswith(("[", "{")):  # never a path: a request must not reach the server's files
            raise ValueError("input 'pose_keypoints' must be OpenPose-style JSON text")
        kw["pose_keypoints"] = text
    for name in ("mix_ratio", "face_weight", "cloth_weight"):
        v = float(raw[name])
        if v != -1.0:
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"input '{name}' must be a finite number >= 0 (or -1 for unset), got {v}")
            kw[name] = v
    for name in ("pose_scale", "depth_scale"):
        v = float(raw[name])
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"input '{name}' must be a finite number >= 0, got {v}")
        if v != 1.0:
            kw[name] = v
    images, frames = raw["sparse_images"], [int(f) for f in raw["sparse_frames"]]
    if images or frames:
        if len(images) != len(frames):
            raise ValueError(f"inputs 'sparse_images' ({len(images)}) and 'sparse_frames' ({len(frames)}) "
                             "must have one frame index per keyframe image")
        if len(images) > limits.max_frames:
            raise ValueError(f"{len(images)} SparseCtrl keyframes, over this server's limit of {limits.max_frames}")
        kw["sparse_images"] = [decode_image(d.encode() if isinstance(d, str) else bytes(d), limits.max_image_bytes,
                                            limits.max_image_pixels, f"sparse_images[{k}]")
                               for k, d in enumerate(images)]
        kw["sparse_frames"] = frames
    v = float(raw["sparse_scale"])
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"input 'sparse_scale' must be a finite number >= 0, got {v}")
    if v != 1.0:
        kw["sparse_scale"] = v
    if int(raw["context_length"]) < 0:
        raise ValueError(f"input 'context_length' must be >= 0 (0 = automatic), got {int(raw['context_length'])}")
    if int(raw["context_length"]):
        kw["context_length"] = int(raw["context_length"])
    if int(raw["context_stride"]) != 4:
        kw["context_stride"] = int(raw["context_stride"])
    return kw
