"""TEMPORARY stand-in for motioncharacter.model.inference, used only until the real module lands.

It keeps the agreed signatures (load_pipeline / generate) so the Triton plumbing can be tested;
the backend switches to the real module automatically once it exists. Delete this file then.
"""
from __future__ import annotations

import numpy as np


def load_pipeline(weights=None, preset=None, device="cpu", arcface_pack=None):
    return {"weights": weights, "preset": preset, "device": device}


def generate(pipe, *, image, prompt, negative_prompt="", action="", intensity=10.0, id_scale=1.0,
             motion_scale=1.0, steps=25, guidance=8.0, frames=16, height=512, width=512, seed=0,
             face_index=None, progress=None):
    from motioncharacter.faces import detector

    if not prompt:
        raise ValueError("prompt is empty")
    detector().one(np.asarray(image), "reference image", face_index)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((frames, height, width, 3)).astype(np.float32)
    for i in range(steps):
        x = 0.9 * x + 0.1 * np.tanh(x)  # some work per step
        if progress:
            progress(i + 1, steps)
    return np.clip((x + 2) * 64, 0, 255).astype(np.uint8)
