"""The ``tiny`` preset: small random models in the real diffusers/transformers classes.

Sizes follow ../shared/ENVIRONMENT.md (UNet channels (32, 64), cross-attention only on the
half-resolution block, 8 frames, 32x32 latents -> 64x64 pixels) so every code path runs
on a CPU in seconds. The tokenizer is the real 49,408-token CLIP BPE, built offline from
the vocabulary file that the open_clip wheel ships.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import torch

TINY = {
    "frames": 8,
    "height": 64,
    "width": 64,
    "steps": 4,
    "text_dim": 32,
    "face_dim": 128,  # SFace, the offline embedder
}
PRESETS = ("tiny", "mini")
MINI_ENV = "MOTIONCHARACTER_MINI"
MINI_DEFAULT = "outputs/learn/mini"  # where `motioncharacter demo --learn` leaves it


def mini_weights() -> str:
    """The ``mini`` preset: small models *trained on this machine* (``demo --learn`` or ``train-base``),
    found at $MOTIONCHARACTER_MINI or ./outputs/learn/mini (base + the trained adapter). Unlike ``tiny`` (random weights,
    for plumbing tests) it is a trained model, though tiny and not a quality model."""
    import os

    from motioncharacter import storage

    uri = os.environ.get(MINI_ENV) or MINI_DEFAULT
    if not storage.exists(storage.join(uri, "motioncharacter.json")):
        raise FileNotFoundError(f"the mini preset is trained on this machine and {uri} holds none yet: run "
                                f"`motioncharacter demo --learn` (about an hour on 2 cores), or set {MINI_ENV} to a "
                                "folder written by `motioncharacter train-base`, or pass --weights")
    return uri


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet: printable bytes map to themselves, the rest are
    # shifted above 255 so every byte has a visible, non-whitespace character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """The real CLIP tokenizer (49,408 tokens, 77 positions), with no download."""
    import open_clip
    from transformers import CLIPTokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    # CLIP uses the first 49,152 - 256 - 2 merges of this file (line 0 is a header).
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def tiny_unet_config() -> dict:
    return dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY["text_dim"], attention_head_dim=8, norm_num_groups=16,
    )


def build_tiny(seed: int = 0) -> dict:
    """Random tiny components keyed like the diffusers folder layout (plus ``scheduler``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        motion_adapter = MotionAdapter(
            block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
            motion_norm_num_groups=16, motion_max_seq_length=32, use_motion_mid_block=False,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=64,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=TINY["text_dim"], intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY["text_dim"],
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=32,
        ))
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = DDIMScheduler(**animatediff_scheduler_config())
    return dict(unet=unet, motion_adapter=motion_adapter, vae=vae, text_encoder=text_encoder,
                tokenizer=clip_tokenizer(), image_encoder=image_encoder,
                feature_extractor=feature_extractor, scheduler=scheduler)


def animatediff_scheduler_config() -> dict:
    # AnimateDiff's recommended DDIM settings (linear betas, no sample clipping).
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                clip_sample=False, steps_offset=1, timestep_spacing="linspace", set_alpha_to_one=False)


def save_tiny_weights(directory: str | Path, seed: int = 0, with_adapter: bool = True) -> Path:
    """Write a tiny weights folder in the real diffusers layout (safetensors only):
    unet/, motion_adapter/, vae/, text_encoder/, tokenizer/, image_encoder/,
    feature_extractor/, scheduler/ and (``with_adapter``) adapter/."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    parts = build_tiny(seed)
    for name in ("unet", "motion_adapter", "vae", "text_encoder", "image_encoder"):
        parts[name].save_pretrained(d / name, safe_serialization=True)
    for name in ("tokenizer", "feature_extractor", "scheduler"):
        parts[name].save_pretrained(d / name)
    if with_adapter:
        from .adapter import MotionCharacterAdapter
        from .motion_module import motion_unet

        unet = motion_unet(parts["unet"], parts["motion_adapter"])
        MotionCharacterAdapter.for_unet(unet, clip_image_dim=32, face_dim=TINY["face_dim"], seed=seed).save_pretrained(
            d / "adapter", safe_serialization=True)
    return d
