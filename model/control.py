"""Structure control with diffusers' own ControlNet classes.

* DreaMoving's Video ControlNet: a pose or depth map per frame (a video of maps, or OpenPose-style
  18-keypoint JSON rendered here) through a ``ControlNetModel`` (per frame, as in diffusers'
  AnimateDiffControlNetPipeline) or a ``SparseControlNetModel`` (a ControlNet with motion modules);
  pose and depth together sum their residuals, each with its own scale (MultiControlNet).
* ID-Animator's combination with SparseCtrl: a few keyframe images at given frame indices through a
  ``SparseControlNetModel`` (the other frames are masked out).
A ControlNet with scale 0 is not run at all, so the output is exactly the uncontrolled one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# OpenPose COCO-18 order: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist,
# r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear.
NUM_KEYPOINTS = 18
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
# One colour per limb/joint (hue wheel), as pose ControlNets are trained on coloured skeletons.
COLORS = [tuple(int(c) for c in np.round(255 * np.array(__import__("colorsys").hsv_to_rgb(i / 18, 1, 1))))
          for i in range(18)]
KINDS = ("pose", "depth", "sparse")


# ---- pose maps from keypoints --------------------------------------------------------------
def parse_keypoints(data, allow_path: bool = False) -> list[np.ndarray]:
    """OpenPose-style keypoint JSON -> per frame an array (people, 18, 3) of x, y in [0, 1] and confidence.

    Accepted: ``{"width": W, "height": H, "frames": [...]}`` (pixel coordinates on a W x H canvas) or
    a bare list of frames (coordinates normalised to [0, 1]). A frame is OpenPose's
    ``{"people": [{"pose_keypoints_2d": [x, y, c] * 18}]}`` or a list of people, each 18 [x, y(, c)].
    ``data`` is a JSON string or the parsed object; a path only with ``allow_path`` (the user's own
    file on the command line): for a request, the answer must not depend on the server's files.
    """
    if allow_path and isinstance(data, (str, Path)) and not str(data).lstrip().startswith(("[", "{")):
        p = Path(data)
        if not p.is_file():
            raise FileNotFoundError(f"pose keypoints {p}: no such file")
        data = p.read_text()
    if isinstance(data, Path):
        raise ValueError("pose keypoints must be OpenPose-style JSON text, not a path")
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"pose keypoints are not valid JSON: {e}") from None
        except RecursionError:  # "[[[[..." nested deeper than Python's stack
            raise ValueError("pose keypoints JSON is nested too deeply") from None
    canvas = None
    if isinstance(data, dict):
        if "frames" not in data:
            raise ValueError("pose keypoints JSON object needs a 'frames' list (and 'width'/'height' for pixels)")
        if "width" in data or "height" in data:
            canvas = (float(data.get("width", 0)), float(data.get("height", 0)))
            if min(canvas) <= 0:
                raise ValueError("pose keypoints 'width' and 'height' must both be positive")
        data = data["frames"]
    if not isinstance(data, list) or not data:
        raise ValueError("pose keypoints must hold a non-empty list of frames")
    frames = []
    for i, frame in enumerate(data):
        people = frame.get("people", []) if isinstance(frame, dict) else frame
        if not isinstance(people, list):  # e.g. [5]: a frame must be a list of people
            raise ValueError(f"pose keypoints frame {i}: expected a list of people or {{'people': [...]}}, "
                             f"got {type(people).__name__}")
        arrs = []
        for person in people:
            if isinstance(person, dict):
                person = person.get("pose_keypoints_2d", [])
            try:
                a = np.asarray(person, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"pose keypoints frame {i}: keypoints must be numbers") from None
            if a.ndim == 1 and a.size == NUM_KEYPOINTS * 3:
                a = a.reshape(NUM_KEYPOINTS, 3)
            if a.ndim != 2 or a.shape[0] != NUM_KEYPOINTS or a.shape[1] not in (2, 3):
                raise ValueError(f"pose keypoints frame {i}: each person needs {NUM_KEYPOINTS} keypoints "
                                 f"[x, y] or [x, y, confidence], got shape {list(a.shape)}")
            if a.shape[1] == 2:
                a = np.concatenate([a, np.ones((NUM_KEYPOINTS, 1))], axis=1)
            if not np.isfinite(a).all():
                raise ValueError(f"pose keypoints frame {i}: non-finite coordinates")
            if canvas:
                a[:, 0] /= canvas[0]
                a[:, 1] /= canvas[1]
            elif (a[a[:, 2] > 0, :2] > 1.0001).any():
                raise ValueError(f"pose keypoints frame {i}: coordinates above 1 but no canvas size; give "
                                 "'width' and 'height' for pixel coordinates")
            arrs.append(a)
        frames.append(np.stack(arrs) if arrs else np.zeros((0, NUM_KEYPOINTS, 3)))
    return frames


def render_pose(people: np.ndarray, height: int, width: int) -> np.ndarray:
    """(people, 18, 3) normalised keypoints -> RGB uint8 (H, W, 3) skeleton on black.
    Keypoints with confidence <= 0 are missing; a limb needs both of its ends."""
    import cv2

    img = np.zeros((height, width, 3), np.uint8)
    thick = max(1, round(min(height, width) / 128))
    for person in people:
        pts = [(int(round(x * (width - 1))), int(round(y * (height - 1)))) if c > 0 else None for x, y, c in person]
        for k, (a, b) in enumerate(LIMBS):
            if pts[a] is not None and pts[b] is not None:
                cv2.line(img, pts[a], pts[b], COLORS[k], 2 * thick, lineType=cv2.LINE_AA)
        for k, p in enumerate(pts):
            if p is not None:
                cv2.circle(img, p, 2 * thick, COLORS[k], -1, lineType=cv2.LINE_AA)
    return img


def pose_maps_from_keypoints(data, frames: int, height: int, width: int, name: str = "pose keypoints",
                             allow_path: bool = False) -> np.ndarray:
    kps = parse_keypoints(data, allow_path)
    if len(kps) != frames:
        raise ValueError(f"{name} has {len(kps)} frames but {frames} frames are requested (--frames)")
    return np.stack([render_pose(k, height, width) for k in kps])


# ---- maps from videos ----------------------------------------------------------------------
def load_maps(video, frames: int, height: int, width: int, name: str) -> np.ndarray:
    """A video of control maps (path, encoded bytes or a (F, H, W, 3) uint8 array) -> (F, H, W, 3)
    uint8 at the output size; its frame count must equal ``frames``."""
    import cv2

    if isinstance(video, np.ndarray):
        arr = video
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{name} must be uint8 frames (F, H, W, 3), got {arr.dtype} {list(arr.shape)}")
    else:
        arr = _decode_maps(video, frames, height, width, name)
    if arr.shape[0] != frames:
        raise ValueError(f"{name} has {arr.shape[0]} frames but {frames} frames are requested (--frames)")
    if arr.shape[1:3] != (height, width):
        arr = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in arr])
    return arr


def _decode_maps(video, frames: int, height: int, width: int, name: str) -> np.ndarray:
    """Encoded bytes or a path -> (N, height, width, 3) uint8, N <= frames + 1 (one more tells a longer
    video). The header is checked first; each frame is scaled to the output size as it is decoded,
    so memory holds the output size, never the video's."""
    import io

    import av

    from motioncharacter.video import check_video_header

    check_video_header(video, name, max_frames=4 * frames)  # slack: a header's count may be an estimate
    out = []
    src = io.BytesIO(video) if isinstance(video, (bytes, bytearray)) else str(video)
    try:
        with av.open(src, options={"skip_frame": "all"}) as c:  # probe without decoding, as in the check
            for frame in c.decode(c.streams.video[0]):
                out.append(frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA"))
                if len(out) > frames:
                    break
    except av.FFmpegError as e:
        raise ValueError(f"{name}: decoding failed after {len(out)} frames ({str(e)[:120]})") from None
    if len(out) != frames:
        n = f"more than {frames}" if len(out) > frames else len(out)
        raise ValueError(f"{name} has {n} frames but {frames} frames are requested (--frames)")
    return np.stack(out)


# ---- the ControlNet models -----------------------------------------------------------------
def tiny_controlnet(kind: str, seed: int = 0):
    """A random ControlNet for the tiny preset's UNet (zero convolutions randomised, the conditioning
    embedding's included, so it acts and its maps or keyframes show in the video)."""
    from diffusers import ControlNetModel, SparseControlNetModel

    from .presets import tiny_unet_config

    cfg = tiny_unet_config()
    common = dict(block_out_channels=cfg["block_out_channels"], layers_per_block=1, norm_num_groups=16,
                  cross_attention_dim=cfg["cross_attention_dim"], attention_head_dim=8,
                  conditioning_embedding_out_channels=(8, 16))  # one stride-2 step: the tiny VAE's factor 2
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "sparse":
            model = SparseControlNetModel(conditioning_channels=3, down_block_types=("DownBlockMotion",
                                          "CrossAttnDownBlockMotion"), motion_max_seq_length=32,
                                          motion_num_attention_heads=2, use_simplified_condition_embedding=False,
                                          **common)
        else:
            model = ControlNetModel(down_block_types=cfg["down_block_types"], **common)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                    "controlnet_cond_embedding.conv_out")):  # the maps' own zero conv too
                    p.normal_(0, 0.05)
    return model.eval()


def load_controlnet(uri: str, allow_pickle: bool = False):
    """A ControlNetModel or SparseControlNetModel folder (local or s3://), class read from config.json."""
    from diffusers import ControlNetModel, SparseControlNetModel

    from motioncharacter import storage

    from .loading import refuse_pickles

    folder = Path(storage.local_copy(uri))
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{uri} is not a ControlNet folder (no config.json)")
    cls_name = json.loads(cfg.read_text()).get("_class_name")
    classes = {"ControlNetModel": ControlNetModel, "SparseControlNetModel": SparseControlNetModel}
    if cls_name not in classes:
        raise ValueError(f"{uri}: {cls_name!r} is not a ControlNetModel or SparseControlNetModel")
    refuse_pickles(folder, allow_pickle)
    return classes[cls_name].from_pretrained(folder, use_safetensors=None if allow_pickle else True).eval()


@dataclass
class Control:
    """One ControlNet with its conditioning: ``maps`` (F, H, W, 3) uint8 for every frame, or for a
    sparse control the keyframe images with ``indices`` (the frames they belong to)."""

    name: str
    model: object
    maps: np.ndarray
    scale: float = 1.0
    indices: list[int] | None = None

    @property
    def sparse(self) -> bool:
        return type(self.model).__name__ == "SparseControlNetModel"


def prepare(control: Control, num_frames: int, vae=None) -> dict:
    """Tensors the ControlNet reads, computed once per generation."""
    m = control.model
    images = torch.from_numpy(control.maps).to(m.device, m.dtype).permute(0, 3, 1, 2) / 255.0  # (K, 3, H, W)
    if not control.sparse:
        return {"cond": images}
    indices = control.indices if control.indices is not None else list(range(num_frames))
    if m.config.use_simplified_condition_embedding:  # SparseCtrl RGB reads VAE latents of the keyframes
        images = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
        images = images.to(m.dtype)
    k, c, h, w = images.shape
    cond = torch.zeros(1, c, num_frames, h, w, dtype=m.dtype, device=m.device)
    mask = torch.zeros(1, 1, num_frames, h, w, dtype=m.dtype, device=m.device)
    cond[0, :, indices] = images.permute(1, 0, 2, 3)
    mask[0, :, indices] = 1
    return {"cond": cond, "mask": mask}


def residuals(controls: list[tuple[Control, dict]], latents: torch.Tensor, t, text: torch.Tensor):
    """Summed (down residuals, mid residual) for the UNet, or (None, None). ``latents`` (B, C, F, h, w)
    is the UNet input (CFG batch included); ``text`` the per-frame text embeddings (B*F, 77, D)."""
    down = mid = None
    b, _, f = latents.shape[:3]
    for control, tensors in controls:
        if control.scale == 0:
            continue
        m = control.model
        if control.sparse:
            d, md = m(latents.to(m.dtype), t, encoder_hidden_states=text.to(m.dtype),
                      controlnet_cond=tensors["cond"].expand(b, -1, -1, -1, -1),
                      conditioning_mask=tensors["mask"].expand(b, -1, -1, -1, -1),
                      conditioning_scale=control.scale, return_dict=False)
        else:
            sample = latents.permute(0, 2, 1, 3, 4).reshape(b * f, *latents.shape[1:2], *latents.shape[3:])
            d, md = m(sample.to(m.dtype), t, encoder_hidden_states=text.to(m.dtype),
                      controlnet_cond=tensors["cond"].repeat(b, 1, 1, 1), conditioning_scale=control.scale,
                      return_dict=False)
        if down is None:
            down, mid = list(d), md
        else:  # MultiControlNet: residuals add up
            down = [x + y for x, y in zip(down, d)]
            mid = mid + md
    return down, mid
