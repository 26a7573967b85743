"""Speed and memory options: each one is connected (it changes what runs), and the ones that
promise the same output give it. Speed itself is measured in bench/, never asserted here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serving_fixtures import face_image

REQ = dict(prompt="a person talking", action="talking", intensity=12.0, steps=4, frames=4, height=64, width=64,
           seed=3, guidance=4.0)


def _pipe(**acc):
    from motioncharacter.model.acceleration import Acceleration
    from motioncharacter.model.inference import load_pipeline

    pipe = load_pipeline(preset="tiny", acceleration=Acceleration(**{"cache_interval": 1, **acc}))  # one option at a time
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a non-zero adapter, so every MotionCharacter branch shapes the output
        for p in pipe.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pipe


@pytest.fixture(scope="module")
def baseline():
    from motioncharacter.model.inference import generate

    pipe = _pipe()
    return generate(pipe, image=face_image(), **REQ)


def _gen(**acc):
    from motioncharacter.model.inference import generate

    return generate(_pipe(**acc), image=face_image(), **REQ)


def test_shallow_branch_on_its_own_cached_state_equals_the_full_unet():
    """The cached step's arithmetic: at the same input and timestep the shallow branch, reading the
    state the full pass kept, must give the full UNet's output, for every branch depth."""
    from motioncharacter.model.deepcache import FeatureCache

    unet = _pipe().unet
    torch.manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 3, 8, 8)
    text = torch.randn(6, 77, unet.config.cross_attention_dim)
    shapes = []  # the skip connections' shapes, for ControlNet-style residuals on each of them
    hooks = [unet.conv_in.register_forward_hook(lambda m, a, out: shapes.append(out.shape))]
    hooks += [b.register_forward_hook(lambda m, a, out: shapes.extend(r.shape for r in out[1]))
              for b in unet.down_blocks]
    with torch.no_grad():
        unet(x, 10, encoder_hidden_states=text)
        for h in hooks:
            h.remove()
        for residuals in (None, [torch.randn(s) * 0.5 for s in shapes]):
            kw = dict(encoder_hidden_states=text, down_block_additional_residuals=residuals)
            ref = unet(x, 10, **kw).sample
            for depth in range(1, len(unet.up_blocks[-1].resnets) + 1):
                cache = FeatureCache(unet, 2, depth)
                full = cache.predict(0, x, 10, **kw)
                shallow = cache.predict(1, x, 10, **kw)
                assert (cache.full_steps, cache.shallow_steps) == (1, 1)
                torch.testing.assert_close(full, ref)
                torch.testing.assert_close(shallow, ref, rtol=1e-5, atol=1e-5)
                later = cache.predict(1, x, 500, **kw)  # another timestep: the deep part is reused
                assert not torch.allclose(later, ref)


def test_cache_interval_skips_the_deep_blocks(baseline):
    from motioncharacter.model.inference import generate

    pipe = _pipe(cache_interval=2)
    calls = []
    hook = pipe.unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        frames = generate(pipe, image=face_image(), **REQ)
    finally:
        hook.remove()
    assert len(calls) == 2  # steps 0 and 2 of 4 run the deep blocks
    assert frames.shape == baseline.shape and not np.array_equal(frames, baseline)
    assert np.abs(frames.astype(int) - baseline).mean() < 20  # an approximation, not another video


def _first_ff(unet):
    """A spatial transformer block's feed-forward layer (diffusers' FeedForward)."""
    return next(m.ff for n, m in unet.named_modules()
                if type(m).__name__ == "BasicTransformerBlock" and "motion_modules" not in n)


# option -> (the module whose inputs show the option at work, the size that input has: off, on)
ENGAGED = {
    "vae_slicing": (lambda p: p.vae.decoder, lambda a: a[0].shape[0], (REQ["frames"], 1)),  # frames per decode
    "ff_chunking": (lambda p: _first_ff(p.unet), lambda a: a[0].shape[1], (None, 1)),  # tokens per ff call
}


@pytest.mark.parametrize("option", ["split_guidance", "vae_slicing", "ff_chunking"])
def test_memory_options_keep_the_output(baseline, option):
    frames = _gen(**{option: True})
    assert np.abs(frames.astype(int) - baseline).max() <= 1


@pytest.mark.parametrize("option", sorted(ENGAGED))
def test_memory_options_engage(option):
    """Equal output alone would pass with the option ignored: each option must change what its layer
    receives (one frame per VAE decode; one token per feed-forward call)."""
    from motioncharacter.model.inference import generate

    module, size, (off, on) = ENGAGED[option]
    seen = {}
    for enabled in (False, True):
        pipe = _pipe(**{option: enabled})
        sizes = seen[enabled] = []
        hook = module(pipe).register_forward_pre_hook(lambda m, a: sizes.append(size(a)))
        try:
            generate(pipe, image=face_image(), **{**REQ, "steps": 1})
        finally:
            hook.remove()
    assert seen[False] and seen[True]
    assert set(seen[True]) == {on}, f"{option} on: the layer saw sizes {sorted(set(seen[True]))}"
    assert off is None and max(seen[False]) > on or set(seen[False]) == {off}


def _rows_seen(pipe, modules, req=REQ):
    """The video ``pipe`` generates for ``req``, and the batch rows each call of ``modules`` received."""
    from motioncharacter.model.inference import generate

    rows = []
    hooks = [m.register_forward_hook(lambda mod, a, out: rows.append(a[0].shape[0])) for m in modules]
    try:
        return generate(pipe, image=face_image(), **req), rows
    finally:
        for h in hooks:
            h.remove()


def test_split_guidance_runs_the_unet_per_half():
    pipe = _pipe(split_guidance=True)
    assert _rows_seen(pipe, [pipe.unet.conv_in])[1] == [REQ["frames"]] * (2 * REQ["steps"])


def test_split_frames_runs_spatial_layers_on_chunks_with_the_same_video():
    """FreeNoise split inference on a 20-frame video (sliding windows) with guidance: the spatial
    layers see at most N frames per call, the video is the same as unsplit, and 0 switches it off."""
    from motioncharacter.model.acceleration import split_frames

    req = {**REQ, "frames": 20, "steps": 2}
    pipe = _pipe(split_guidance=True)
    names = sorted(pipe.unet.state_dict())
    layers = [pipe.unet.down_blocks[0].resnets[0].norm1, pipe.unet.down_blocks[1].attentions[0].proj_in]

    def run():
        return _rows_seen(pipe, layers, req)

    whole, whole_rows = run()
    split_frames(pipe.unet, 6)
    chunked, rows = run()
    assert set(whole_rows) == {20} and max(rows) == 6 and sum(rows) == sum(whole_rows)
    assert np.abs(chunked.astype(int) - whole).max() <= 1
    assert sorted(pipe.unet.state_dict()) == names  # the layers are wrapped in place, not replaced
    split_frames(pipe.unet, 0)
    assert set(run()[1]) == {20}


def test_split_frames_implies_split_guidance():
    """Each UNet call must hold one video when rows are chunked (the conditioning is per video)."""
    pipe = _pipe(split_frames=2)
    frames, batches = _rows_seen(pipe, [pipe.unet.conv_in])
    assert batches == [REQ["frames"]] * (2 * REQ["steps"])
    # the option itself reaches the spatial layers: 2 frames per call (not the 4 of the video)
    spatial = [pipe.unet.down_blocks[0].resnets[0].norm1, pipe.unet.down_blocks[1].attentions[0].proj_in]
    assert set(_rows_seen(pipe, spatial)[1]) == {2}
    assert np.abs(frames.astype(int) - _gen(split_guidance=True)).max() <= 1


def test_action_tokens_eot_reads_only_the_phrase(baseline):
    pipe = _pipe(action_tokens="eot")
    emb = pipe.encode_action("talking")
    assert emb.shape[1] == pipe.token_count("talking") < 77
    assert not np.array_equal(_gen(action_tokens="eot"), baseline)


def test_options_are_checked_and_travel_as_strings():
    from motioncharacter.model.acceleration import Acceleration

    assert Acceleration().cache_interval == 3  # on by default (the README has its measured effect)
    a = Acceleration(cache_interval=3, vae_slicing=True, action_tokens="eot")
    assert Acceleration.from_params(a.to_params()) == a
    for bad, name in ((dict(cache_interval=0), "cache_interval"), (dict(cache_interval=2.5), "cache_interval"),
                      (dict(action_tokens="some"), "action_tokens"), (dict(vae_slicing="yes"), "vae_slicing"),
                      (dict(split_frames=-1), "split_frames"), (dict(split_frames=True), "split_frames")):
        with pytest.raises(ValueError, match=name):
            Acceleration(**bad).check()
    with pytest.raises(ValueError, match="cache_depth"):
        _pipe(cache_interval=2, cache_depth=9)
    with pytest.raises(ValueError, match="cpu_offload"):
        _pipe(cpu_offload=True)


def test_cache_with_controlnets_guidance_and_sliding_windows():
    """DeepCache and split guidance inside the feature path: a pose ControlNet, CFG and FreeNoise
    windows (20 frames > the 16-frame training length) together."""
    import json

    from motioncharacter.fixtures import package_face
    from motioncharacter.model.acceleration import Acceleration
    from motioncharacter.model.inference import generate, load_pipeline

    pipe = load_pipeline(preset="tiny", acceleration=Acceleration(cache_interval=1))
    kp = json.dumps([[[[0.5, 0.1 + 0.02 * i, 1.0]] * 18] for i in range(20)])
    req = dict(image=package_face("grace_hopper"), prompt="a person", steps=3, guidance=4.0, frames=20, height=64,
               width=64, seed=0, pose_keypoints=kp)
    plain = generate(pipe, **req)
    calls = []
    hook = pipe.unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    pipe.acceleration = Acceleration(cache_interval=3, split_guidance=True)  # the per-step options
    try:
        fast = generate(pipe, **req)
    finally:
        hook.remove()
        pipe.acceleration = Acceleration(cache_interval=1)
    assert fast.shape == plain.shape == (20, 64, 64, 3)
    assert len(calls) == 2  # of three steps only the first runs the deep blocks, once per guidance half
    assert np.abs(fast.astype(int) - plain).mean() < 20
