"""Numeric precision of a loaded pipeline: ``fp32 | fp16 | bf16 | auto``, one place for every surface.

    pipe = load_pipeline(weights=..., device="cuda", dtype="fp16")   # generate --dtype, deploy --dtype,
                                                                     # evaluate --set generation.dtype=...
What runs in which precision (``apply`` and ``MotionCharacterPipeline.denoise``):
* the UNet with its motion modules, the adapter, the text and image encoders, and whatever loads
  later on first use (face adapter, Content Guider, ControlNets: they follow ``pipe.unet.dtype``) run
  in the chosen dtype; conditioning tensors are cast where they enter those modules;
* the latents, classifier-free guidance and the scheduler's arithmetic stay fp32 (each UNet call gets
  a cast copy of its input, its prediction comes back as fp32);
* the VAE runs in fp32 when ``vae_upcast`` (default: on for fp16, whose range ends at 65504: the SD VAE
  decoder's activations pass that, as diffusers' ``force_upcast`` says; bf16 has fp32's range);
* the face embedders (SFace/ArcFace on ONNX) and the eq. 5-7 motion measurement work on uint8 frames
  in fp32/float64 whatever the pipeline's dtype.

``auto`` is fp16 on CUDA and fp32 on a CPU. fp16 on a CPU is refused (ValueError), never run in
another precision under the fp16 name: CPUs compute fp16 by converting it, slowly; bf16 runs natively
on CPUs with AVX-512 BF16 / AMX.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

DTYPES = ("auto", "fp32", "fp16", "bf16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def check(name) -> str:
    """``name`` if it is one of DTYPES, else a ValueError naming the choices."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return name


def resolve(name: str | None, device) -> torch.dtype:
    """The torch dtype that ``name`` (None = auto) means on ``device``; fp16 on a CPU is refused."""
    name = check(name or "auto")
    kind = torch.device(device).type
    if name == "auto":
        return torch.float16 if kind == "cuda" else torch.float32
    if name == "fp16" and kind == "cpu":
        raise ValueError("dtype fp16 needs an accelerator (e.g. --device cuda): a CPU has no fp16 arithmetic. "
                         "On a CPU use bf16 (native on AVX-512 BF16 / AMX CPUs), fp32, or auto (= fp32 here)")
    return TORCH_DTYPES[name]


def name_of(dtype: torch.dtype) -> str:
    return NAMES.get(dtype, str(dtype).replace("torch.", ""))


def apply(pipe, dtype: torch.dtype, vae_upcast: bool | None = None) -> None:
    """Cast ``pipe``'s modules to ``dtype``, the VAE to fp32 when ``vae_upcast`` (None: only for fp16)."""
    upcast = dtype == torch.float16 if vae_upcast is None else bool(vae_upcast)
    with quiet_diffusers():  # its ModelMixin.to warns on every dtype cast, even with nothing to keep in fp32
        pipe.to(dtype=dtype)
        if upcast:
            pipe.vae.to(dtype=torch.float32)
    pipe.vae_upcast = upcast


@contextmanager
def quiet_diffusers():
    """diffusers' warnings off inside the block (for its warnings about its own calls)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def running(pipe) -> str:
    """The precision the pipeline's UNet runs in ("bf16", ...): what servers and logs report."""
    return name_of(pipe.unet.dtype)
