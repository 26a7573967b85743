"""MotionCharacter network on the tiny preset: stock equivalence, conditioning effects,
frozen base, save/load, pipeline validation."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from motioncharacter.model.adapter import MotionCharacterAdapter
from motioncharacter.model.attention import MCConditioning
from motioncharacter.model.losses import region_aware_loss
from motioncharacter.model.motion_module import motion_unet, validate_intensity
from motioncharacter.model.presets import build_tiny, clip_tokenizer

F_, TXT = 8, 32


@pytest.fixture(scope="module")
def parts():
    p = build_tiny(seed=0)
    p["unet"] = motion_unet(p["unet"], p["motion_adapter"]).eval()
    return p


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(sample=torch.randn(1, 4, F_, 32, 32, generator=g), t=torch.tensor(500),
                text=torch.randn(1, 77, TXT, generator=g).repeat_interleave(F_, 0),
                clip=torch.randn(1, 32, generator=g), face=torch.randn(1, 128, generator=g),
                action=torch.randn(1, 77, TXT, generator=g))


def _randomize(adapter, seed=3, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return adapter


def _run(unet, x, cond=None):
    kw = {} if cond is None else {"cross_attention_kwargs": cond.kwargs()}
    return unet(x["sample"], x["t"], encoder_hidden_states=x["text"], **kw).sample


@pytest.fixture(scope="module")
def stock_out(parts, inputs):
    with torch.no_grad():
        return _run(parts["unet"], inputs)


def _mc_unet(parts, adapter):
    unet = copy.deepcopy(parts["unet"])
    adapter.attach(unet)
    return unet


def test_processors_only_on_spatial_cross_attention(parts):
    ad = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128)
    assert sorted(ad.config.layer_dims) == sorted([
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
    ])
    assert all("motion_modules" not in n and n.endswith("attn2") for n in ad.config.layer_dims)
    assert len(ad.config.layer_dims) == 4


def test_untrained_adapter_leaves_stock_output(parts, inputs, stock_out):
    ad = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128, seed=0)
    unet = _mc_unet(parts, ad)
    with torch.no_grad():
        cond = ad.conditioning(clip_embeds=inputs["clip"], face_embeds=inputs["face"],
                               action_embeds=inputs["action"], intensity=[12.0], id_scale=1.0, motion_scale=1.0)
        out = _run(unet, inputs, cond)
    assert torch.equal(out, stock_out)


def test_lambda_alpha_zero_equals_stock_with_trained_weights(parts, inputs, stock_out):
    ad = _randomize(MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128))
    unet = _mc_unet(parts, ad)
    with torch.no_grad():
        # lambda = alpha = 0 and no action phrase: ID and motion branches contribute nothing.
        cond = ad.conditioning(clip_embeds=inputs["clip"], face_embeds=inputs["face"], intensity=[12.0],
                               id_scale=0.0, motion_scale=0.0)
        assert torch.allclose(_run(unet, inputs, cond), stock_out, atol=1e-6)
        # and a non-zero lambda does change it (the test above is not vacuous)
        cond.id_scale = 1.0
        assert not torch.allclose(_run(unet, inputs, cond), stock_out, atol=1e-3)


def test_intensity_and_action_each_change_output(parts, inputs):
    ad = _randomize(MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128))
    unet = _mc_unet(parts, ad)
    tok, te = clip_tokenizer(), parts["text_encoder"]

    def action(text):
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return te(ids).last_hidden_state

    with torch.no_grad():
        base = dict(clip_embeds=inputs["clip"], face_embeds=inputs["face"])
        a = _run(unet, inputs, ad.conditioning(**base, action_embeds=action("talking"), intensity=[2.0]))
        b = _run(unet, inputs, ad.conditioning(**base, action_embeds=action("talking"), intensity=[15.0]))
        c = _run(unet, inputs, ad.conditioning(**base, action_embeds=action("turning head"), intensity=[2.0]))
        a2 = _run(unet, inputs, ad.conditioning(**base, action_embeds=action("talking"), intensity=[2.0]))
    assert torch.equal(a, a2)  # deterministic, so the differences below come from the inputs
    assert (a - b).abs().max() > 1e-3, "intensity had no effect"
    assert (a - c).abs().max() > 1e-3, "action phrase had no effect"


def test_frozen_base_only_adapter_gets_gradients(parts, inputs):
    unet = copy.deepcopy(parts["unet"]).train()
    unet.requires_grad_(False)
    ad = _randomize(MotionCharacterAdapter.for_unet(unet, clip_image_dim=32, face_dim=128)).train()
    ad.attach(unet)
    cond = ad.conditioning(clip_embeds=inputs["clip"], face_embeds=inputs["face"], action_embeds=inputs["action"],
                           intensity=[7.0])
    pred = _run(unet, inputs, cond)
    region_aware_loss(pred, torch.zeros_like(pred), torch.full((F_, 64, 64), 1.25)).backward()
    assert all(p.grad is None for p in unet.parameters())
    no_grad = [n for n, p in ad.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"adapter parameters without gradient: {no_grad[:5]}"


def test_adapter_save_load_identical(parts, inputs, tmp_path):
    from motioncharacter.model.loading import load_adapter, save_adapter

    ad = _randomize(MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128))
    save_adapter(ad, str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "diffusion_pytorch_model.safetensors").is_file()
    ad2 = load_adapter(tmp_path / "adapter")
    outs = []
    for a in (ad, ad2):
        unet = _mc_unet(parts, a)
        with torch.no_grad():
            outs.append(_run(unet, inputs, a.conditioning(clip_embeds=inputs["clip"], face_embeds=inputs["face"],
                                                          action_embeds=inputs["action"], intensity=[9.0])))
    assert torch.equal(outs[0], outs[1])


def test_pickled_adapter_refused_unless_allowed(parts, tmp_path):
    from motioncharacter.model.loading import load_adapter

    ad = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128)
    ad.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(ValueError, match="allow_pickle"):
        load_adapter(tmp_path)
    assert load_adapter(tmp_path, allow_pickle=True).config.face_dim == 128


def test_adapter_refuses_other_unet(parts):
    from diffusers import UNet2DConditionModel

    from motioncharacter.model.presets import tiny_unet_config

    other_cfg = tiny_unet_config() | {"down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                      "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    other = motion_unet(UNet2DConditionModel(**other_cfg), parts["motion_adapter"])
    ad = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128)
    with pytest.raises(ValueError, match="does not match"):
        ad.attach(other)


def test_conditioning_batch_must_divide(parts, inputs):
    ad = _randomize(MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128))
    unet = _mc_unet(parts, ad)
    cond = MCConditioning(id_tokens=torch.randn(3, 4, TXT))
    with pytest.raises(ValueError, match="does not divide"):
        _run(unet, inputs, cond)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 20.5, "5", None, True])
def test_intensity_validation(bad):
    with pytest.raises(ValueError, match="intensity"):
        validate_intensity(bad)


def test_intensity_bounds_accepted():
    assert validate_intensity(0) == 0.0 and validate_intensity(20.0) == 20.0


def test_tokenizer_is_real_clip():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# ---- pipeline ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from motioncharacter.model.inference import load_pipeline

    return load_pipeline(preset="tiny")


@pytest.fixture(scope="module")
def hopper():
    import os

    import matplotlib

    from motioncharacter.video import load_image

    return load_image(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data/sample_data/grace_hopper.jpg"))


TINY = dict(steps=2, frames=8, height=64, width=64)


def test_generate_tiny_frames_and_seed(pipe, hopper):
    from motioncharacter.model.inference import generate

    seen = []
    a = generate(pipe, image=hopper, prompt="a woman talking", action="talking", intensity=8.0, seed=3,
                 progress=lambda i, n: seen.append((i, n)), **TINY)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert seen == [(1, 2), (2, 2)]
    b = generate(pipe, image=hopper, prompt="a woman talking", action="talking", intensity=8.0, seed=3, **TINY)
    assert np.array_equal(a, b)
    c = generate(pipe, image=hopper, prompt="a woman talking", action="talking", intensity=8.0, seed=4, **TINY)
    assert not np.array_equal(a, c)
    assert pipe.face_embedder.name == "sface"


@pytest.mark.parametrize("kw,name", [
    ({"intensity": float("nan")}, "intensity"), ({"intensity": 25.0}, "intensity"),
    ({"id_scale": float("inf")}, "id_scale"), ({"motion_scale": -1.0}, "motion_scale"),
    ({"steps": 0}, "num_inference_steps"), ({"frames": 0}, "num_frames"), ({"frames": 500}, "num_frames"),
    ({"height": 66}, "height"), ({"width": 100000}, "width"), ({"seed": -1}, "seed"),
    ({"guidance": float("nan")}, "guidance_scale"), ({"prompt": "  "}, "prompt"), ({"action": 3}, "action"),
    ({"image": np.zeros((64, 64), np.uint8)}, "image"), ({"image": np.zeros((8000, 6000, 3), np.uint8)}, "pixel"),
])
def test_generate_rejects_bad_arguments(pipe, hopper, kw, name):
    from motioncharacter.model.inference import generate

    args = dict(image=hopper, prompt="a woman", **TINY) | kw
    with pytest.raises(ValueError, match=name):
        generate(pipe, **args)


def test_generate_no_face(pipe):
    from motioncharacter.faces import FaceError
    from motioncharacter.model.inference import generate

    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    with pytest.raises(FaceError, match="no face"):
        generate(pipe, image=noise, prompt="a person", **TINY)


def test_long_prompt_warns(pipe, hopper, caplog):
    from motioncharacter.model.inference import generate

    with caplog.at_level("WARNING", logger="motioncharacter.model"):
        generate(pipe, image=hopper, prompt="a woman talking " * 40, **TINY | {"steps": 1})
    assert any("truncated" in r.message for r in caplog.records)


def test_weights_folder_matches_tiny_preset(pipe, hopper, tmp_path):
    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.model.presets import save_tiny_weights

    d = save_tiny_weights(tmp_path / "w")
    assert not [p for p in d.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt")]
    loaded = load_pipeline(weights=str(d))
    kw = dict(image=hopper, prompt="a woman talking", action="talking", intensity=5.0, seed=1, **TINY)
    a, b = generate(pipe, **kw).astype(int), generate(loaded, **kw).astype(int)
    # identical weights and configs; float summation order may differ by one uint8 step
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_load_pipeline_argument_errors(tmp_path):
    from motioncharacter.model.inference import load_pipeline

    with pytest.raises(ValueError, match="exactly one"):
        load_pipeline()
    with pytest.raises(ValueError, match="unknown preset"):
        load_pipeline(preset="huge")
    with pytest.raises(FileNotFoundError, match="missing unet"):
        load_pipeline(weights=str(tmp_path))


def test_pickled_base_weights_refused(tmp_path):
    from motioncharacter.model.loading import load_components
    from motioncharacter.model.presets import save_tiny_weights

    d = save_tiny_weights(tmp_path / "w", with_adapter=False)
    st = d / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(st), d / "vae" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(ValueError, match="pickled"):
        load_components(str(d))


def _capture_unet_calls(pipe):
    """Wrap pipe.unet.forward to record (inputs, text, cond, output) of every call."""
    calls, inner = [], pipe.unet.forward

    def spy(sample, t, encoder_hidden_states=None, cross_attention_kwargs=None, **kw):
        out = inner(sample, t, encoder_hidden_states=encoder_hidden_states,
                    cross_attention_kwargs=cross_attention_kwargs, **kw)
        calls.append((sample.clone(), t, encoder_hidden_states.clone(), out.sample.clone()))
        return out
    return calls, spy


def test_cfg_unconditional_branch_is_base_model(hopper):
    """Through the pipeline, with a non-zero adapter (biases included): the unconditional half of
    the guidance batch is exactly the base model's prediction for the negative prompt, while the
    conditional half differs from it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from motioncharacter.model.acceleration import Acceleration
    from motioncharacter.model.inference import generate, load_pipeline

    pipe = load_pipeline(preset="tiny", acceleration=Acceleration(cache_interval=1))  # every step a full UNet call
    _randomize(pipe.adapter)
    assert float(next(iter(pipe.adapter.mc_layers.values())).out_motion.bias.detach().abs().sum()) > 0
    calls, spy = _capture_unet_calls(pipe)
    pipe.unet.forward = spy
    try:
        generate(pipe, image=hopper, prompt="a woman talking", action="talking", intensity=12.0, guidance=5.0,
                 **TINY)
    finally:
        del pipe.unet.forward
    assert len(calls) == TINY["steps"]
    stock = copy.deepcopy(pipe.unet)
    stock.set_attn_processor(AttnProcessor2_0())  # the base AnimateDiff UNet, no adapter at all
    f = TINY["frames"]
    for sample, t, text, out in calls:
        with torch.inference_mode():
            base = stock(sample[:1], t, encoder_hidden_states=text[:f]).sample
            base_cond = stock(sample[1:], t, encoder_hidden_states=text[f:]).sample
        uncond, cond = out.chunk(2)
        assert torch.allclose(uncond, base, atol=1e-5), float((uncond - base).abs().max())
        assert not torch.allclose(cond, base_cond, atol=1e-3)


def test_empty_action_means_no_action_branch(parts, inputs):
    """An empty action phrase gives the same output as no action tokens at all (no out-projection
    bias), in the pipeline's encoding and in training's per-sample keep mask."""
    from motioncharacter.model.inference import load_pipeline

    pipe = load_pipeline(preset="tiny")
    assert pipe.encode_action("") is None and pipe.encode_action("  ") is None
    ad = _randomize(MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128))
    unet = _mc_unet(parts, ad)
    base = dict(clip_embeds=inputs["clip"], face_embeds=inputs["face"])
    with torch.no_grad():
        none = _run(unet, inputs, ad.conditioning(**base, action_embeds=None))
        masked = _run(unet, inputs, ad.conditioning(**base, action_embeds=inputs["action"],
                                                      action_keep=torch.zeros(1)))
        only_id = _run(unet, inputs, ad.conditioning(**base, action_embeds=inputs["action"],
                                                       action_keep=torch.zeros(1), id_keep=torch.ones(1)))
        with_action = _run(unet, inputs, ad.conditioning(**base, action_embeds=inputs["action"]))
        all_off = _run(unet, inputs, ad.conditioning(**base, action_embeds=inputs["action"], intensity=[9.0],
                                                       id_keep=torch.zeros(1), action_keep=torch.zeros(1),
                                                       motion_keep=torch.zeros(1)))
        stock = _run(parts["unet"], inputs)
    assert torch.allclose(none, masked, atol=1e-6) and torch.allclose(none, only_id, atol=1e-6)
    assert not torch.allclose(none, with_action, atol=1e-4)
    assert torch.allclose(all_off, stock, atol=1e-5)  # joint condition dropout = the base model


def test_keep_masks_act_per_sample(parts, inputs):
    """In a batch of two, switching sample 0 off leaves sample 1 exactly as when run alone."""
    ad = _randomize(MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128))
    unet = _mc_unet(parts, ad)
    two = {k: (torch.cat([v, v]) if k != "t" else v) for k, v in inputs.items()}
    two["sample"] = torch.cat([inputs["sample"], inputs["sample"].flip(-1)])
    kw = dict(clip_embeds=two["clip"], face_embeds=two["face"], action_embeds=two["action"], intensity=[3.0, 15.0])
    off = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        out = _run(unet, two, ad.conditioning(**kw, id_keep=off, action_keep=off, motion_keep=off))
        one = {**inputs, "sample": two["sample"][1:]}
        alone = _run(unet, one, ad.conditioning(clip_embeds=inputs["clip"], face_embeds=inputs["face"],
                                                action_embeds=inputs["action"], intensity=[15.0]))
        stock0 = _run(parts["unet"], {**inputs, "sample": two["sample"][:1]})
    assert torch.allclose(out[1:], alone, atol=1e-5)
    assert torch.allclose(out[:1], stock0, atol=1e-5)


@pytest.mark.services
def test_weights_and_adapter_through_s3(stack, hopper, tmp_path):
    from motioncharacter import storage
    from motioncharacter.model.inference import generate, load_pipeline
    from motioncharacter.model.loading import load_adapter, save_adapter
    from motioncharacter.model.presets import save_tiny_weights

    uri = f"s3://{stack.bucket}/weights/tiny"
    storage.upload_dir(save_tiny_weights(tmp_path / "w"), uri)
    pipe = load_pipeline(weights=uri)
    assert generate(pipe, image=hopper, prompt="a woman", **TINY).shape == (8, 64, 64, 3)
    ad = _randomize(pipe.adapter)
    save_adapter(ad, f"s3://{stack.bucket}/adapters/run1")
    back = load_adapter(f"s3://{stack.bucket}/adapters/run1")
    assert all(torch.equal(a, b) for a, b in zip(ad.state_dict().values(), back.state_dict().values()))


def test_pipeline_defaults_follow_the_weights(pipe):
    assert pipe.defaults == {"frames": 8, "height": 64, "width": 64, "steps": 4}


def test_training_module_with_every_condition_dropped_is_the_base(parts, inputs, stock_out):
    """MCTrainModule (what DeepSpeed trains) wires the joint-dropout masks through: a sample with
    keep_image = keep_action = keep_motion = 0 gets exactly the frozen base's prediction."""
    from motioncharacter.components.train.trainer import MCTrainModule

    ad = _randomize(MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=128))
    mod = MCTrainModule(copy.deepcopy(parts["unet"]), ad, motion_control=True)
    args = (inputs["sample"], inputs["t"], inputs["text"], inputs["clip"], inputs["face"], inputs["action"],
            torch.tensor([14.0]))
    z, one = torch.zeros(1), torch.ones(1)
    with torch.no_grad():
        off = mod(*args, z, z, z)
        on = mod(*args, one, one, one)
    assert torch.allclose(off, stock_out, atol=1e-5)
    assert not torch.allclose(on, stock_out, atol=1e-3)
