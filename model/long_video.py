"""Videos longer than the motion module's training length (DreaMoving extends AnimateDiff's
motion blocks to 64 frames): sliding context windows through diffusers' FreeNoise.

``sliding_windows(pipe, context_length, stride)`` enables ``AnimateDiffPipeline.enable_free_noise``
for one generation: the motion modules attend within overlapping windows of ``context_length``
frames (blended with pyramid weights) and the initial noise is a shuffled repetition of one
window's noise, so windows agree.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

MAX_FRAMES = 256  # long-video ceiling (64 in DreaMoving; memory grows linearly with frames)


TRAINED_FRAMES = 16  # AnimateDiff's motion modules learn on 16-frame clips (positions go to 32)


def training_length(pipe) -> int:
    """Frames one window may hold: the clip length the motion modules were trained on."""
    return min(TRAINED_FRAMES, int(getattr(pipe.unet.config, "motion_max_seq_length", 32) or 32))


def check_context(frames: int, context_length, context_stride: int, max_length: int) -> int | None:
    """The context length to use (None: no windows), or ValueError naming the bad option."""
    if context_length is None:
        if frames <= max_length:
            return None
        context_length = min(TRAINED_FRAMES, max_length)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or not 1 <= context_length <= max_length:
        raise ValueError(f"context_length must be an integer in [1, {max_length}] (the motion module's training "
                         f"length), got {context_length!r}")
    if isinstance(context_stride, bool) or not isinstance(context_stride, int) or not 1 <= context_stride <= context_length:
        raise ValueError(f"context_stride must be an integer in [1, context_length={context_length}], "
                         f"got {context_stride!r}")
    return context_length


@contextmanager
def sliding_windows(pipe, context_length: int | None, context_stride: int = 4):
    if context_length is None:
        yield
        return
    # enable_free_noise reads motion_adapter.config for a warning only; load_pipeline merged the
    # adapter into the UNet, so stand in with its length (object.__setattr__: not a pipeline module).
    object.__setattr__(pipe, "motion_adapter", types.SimpleNamespace(
        config=types.SimpleNamespace(motion_max_seq_length=training_length(pipe))))
    try:
        pipe.enable_free_noise(context_length=context_length, context_stride=context_stride)
        yield
    finally:
        object.__setattr__(pipe, "motion_adapter", None)
        _disable(pipe)


def _disable(pipe) -> None:
    # diffusers 0.42's disable_free_noise also visits a mid block without motion modules and fails
    # on UNets built with use_motion_mid_block=False; restore only the blocks that have them.
    pipe._free_noise_context_length = None
    for block in [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]:
        if getattr(block, "motion_modules", None) is not None:
            pipe._disable_free_noise_in_block(block)
