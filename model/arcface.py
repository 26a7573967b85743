"""A differentiable ArcFace for the ID-consistency loss (paper eq. 4), and the face alignment it needs.

The network comes from the user's insightface model pack (e.g. ``buffalo_l/w600k_r50.onnx``):
the recognition ONNX is converted to a torch module with onnx2torch, so gradients reach the
decoded frames. The same module embeds the reference, so phi(I) and phi(X_i) share one space.

Input convention of insightface's recogniser: a face aligned by a similarity transform of its
5 landmarks onto the 112 x 112 ArcFace template, RGB (insightface swaps cv2's BGR to RGB before
the network), scaled as (x - 127.5) / 127.5, which is exactly our [-1, 1] RGB frames. Old MXNet
exports normalise inside the graph (a Sub and a Mul among the first nodes) and take 0..255.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .losses import TorchFaceEmbedder

# The standard 5-point ArcFace template at 112 x 112 (insightface's ``arcface_dst``), in pixel
# coordinates with pixel centres at integers (cv2's convention): the eye, eye, nose tip, mouth
# corner, mouth corner as they appear from image left to right. YuNet's landmark order (the
# subject's right eye first, which is the image-left one) matches it.
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]])
# names insightface packs give their recognition models (buffalo_*: w600k_*, antelopev2: glintr100)
RECOGNITION_NAMES = ("w600k", "glint", "arc")


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (scale, rotation, translation; no reflection) mapping ``src`` to
    ``dst``: (..., K, 2) points -> (..., 2, 3) matrices [[a, -b, tx], [b, a, ty]].

    The linear parametrisation covers every scale x rotation, so its least-squares solution is
    the same minimiser Umeyama's method (skimage's SimilarityTransform) finds. Closed form:
    centre both sets; a = sum(s.d) / sum|s|^2, b = sum(s x d) / sum|s|^2."""
    src, dst = src.float(), dst.to(src.device).float().expand_as(src)
    ms, md = src.mean(-2, keepdim=True), dst.mean(-2, keepdim=True)
    s, d = src - ms, dst - md
    norm = (s ** 2).sum((-1, -2)).clamp_min(1e-12)
    a = (s * d).sum((-1, -2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(-1) / norm
    tx = md[..., 0, 0] - (a * ms[..., 0, 0] - b * ms[..., 0, 1])
    ty = md[..., 0, 1] - (b * ms[..., 0, 0] + a * ms[..., 0, 1])
    return torch.stack([torch.stack([a, -b, tx], -1), torch.stack([b, a, ty], -1)], -2)


def _pixel_to_normalized(size_hw: tuple[int, int], device) -> torch.Tensor:
    """3x3 matrix: pixel coordinates (centres at integers) -> grid_sample's [-1, 1], align_corners=False."""
    h, w = size_hw
    return torch.tensor([[2.0 / w, 0, 1.0 / w - 1], [0, 2.0 / h, 1.0 / h - 1], [0, 0, 1]], device=device)


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = 112,
                template: torch.Tensor | None = None) -> torch.Tensor:
    """Warp each image so its 5 landmarks land on the ArcFace template (differentiable in the images).

    ``images`` (N, C, H, W); ``landmarks`` (N, 5, 2) in that image's pixel coordinates. Returns
    (N, C, size, size), like insightface's ``norm_crop`` (cv2.warpAffine, bilinear) but through
    affine_grid/grid_sample. Outside the image reads 0 (mid-grey in [-1, 1]; cv2 pads black),
    which only a face at the frame's border reaches."""
    if images.ndim != 4 or landmarks.shape != (images.shape[0], 5, 2):
        raise ValueError(f"align_faces wants images (N, C, H, W) and landmarks (N, 5, 2), got "
                         f"{tuple(images.shape)} and {tuple(landmarks.shape)}")
    dev = images.device
    dst = (ARCFACE_TEMPLATE if template is None else template).to(dev) * (size / 112.0)
    m = similarity_transform(landmarks.to(dev), dst)                       # source px -> output px
    a, b, t = m[:, 0, 0], m[:, 1, 0], m[:, :, 2:]
    # its inverse (output px -> source px) in closed form; degenerate landmarks (all equal) give a
    # huge but finite map that reads only padding, instead of a singular-matrix error
    r = torch.stack([torch.stack([a, b], -1), torch.stack([-b, a], -1)], -2) / (a * a + b * b).clamp_min(
        1e-12)[:, None, None]
    bottom = torch.tensor([0.0, 0.0, 1.0], device=dev).expand(m.shape[0], 1, 3)
    inv = torch.cat([torch.cat([r, -r @ t], -1), bottom], 1)
    theta = _pixel_to_normalized(images.shape[-2:], dev) @ inv @ torch.linalg.inv(
        _pixel_to_normalized((size, size), dev))
    # sampled in float32: in bf16 the grid alone would be off by up to a pixel of a 512-px frame
    grid = F.affine_grid(theta[:, :2], [images.shape[0], images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(images.dtype)


def find_recognition_onnx(path: str | os.PathLike) -> Path:
    """The recognition model of an insightface pack: ``path`` itself when it is an .onnx file,
    else the one .onnx in the folder named like a recogniser (e.g. buffalo_l's w600k_r50.onnx)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() != ".onnx":
            raise ValueError(f"{p} is not an .onnx file; give the recognition model (e.g. w600k_r50.onnx) "
                             "or the pack folder holding it")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"face model {p} does not exist (give an insightface pack folder or its "
                                "recognition .onnx, e.g. buffalo_l/w600k_r50.onnx)")
    found = sorted(x for x in p.glob("*.onnx") if any(n in x.name.lower() for n in RECOGNITION_NAMES))
    if not found:
        have = ", ".join(sorted(x.name for x in p.glob("*.onnx"))) or "no .onnx files"
        raise FileNotFoundError(f"no ArcFace recognition model in {p} (it holds {have}); expected e.g. "
                                "w600k_r50.onnx from insightface's buffalo_l pack")
    return found[0]


def _normalizes_inside(graph) -> bool:
    """insightface's own test: a Sub and a Mul among the first 8 nodes mean the graph scales its
    input itself, so it wants raw 0..255 pixels (MXNet-era exports)."""
    names = [n.name for n in graph.node[:8]]
    return (any(n.startswith(("Sub", "_minus")) for n in names)
            and any(n.startswith(("Mul", "_mul")) for n in names))


class ArcFace(TorchFaceEmbedder):
    """An insightface recognition ONNX as a torch module: aligned faces (N, 3, 112, 112), RGB in
    [-1, 1] -> L2-normalised embeddings (N, dim). Other sizes are resized bilinearly first (a
    fallback; align with ``align_faces`` for meaningful embeddings). Frozen; gradients flow to
    the input."""

    def __init__(self, onnx_path: str | os.PathLike):
        super().__init__()
        import onnx
        from onnx2torch import convert

        path = find_recognition_onnx(onnx_path)
        model = onnx.load(str(path))
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] not in (0, 3):
            raise ValueError(f"{path} takes input of shape {dims}; a face recogniser takes (N, 3, 112, 112)")
        self.input_size = dims[2] or 112
        self.raw_pixels = _normalizes_inside(model.graph)
        self.net = convert(model)
        self.name = f"arcface:{path.name}"
        self.source = str(path)
        self.requires_grad_(False).eval()
        with torch.no_grad():
            self.dim = int(self.net(torch.zeros(1, 3, self.input_size, self.input_size)).reshape(1, -1).shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        x = images * 127.5 + 127.5 if self.raw_pixels else images
        return F.normalize(self.net(x).reshape(images.shape[0], -1).float(), dim=-1)
