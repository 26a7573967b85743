"""ID-Animator's released face adapter (animator.ckpt) converted into --mode id-animator.

Synthetic checkpoints in the published layout: at SD1.5 widths on the meta device (key names,
processor indices and shapes, no memory), and at tiny widths with random numbers, where the
converted adapter must compute what the published processor computes (written out by hand here)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from motioncharacter.model.id_animator_release import (adapter_from_state_dict, convert_release,
                                                       convert_state_dict, released_processor_order)

LORAS = ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora")


def published(width: int, clip_dim: int, queries: int, inner: int, depth: int, rank: int,
              layers: dict[int, int], make) -> dict:
    """A checkpoint as the release writes it: image_proj + face_adapter keyed by processor index
    (``layers``: index -> the layer's hidden size). ``make(shape)`` makes a tensor."""
    proj = {"latents": make((1, queries, width)), "proj_in.weight": make((width, clip_dim)),
            "proj_in.bias": make((width,)), "proj_out.weight": make((width, width)), "proj_out.bias": make((width,)),
            "norm_out.weight": make((width,)), "norm_out.bias": make((width,))}
    for i in range(depth):
        for n in ("norm1", "norm2"):
            proj[f"layers.{i}.0.{n}.weight"], proj[f"layers.{i}.0.{n}.bias"] = make((width,)), make((width,))
        proj[f"layers.{i}.0.to_q.weight"] = make((inner, width))
        proj[f"layers.{i}.0.to_kv.weight"] = make((2 * inner, width))
        proj[f"layers.{i}.0.to_out.weight"] = make((width, inner))
        proj[f"layers.{i}.1.0.weight"], proj[f"layers.{i}.1.0.bias"] = make((width,)), make((width,))
        proj[f"layers.{i}.1.1.weight"] = make((4 * width, width))
        proj[f"layers.{i}.1.3.weight"] = make((width, 4 * width))
    face = {}
    for idx, h in layers.items():
        for name, fan_in in (("to_q_lora", h), ("to_k_lora", width), ("to_v_lora", width), ("to_out_lora", h)):
            face[f"{idx}.{name}.down.weight"] = make((rank, fan_in))
            face[f"{idx}.{name}.up.weight"] = make((h, rank))
        face[f"{idx}.to_k_face.weight"] = make((h, width))
        face[f"{idx}.to_v_face.weight"] = make((h, width))
    return {"image_proj": proj, "face_adapter": face}


# ---- SD1.5 widths, meta tensors ------------------------------------------------------------------

# the release's rule (hidden size from the block: down i -> channels[i], up i -> reversed[i], mid -> last),
# with the processor list down 0..11, up 12..29, mid 30..31 and the weights on the odd (attn2) entries
SD15 = {1: 320, 3: 320, 5: 640, 7: 640, 9: 1280, 11: 1280, 13: 1280, 15: 1280, 17: 1280, 19: 640, 21: 640,
        23: 640, 25: 320, 27: 320, 29: 320, 31: 1280}


@pytest.fixture(scope="module")
def sd15_unet():
    from diffusers import UNetMotionModel

    with torch.device("meta"):  # SD1.5 + AnimateDiff widths, no memory
        return UNetMotionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2)


def _meta(shape):
    return torch.empty(shape, device="meta")


def test_release_processor_order_at_sd15(sd15_unet):
    order = released_processor_order(sd15_unet)
    assert len(order) == 32 and not any("motion_modules" in n for n in order)
    assert [i for i, n in enumerate(order) if n.endswith("attn2")] == list(range(1, 32, 2))
    assert order[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert order[11] == "down_blocks.2.attentions.1.transformer_blocks.0.attn2"
    assert order[13] == "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    assert order[29] == "up_blocks.3.attentions.2.transformer_blocks.0.attn2"
    assert order[31] == "mid_block.attentions.0.transformer_blocks.0.attn2"  # the UNet registers mid last
    # our UNetMotionModel also lists its motion-module attentions; the release's UNet does not
    assert len(sd15_unet.attn_processors) > 32


def test_sd15_release_converts_to_our_layout(sd15_unet):
    from accelerate import init_empty_weights

    from motioncharacter.model.face_adapter import IDAnimatorFaceAdapter

    raw = published(768, 1280, 16, 768, 4, 128, SD15, _meta)
    sd = convert_state_dict(raw, sd15_unet)
    assert len(sd) == len(raw["image_proj"]) + len(raw["face_adapter"])
    assert sd["image_proj.queries"].shape == (1, 16, 768)
    assert sd["image_proj.attn.3.norm_x.weight"] is raw["image_proj"]["layers.3.0.norm1.weight"]
    assert sd["image_proj.ff.2.3.weight"] is raw["image_proj"]["layers.2.1.3.weight"]
    mid = "layers.mid_block__attentions__0__transformer_blocks__0__attn2"
    assert sd[f"{mid}.to_v_face.weight"] is raw["face_adapter"]["31.to_v_face.weight"]
    up = "layers.up_blocks__1__attentions__0__transformer_blocks__0__attn2"
    assert sd[f"{up}.to_q_lora.down.weight"] is raw["face_adapter"]["13.to_q_lora.down.weight"]
    from motioncharacter.model.id_animator_release import _config

    cfg = _config(sd, sd15_unet)
    assert (cfg["resampler_depth"], cfg["resampler_heads"], cfg["resampler_dim_head"], cfg["resampler_ff_mult"],
            cfg["num_queries"], cfg["lora_rank"], cfg["clip_hidden_dim"]) == (4, 12, 64, 4, 16, 128, 1280)
    with init_empty_weights():
        model = IDAnimatorFaceAdapter(**cfg)
    model.load_state_dict(sd, strict=True, assign=True)  # every name and shape fits

    # what is wrong is named, in the release's own key names
    bad = copy.deepcopy(raw)
    del bad["face_adapter"]["31.to_v_face.weight"]
    with pytest.raises(ValueError, match=r"missing face_adapter\.31\.to_v_face\.weight"):
        convert_state_dict(bad, sd15_unet)
    bad = copy.deepcopy(raw)
    bad["face_adapter"]["5.to_k_face.weight"] = _meta((320, 768))
    with pytest.raises(ValueError, match=r"face_adapter\.5\.to_k_face\.weight is \(320, 768\), expected \(640, 768\)"):
        convert_state_dict(bad, sd15_unet)
    bad = copy.deepcopy(raw)
    bad["face_adapter"]["4.to_k_face.weight"] = _meta((640, 768))
    with pytest.raises(ValueError, match=r"face_adapter\.4\.to_k_face\.weight \(processor 4 is .*attn1"):
        convert_state_dict(bad, sd15_unet)
    with pytest.raises(ValueError, match="unexpected keys vae.decoder"):
        convert_state_dict({"vae.decoder.weight": _meta((1,))}, sd15_unet)


# ---- tiny widths, numbers -------------------------------------------------------------------------

# the tiny preset's spatial transformers: down_blocks.1 (0, 1), up_blocks.0 x2 (2-5), mid (6, 7); all 64 wide
TINY_ATTN2 = {1: "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
              3: "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
              5: "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
              7: "mid_block.attentions.0.transformer_blocks.0.attn2"}
N_FACE, INNER, HEADS = 4, 128, 2  # the resampler: 2 heads of the release's 64


@pytest.fixture(scope="module")
def tiny():
    from motioncharacter.model.motion_module import motion_unet
    from motioncharacter.model.presets import build_tiny

    p = build_tiny(seed=0)
    g = torch.Generator().manual_seed(3)
    raw = published(32, 32, N_FACE, INNER, 2, 8, {i: 64 for i in TINY_ATTN2},
                    lambda s: torch.randn(s, generator=g) * 0.2)
    return motion_unet(p["unet"], p["motion_adapter"]).eval(), raw


def _lora(w, name, x):
    return x @ w[f"{name}.down.weight"].T @ w[f"{name}.up.weight"].T


def _mha(q, k, v, heads):
    b, n, d = q.shape
    split = (lambda t: t.reshape(b, -1, heads, d // heads).transpose(1, 2))
    a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return (a @ split(v)).transpose(1, 2).reshape(b, n, d)


def reference_resampler(p: dict, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """The release's image_proj on its own keys, written out."""
    ln = (lambda t, k: F.layer_norm(t, t.shape[-1:], p[f"{k}.weight"], p[f"{k}.bias"]))
    lat = p["latents"].expand(x.shape[0], -1, -1)
    x = x @ p["proj_in.weight"].T + p["proj_in.bias"]
    for i in range(depth):
        xn, ln_lat = ln(x, f"layers.{i}.0.norm1"), ln(lat, f"layers.{i}.0.norm2")
        q = ln_lat @ p[f"layers.{i}.0.to_q.weight"].T
        k, v = (torch.cat([xn, ln_lat], 1) @ p[f"layers.{i}.0.to_kv.weight"].T).chunk(2, -1)
        b, n, d = q.shape
        split = (lambda t: t.reshape(b, -1, heads, d // heads).transpose(1, 2))
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), -1)
        lat = lat + (a @ split(v)).transpose(1, 2).reshape(b, n, d) @ p[f"layers.{i}.0.to_out.weight"].T
        h = F.gelu(ln(lat, f"layers.{i}.1.0") @ p[f"layers.{i}.1.1.weight"].T)
        lat = lat + h @ p[f"layers.{i}.1.3.weight"].T
    return ln(lat @ p["proj_out.weight"].T + p["proj_out.bias"], "norm_out")


class ReferenceFaceProcessor:
    """The release's LoRA face cross-attention for one layer, on its own keys: face tokens are the
    last N_FACE of encoder_hidden_states; LoRA on q/k/v/out; face attention added before to_out."""

    def __init__(self, w: dict, scale: float):
        self.w, self.scale = w, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        w, h = self.w, hidden_states
        text, face = encoder_hidden_states[:, :-N_FACE], encoder_hidden_states[:, -N_FACE:]
        q = attn.to_q(h) + _lora(w, "to_q_lora", h)
        k, v = attn.to_k(text) + _lora(w, "to_k_lora", text), attn.to_v(text) + _lora(w, "to_v_lora", text)
        z = _mha(q, k, v, attn.heads) + self.scale * _mha(q, face @ w["to_k_face.weight"].T,
                                                           face @ w["to_v_face.weight"].T, attn.heads)
        return attn.to_out[0](z) + _lora(w, "to_out_lora", z)


def _layer(raw, idx):
    return {k.split(".", 1)[1]: v for k, v in raw["face_adapter"].items() if k.split(".")[0] == str(idx)}


def test_tiny_release_computes_what_the_published_processor_computes(tiny, tmp_path):
    from motioncharacter.model.content_guider import GuiderConditioning
    from motioncharacter.model.features import guider_class

    unet, raw = tiny
    assert {i: n for i, n in enumerate(released_processor_order(unet)) if n.endswith("attn2")} == TINY_ATTN2
    torch.save(raw, tmp_path / "animator.ckpt")
    with pytest.raises(ValueError, match="allow_pickle"):
        convert_release(str(tmp_path / "animator.ckpt"), unet, allow_pickle=False)
    sd = convert_release(str(tmp_path / "animator.ckpt"), unet, allow_pickle=True)
    # the training-checkpoint layout converts to the same weights
    flat = {f"module.image_proj_model.{k}": v for k, v in raw["image_proj"].items()}
    flat |= {f"module.adapter_modules.{k}": v for k, v in raw["face_adapter"].items()}
    assert all(torch.equal(v, sd[k]) for k, v in convert_state_dict({"state_dict": flat}, unet).items())
    # saved as face_adapter/ and read back the way --mode id-animator reads it
    adapter_from_state_dict(sd, unet).save_pretrained(tmp_path / "face_adapter", safe_serialization=True)
    folder = tmp_path / "face_adapter"
    adapter = guider_class(folder).from_pretrained(folder, use_safetensors=True).eval()

    g = torch.Generator().manual_seed(5)
    clip = torch.randn(1, 17, 32, generator=g)
    with torch.no_grad():
        tokens = adapter.face_tokens(clip)
        torch.testing.assert_close(tokens, reference_resampler(raw["image_proj"], clip, 2, HEADS), atol=1e-5, rtol=1e-4)

    frames, scale = 4, 0.8
    sample, t = torch.randn(1, 4, frames, 32, 32, generator=g), torch.tensor(400)
    text = torch.randn(1, 77, 32, generator=g)
    ours_unet, ref_unet = copy.deepcopy(unet), copy.deepcopy(unet)
    adapter.attach(ours_unet)
    mods = dict(ref_unet.named_modules())
    for idx, name in TINY_ATTN2.items():
        mods[name].set_processor(ReferenceFaceProcessor(_layer(raw, idx), scale))
    with torch.no_grad():
        ours = ours_unet(sample, t, encoder_hidden_states=text.repeat_interleave(frames, 0),
                         cross_attention_kwargs=GuiderConditioning(tokens, None, scale).kwargs()).sample
        appended = torch.cat([text, tokens], 1)  # the release's input: face tokens after the text tokens
        ref = ref_unet(sample, t, encoder_hidden_states=appended.repeat_interleave(frames, 0)).sample
        stock = unet(sample, t, encoder_hidden_states=text.repeat_interleave(frames, 0)).sample
    assert (ref - stock).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
