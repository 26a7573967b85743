"""``motioncharacter weights assemble|check|tiny`` on synthetic inputs in the public layouts, at tiny widths:
a diffusers folder, a single-file SD checkpoint (original LDM keys), the original AnimateDiff motion-module
keys (.safetensors and a pickled .ckpt), ID-Animator's release keys. Nothing is downloaded."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

import pytest
import torch

from motioncharacter.cli import main
from motioncharacter.model import weights as W
from motioncharacter.model.presets import build_tiny

sys.path.insert(0, os.path.dirname(__file__))
from features_ldm import unet_to_ldm  # noqa: E402

SEED = 3


def vae_to_ldm(sd: dict) -> dict:
    """A diffusers AutoencoderKL state dict in the original single-file layout (first_stage_model.*)."""
    n_up = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks."))
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)", k)
        if m:  # the original's attention projections are 1x1 convolutions
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            v = v[:, :, None, None] if m[3] == "weight" and v.ndim == 2 else v
        else:
            new = re.sub(r"mid_block\.resnets\.(\d)", lambda x: f"mid.block_{int(x[1]) + 1}", k)
            new = re.sub(r"encoder\.down_blocks\.(\d+)", r"encoder.down.\1", new)
            new = re.sub(r"decoder\.up_blocks\.(\d+)", lambda x: f"decoder.up.{n_up - 1 - int(x[1])}", new)
            new = (new.replace(".resnets.", ".block.").replace("downsamplers.0", "downsample")
                   .replace("upsamplers.0", "upsample").replace("conv_shortcut", "nin_shortcut")
                   .replace("conv_norm_out", "norm_out"))
        out["first_stage_model." + new] = v
    return out


def motion_to_original(sd: dict, max_len: int) -> dict:
    """A diffusers MotionAdapter state dict in AnimateDiff's original layout (mm_sd_v15_v2.ckpt keys)."""
    out = {}
    for k, v in sd.items():
        if ".pos_embed." in k:  # the original stores its sinusoidal table as attention_blocks.N.pos_encoder.pe
            continue
        new = re.sub(r"(motion_modules\.\d+\.)", r"\1temporal_transformer.", k)
        new = (new.replace(".norm1", ".norms.0").replace(".norm2", ".norms.1").replace(".norm3", ".ff_norm")
               .replace(".attn1", ".attention_blocks.0").replace(".attn2", ".attention_blocks.1"))
        out[new] = v
        m = re.fullmatch(r"(.*\.attention_blocks\.\d)\.to_q\.weight", new)
        if m:
            out[m[1] + ".pos_encoder.pe"] = torch.zeros(1, max_len, v.shape[1], device=v.device)
    return out


def same(model_or_sd, reference) -> bool:
    a = model_or_sd if isinstance(model_or_sd, dict) else model_or_sd.state_dict()
    b = reference.state_dict()
    return set(a) >= set(b) and all(torch.equal(a[k], v) for k, v in b.items())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The tiny preset (seed 3) as users' downloads: a diffusers folder, a single-file SD checkpoint,
    the original motion module as .safetensors and as a pickled .ckpt."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("sources")
    parts = build_tiny(seed=SEED)
    assert main(["weights", "tiny", str(d / "diffusers"), "--seed", str(SEED), "--no-adapter"]) == 0
    text = {"cond_stage_model.transformer.text_model." + k: v for k, v in parts["text_encoder"].state_dict().items()}
    sd = unet_to_ldm(parts["unet"].state_dict(), layers_per_block=1) | text | vae_to_ldm(parts["vae"].state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "sd-tiny.safetensors"))
    mm = motion_to_original(parts["motion_adapter"].state_dict(), parts["motion_adapter"].config.motion_max_seq_length)
    save_file({k: v.contiguous() for k, v in mm.items()}, str(d / "mm-tiny.safetensors"))
    torch.save(mm, str(d / "mm-tiny.ckpt"))
    cfg = parts["motion_adapter"].config  # the two values the tensors cannot show
    (d / "mm-config.json").write_text(json.dumps({"motion_num_attention_heads": cfg.motion_num_attention_heads,
                                                  "motion_norm_num_groups": cfg.motion_norm_num_groups}))
    return d, parts


def test_single_files_assemble_check_and_generate(sources, tmp_path, capsys):
    """Single-file SD + original motion module -> the same tensors as the source models; `check` passes;
    the folder loads with load_pipeline and generates."""
    from motioncharacter.model.inference import generate, load_pipeline

    src, parts = sources
    out = tmp_path / "w"
    assert main(["weights", "assemble", "--base", str(src / "sd-tiny.safetensors"), "--base-config",
                 str(src / "diffusers"), "--motion-adapter", str(src / "mm-tiny.safetensors"),
                 "--motion-adapter-config", str(src / "mm-config.json"), "--image-encoder", str(src / "diffusers"),
                 "--output", str(out)]) == 0
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert same(UNet2DConditionModel.from_pretrained(out / "unet"), parts["unet"])
    assert same(AutoencoderKL.from_pretrained(out / "vae"), parts["vae"])
    assert same(CLIPTextModel.from_pretrained(out / "text_encoder"), parts["text_encoder"])
    ma = MotionAdapter.from_pretrained(out / "motion_adapter")
    assert same(ma, parts["motion_adapter"])
    assert ma.config.motion_num_attention_heads == 2 and ma.config.motion_max_seq_length == 32  # read and given
    meta = json.loads((out / "weights.json").read_text())["parts"]
    digest = hashlib.sha256((src / "sd-tiny.safetensors").read_bytes()).hexdigest()
    assert meta["unet"]["files"] == {"sd-tiny.safetensors": digest}
    assert meta["unet"]["source"] == str((src / "sd-tiny.safetensors").resolve())
    assert "from_single_file" in meta["unet"]["conversion"] and "original AnimateDiff" in meta["motion_adapter"]["format"]
    assert meta["image_encoder"]["conversion"] == "none (copied)"
    assert not list(out.rglob("*.ckpt")) and not list(out.rglob("*.bin"))
    capsys.readouterr()
    assert main(["weights", "check", str(out)]) == 0
    report = capsys.readouterr().out
    assert report.strip().endswith("usable") and "incompatible" not in report
    assert re.search(r"ok +unet +required .*block_out_channels=32,64.*<- .*sd-tiny.safetensors", report)

    pipe = load_pipeline(weights=str(out))
    grace = os.path.join(os.path.dirname(__import__("matplotlib").__file__), "mpl-data/sample_data/grace_hopper.jpg")
    video = generate(pipe, image=grace, prompt="a woman smiling", action="smiling", intensity=5, steps=2,
                     frames=2, height=64, width=64, guidance=1.0)
    assert video.shape == (2, 64, 64, 3) and video.dtype.name == "uint8"


def test_pickles_need_allow_pickle_and_become_safetensors(sources, tmp_path, s3_only_stack, monkeypatch):
    """A pickled motion module is refused without --allow-pickle and converted once with it; a diffusers
    base folder is copied byte for byte; the output can be an s3:// prefix."""
    src, parts = sources
    args = dict(base=str(src / "diffusers"), motion_adapter_src=str(src / "mm-tiny.ckpt"),
                image_encoder_src=str(src / "diffusers"), motion_adapter_config_src=str(src / "mm-config.json"))
    with pytest.raises(ValueError, match=r"mm-tiny.ckpt is a pickle.*--allow-pickle"):
        W.assemble(output=str(tmp_path / "refused"), **args)
    assert not (tmp_path / "refused").exists()
    for k, v in s3_only_stack.env().items():
        monkeypatch.setenv(k, v)
    uri = "s3://models/assembled-from-pickle"
    meta = W.assemble(output=uri, allow_pickle=True, **args)
    assert "unpickled (--allow-pickle)" in meta["parts"]["motion_adapter"]["conversion"]
    unet_sha = hashlib.sha256((src / "diffusers/unet/diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert meta["parts"]["unet"]["files"] == {"diffusion_pytorch_model.safetensors": unet_sha}
    listing = W.Listing(uri)
    assert "motion_adapter/diffusion_pytorch_model.safetensors" in listing.files
    assert not [f for f in listing.files if f.endswith((".ckpt", ".bin"))]
    statuses, problems, stored = W.check_weights(uri)
    assert W.usable(statuses, problems) and stored["parts"]["unet"]["source"].endswith("diffusers")
    from diffusers import MotionAdapter

    from motioncharacter import storage

    ma = MotionAdapter.from_pretrained(storage.local_copy(storage.join(uri, "motion_adapter")))
    assert same(ma, parts["motion_adapter"])


def test_incompatible_parts_are_named(sources, tmp_path, capsys):
    """A motion adapter of other widths is refused naming both parts and numbers; `check` reports
    missing and mismatched parts and exits 1."""
    from diffusers import MotionAdapter

    src, _ = sources
    other = MotionAdapter(block_out_channels=(64, 128), motion_layers_per_block=1, motion_num_attention_heads=2,
                          motion_norm_num_groups=16, use_motion_mid_block=False)
    other.save_pretrained(tmp_path / "wide_mm", safe_serialization=True)
    with pytest.raises(ValueError, match=r"unet block_out_channels 32,64 != motion_adapter block_out_channels 64,128"):
        W.assemble(str(src / "diffusers"), str(tmp_path / "wide_mm"), str(src / "diffusers"), str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match=r"does not have the architecture of SD1.5's configs \(built in\): its "
                                         r"UNet's first block has width 32, the configs say 320.*--base-config"):
        W.assemble(str(src / "sd-tiny.safetensors"), str(src / "diffusers"), str(src / "diffusers"),
                   str(tmp_path / "bad"))

    w = tmp_path / "edited"
    shutil.copytree(src / "diffusers", w)
    shutil.rmtree(w / "vae")
    cfg = json.loads((w / "text_encoder/config.json").read_text())
    (w / "text_encoder/config.json").write_text(json.dumps(cfg | {"hidden_size": 48}))
    capsys.readouterr()
    assert main(["weights", "check", str(w)]) == 1
    report = capsys.readouterr().out
    assert re.search(r"XX vae +required +missing", report)
    assert "unet cross_attention_dim 32 != text_encoder hidden_size 48" in report
    assert "NOT usable" in report and "vae" in report.splitlines()[-1]
    assert re.search(r"-- controlnet_pose +optional +missing", report)


def test_hub_id_needs_the_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"--base someone/sd15: no such local path, and the Hugging Face hub is "
                                         r"switched off"):
        W.resolve("someone/sd15", "--base", tmp_path, False)
    with pytest.raises(FileNotFoundError, match=r"--base ./nope/a/b: no such file or folder"):
        W.resolve("./nope/a/b", "--base", tmp_path, False)


def test_motion_adapter_config_from_original_keys():
    """Widths, depths, mid block and sequence length are read off the tensors; heads and norm groups,
    which no tensor shows, are AnimateDiff's (8, 32) unless given."""
    t = {f"down_blocks.{i}.motion_modules.{j}.temporal_transformer.proj_in.weight": torch.zeros(w, w)
         for i, w in enumerate((320, 640)) for j in range(2)}
    t |= {f"down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.{a}"
          ".pos_encoder.pe": torch.zeros(1, 24, 320) for a in range(2)}
    t["mid_block.motion_modules.0.temporal_transformer.norm.bias"] = torch.zeros(640)
    cfg, assumed = W.motion_adapter_config(t)
    assert cfg["block_out_channels"] == [320, 640] and cfg["motion_layers_per_block"] == 2
    assert cfg["motion_transformer_layers_per_block"] == 1 and cfg["use_motion_mid_block"] is True
    assert cfg["motion_max_seq_length"] == 24 and cfg["motion_num_attention_heads"] == 8
    assert assumed == ["motion_num_attention_heads", "motion_norm_num_groups"]
    cfg, assumed = W.motion_adapter_config(t, {"motion_num_attention_heads": 4})
    assert cfg["motion_num_attention_heads"] == 4 and assumed == ["motion_norm_num_groups"]
    with pytest.raises(ValueError, match="no AnimateDiff motion-module keys"):
        W.motion_adapter_config({"model.diffusion_model.x": torch.zeros(1)})


def test_sd15_facts_at_full_size():
    """The built-in SD1.5 configs give SD1.5's published parameter counts, and mm_sd_v15_v2's layout gives
    MotionAdapter v2's config (meta tensors: no memory, no download)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d, init_empty_weights():
        assert W.write_config_dir(Path(d), None) == "SD1.5's configs (built in)"
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(d, "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(Path(d, "vae")))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(Path(d, "text_encoder")))
        v2 = MotionAdapter(motion_max_seq_length=32)  # diffusers' defaults are AnimateDiff v2's widths
    count = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert count == [859_520_964, 83_653_863, 123_060_480]
    cfg, assumed = W.motion_adapter_config(motion_to_original(v2.state_dict(), 32))
    for k in ("block_out_channels", "motion_layers_per_block", "use_motion_mid_block", "motion_max_seq_length",
              "motion_num_attention_heads", "motion_norm_num_groups"):
        assert list(cfg[k]) == list(v2.config[k]) if k == "block_out_channels" else cfg[k] == v2.config[k], k
    assert not W.incompatibilities({"unet": dict(unet.config), "motion_adapter": cfg,
                                    "text_encoder": text.config.to_dict(), "vae": dict(vae.config)})


def test_face_adapter_release_is_converted(sources, tmp_path):
    """ID-Animator's released layout ({"image_proj", "face_adapter"}, processor indices) -> face_adapter/."""
    release = pytest.importorskip("motioncharacter.model.id_animator_release",
                                  reason="model/id_animator_release.py (the release converter) is not there yet")
    from motioncharacter.model.face_adapter import IDAnimatorFaceAdapter, _key
    from motioncharacter.model.motion_module import motion_unet

    from diffusers import MotionAdapter, UNet2DConditionModel

    src, _ = sources
    unet = motion_unet(UNet2DConditionModel.from_pretrained(src / "diffusers/unet"),
                       MotionAdapter.from_pretrained(src / "diffusers/motion_adapter"))
    ours = IDAnimatorFaceAdapter.for_unet(unet, clip_hidden_dim=32, seed=1, num_queries=4, resampler_depth=1,
                                          resampler_heads=1, resampler_dim_head=32, lora_rank=4, zero_init=False)
    index = {_key(n): i for i, n in enumerate(release.released_processor_order(unet))}
    proj, face = {}, {}
    for k, v in ours.state_dict().items():  # our keys written back in the release's names
        if k.startswith("layers."):
            layer, _, rest = k[len("layers."):].partition(".")
            face[f"{index[layer]}.{rest}"] = v
            continue
        k = k[len("image_proj."):]
        k = "latents" if k == "queries" else re.sub(r"attn\.(\d+)\.", r"layers.\1.0.", re.sub(
            r"ff\.(\d+)\.", r"layers.\1.1.", k)).replace("norm_x", "norm1").replace("norm_latents", "norm2")
        proj[k] = v
    torch.save({"image_proj": proj, "face_adapter": face}, str(tmp_path / "animator.ckpt"))
    out = tmp_path / "w"
    W.assemble(str(src / "diffusers"), str(src / "diffusers"), str(src / "diffusers"), str(out),
               face_adapter_src=str(tmp_path / "animator.ckpt"), allow_pickle=True)
    assert same(IDAnimatorFaceAdapter.from_pretrained(out / "face_adapter"), ours)
    statuses, problems, meta = W.check_weights(str(out))
    assert W.usable(statuses, problems) and "convert_release" in meta["parts"]["face_adapter"]["conversion"]
