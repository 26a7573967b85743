"""Optional weights the metrics use, loaded from local paths or s3:// URIs; nothing is downloaded.

- CLIP (CLIP-I, CLIP-T, action adherence) through open_clip: either a folder in open_clip's
  hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``, e.g. a copy of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), or a checkpoint file plus ``clip_model`` naming
  an open_clip architecture (``ViT-H-14``).
- RAFT (VBench dynamic degree): torchvision ``raft_large`` state dict, via the prepare stage's loader.
- AMT (VBench motion smoothness) and DOVER: neither ships as a package, so they are accepted as
  TorchScript exports with a fixed calling convention (documented on each class).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class ClipScorer:
    """Unit-norm CLIP embeddings of RGB uint8 images and of texts."""

    def __init__(self, weights: str, model_name: str = ""):
        import open_clip
        import torch

        from motioncharacter.storage import local_copy

        path = local_copy(weights)
        if path.is_dir():
            if not (path / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"CLIP weights folder {weights} has no open_clip_config.json "
                                        "(expected open_clip's hub layout)")
            name, pretrained = f"local-dir:{path}", None
        else:
            if not model_name:
                raise ValueError(f"CLIP checkpoint file {weights} needs --clip-model (an open_clip architecture, "
                                 "e.g. ViT-H-14)")
            name, pretrained = model_name, str(path)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                              weights_only=True)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self._torch = torch
        self.name = Path(str(weights).rstrip("/")).name

    def images(self, rgb: np.ndarray) -> np.ndarray:
        from PIL import Image

        frames = rgb if rgb.ndim == 4 else rgb[None]
        x = self._torch.stack([self.preprocess(Image.fromarray(np.ascontiguousarray(f))) for f in frames])
        with self._torch.inference_mode():
            e = self.model.encode_image(x).float()
        return (e / e.norm(dim=-1, keepdim=True)).numpy()

    def texts(self, texts: list[str]) -> np.ndarray:
        with self._torch.inference_mode():
            e = self.model.encode_text(self.tokenizer(texts)).float()
        return (e / e.norm(dim=-1, keepdim=True)).numpy()


def _load_torchscript(uri: str, what: str):
    import torch

    from motioncharacter.storage import local_copy

    path = local_copy(uri)
    try:
        m = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ValueError(f"{what} {uri} is not a TorchScript file ({str(e)[:120]})") from None
    return m.eval()


class AMTInterpolator:
    """AMT frame interpolation from a TorchScript export: ``model(img0, img1, embt)`` with
    img (1,3,H,W) float in [0,1] and embt (1,1,1,1) = 0.5 returns the middle frame (1,3,H,W)
    in [0,1] (AMT's own forward returns a dict; export a wrapper returning ``['imgt_pred']``)."""

    name = "amt"

    def __init__(self, uri: str):
        self.model = _load_torchscript(uri, "AMT model")

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        import torch

        def t(x):
            return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float() / 255.0

        with torch.inference_mode():
            out = self.model(t(a), t(b), torch.full((1, 1, 1, 1), 0.5))
        return np.clip(out[0].permute(1, 2, 0).numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)


class DoverScorer:
    """DOVER from a TorchScript export: ``model(video)`` with video (T,H,W,3) uint8 RGB returns the
    fused overall score in [0,1] (the export does DOVER's own fragment/resize sampling inside)."""

    name = "dover"

    def __init__(self, uri: str):
        self.model = _load_torchscript(uri, "DOVER model")

    def __call__(self, frames: np.ndarray) -> float:
        import torch

        with torch.inference_mode():
            return float(self.model(torch.from_numpy(np.ascontiguousarray(frames))).reshape(-1)[0])
