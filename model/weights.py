"""``motioncharacter weights assemble|check|tiny``: a weights folder built from public parts.

``--weights`` wants one folder (or s3:// prefix) in the diffusers layout that ``loading.py`` reads:
unet/ vae/ text_encoder/ tokenizer/ motion_adapter/ image_encoder/ (required), scheduler/
feature_extractor/ adapter/ face_adapter/ content_guider/ controlnet_pose/ controlnet_depth/
sparsectrl/ (optional). ``assemble`` builds it from what users download:

* the SD1.5 base: a diffusers folder, or a single-file checkpoint in the original LDM key layout
  (converted by diffusers' ``StableDiffusionPipeline.from_single_file``, offline: the architecture's
  configs come from ``--base-config`` or SD1.5's own, built in here);
* the AnimateDiff motion module: a diffusers ``MotionAdapter`` folder, or the original
  ``mm_sd_v15_v2.ckpt`` key layout (diffusers' ``MotionAdapter.from_single_file``; the widths are
  read off the tensors, the two values the tensors do not show from ``--motion-adapter-config``
  or AnimateDiff's published ones);
* IP-Adapter's CLIP image encoder folder, ControlNet / SparseCtrl folders, ID-Animator's released
  face adapter (``model/id_animator_release.py``).

Any of them may be an s3:// URI, or a Hugging Face hub repository id when the hub is reachable.
Pickled inputs (.ckpt/.bin/.pt) are read only with ``--allow-pickle`` and written as safetensors.
Parts are checked against each other before anything is written, and ``weights.json`` records
where each part came from (path or repo id, format, sha256 of what was read, the conversion).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from motioncharacter import storage

from .loading import PICKLE_SUFFIXES, REQUIRED

logger = logging.getLogger("motioncharacter.model")

WEIGHTS_JSON = "weights.json"
OPTIONAL = ("scheduler", "feature_extractor", "adapter", "face_adapter", "content_guider", "controlnet_pose",
            "controlnet_depth", "sparsectrl")
# the file a part's folder must hold to be read (tokenizers: either of the two)
CONFIG_FILES = {"tokenizer": ("tokenizer_config.json", "vocab.json"), "scheduler": ("scheduler_config.json",),
                "feature_extractor": ("preprocessor_config.json",)}
WEIGHT_PARTS = set(REQUIRED + OPTIONAL) - {"tokenizer", "scheduler", "feature_extractor"}
STANDARD_WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# AnimateDiff's published motion-module values that its checkpoint's tensors cannot show
ANIMATEDIFF_UNSTORED = {"motion_num_attention_heads": 8, "motion_norm_num_groups": 32}


# ---- SD1.5's configs (published facts), for single-file checkpoints without network ---------------
def sd15_configs() -> dict[str, dict]:
    """The diffusers configs of stable-diffusion-v1-5 that a single-file checkpoint does not carry."""
    unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280],
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return dict(unet=unet, vae=vae, text_encoder=text)


def write_config_dir(target: Path, source: Path | None) -> str:
    """A diffusers pipeline folder of configs only (what ``from_single_file(config=...)`` reads):
    copied from ``source`` (any diffusers/weights folder with unet/ vae/ text_encoder/ configs), else
    SD1.5's. Returns a description for weights.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .presets import animatediff_scheduler_config, clip_tokenizer

    target.mkdir(parents=True, exist_ok=True)
    if source is not None:
        for part in ("unet", "vae", "text_encoder"):
            cfg = source / part / "config.json"
            if not cfg.is_file():
                raise FileNotFoundError(f"--base-config {source}: no {part}/config.json (a diffusers folder of the "
                                        "checkpoint's architecture is needed, e.g. one written by `weights tiny`)")
            (target / part).mkdir()
            shutil.copy(cfg, target / part / "config.json")
        what = f"configs from {source}"
    else:
        c = sd15_configs()
        for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
            (target / part).mkdir()
            (target / part / "config.json").write_text(json.dumps({"_class_name": cls.__name__, **c[part]}))
        CLIPTextConfig(**c["text_encoder"]).save_pretrained(target / "text_encoder")
        what = "SD1.5's configs (built in)"
    tok = source / "tokenizer" if source is not None else None
    if tok is not None and tok.is_dir():
        shutil.copytree(tok, target / "tokenizer")
    else:
        clip_tokenizer().save_pretrained(target / "tokenizer")
    DDIMScheduler(**animatediff_scheduler_config()).save_pretrained(target / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    (target / "model_index.json").write_text(json.dumps(index))
    return what


# ---- reading sources ---------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def is_pickle(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def resolve(spec: str, option: str, workdir: Path, allow_pickle: bool, patterns: list[str] | None = None):
    """``spec`` (local path, s3:// URI or hub repo id) -> (local path, origin record)."""
    if storage.is_s3(spec):
        return Path(storage.local_copy(spec, workdir)), {"source": spec}
    p = Path(spec).expanduser()
    if p.exists():
        return p, {"source": str(p.resolve())}
    if not HUB_ID.fullmatch(spec):
        raise FileNotFoundError(f"{option} {spec}: no such file or folder (nor an s3:// URI or a hub repository id)")
    return hub_download(spec, option, allow_pickle, patterns)


def hub_download(repo_id: str, option: str, allow_pickle: bool, patterns: list[str] | None):
    import huggingface_hub

    if huggingface_hub.is_offline_mode():
        raise ValueError(f"{option} {repo_id}: no such local path, and the Hugging Face hub is switched off "
                         "(HF_HUB_OFFLINE); download the repository and pass its folder")
    ignore = ["*.onnx", "*.msgpack", "*.h5", "*.ot", "*.fp16.*", "*.pb"]
    if not allow_pickle:
        ignore += [f"*{s}" for s in PICKLE_SUFFIXES]
    try:
        info = huggingface_hub.model_info(repo_id)
        path = huggingface_hub.snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns,
                                                 ignore_patterns=ignore)
    except Exception as e:  # offline, DNS, 404, gated: all say the same to the user
        raise ValueError(f"{option} {repo_id}: no such local path, and as a Hugging Face hub repository it "
                         f"could not be fetched ({type(e).__name__}: {str(e)[:200]})") from None
    return Path(path), {"source": f"hf://{repo_id}", "revision": info.sha}


def load_tensors(path: Path, allow_pickle: bool, option: str) -> dict:
    """A single-file checkpoint's tensors; pickles only with ``allow_pickle``."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not is_pickle(path):
        raise ValueError(f"{option} {path}: unknown checkpoint format {path.suffix!r} (expected .safetensors, or a "
                         ".ckpt/.bin/.pt pickle with --allow-pickle)")
    if not allow_pickle:
        raise ValueError(f"{option} {path} is a pickle, which can run code when loaded; pass --allow-pickle if you "
                         "trust its source (it is then converted to safetensors once)")
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # e.g. Lightning checkpoints pickle callbacks: the user vouched for the source
        logger.warning("%s does not load with weights_only (%s); unpickling it fully (--allow-pickle)", path, e)
        sd = torch.load(str(path), map_location="cpu", weights_only=False)
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


# ---- writing parts -----------------------------------------------------------------------------------
def copy_model_folder(src: Path, dst: Path, loader, allow_pickle: bool, option: str) -> dict:
    """A diffusers/transformers model folder -> ``dst``: configs and standard safetensors copied (and
    hashed), or pickled weights loaded with ``loader`` and saved as safetensors."""
    files = [f for f in sorted(src.iterdir()) if f.is_file()]
    weights = [f for f in files if STANDARD_WEIGHTS.fullmatch(f.name) and not f.name.endswith(".json")]
    pickles = [f for f in files if is_pickle(f)]
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{option} {src}: no config.json (not a diffusers/transformers model folder)")
    dst.mkdir(parents=True)
    if weights:
        digests = {}
        for f in files:
            if f.suffix == ".json" or f in weights:
                digests[f.name] = sha256(f) if f in weights else None
                shutil.copy(f, dst / f.name)
        return {"format": "diffusers folder", "files": {k: v for k, v in digests.items() if v},
                "conversion": "none (copied)"}
    if not pickles:
        raise FileNotFoundError(f"{option} {src}: no weights (expected diffusion_pytorch_model.safetensors or "
                                f"model.safetensors; found {', '.join(f.name for f in files) or 'nothing'})")
    if not allow_pickle:
        raise ValueError(f"{option} {src} holds only pickled weights ({pickles[0].name}), which can run code when "
                         "loaded; pass --allow-pickle if you trust the source (they are converted to safetensors)")
    loader(src).save_pretrained(dst, safe_serialization=True)
    return {"format": "diffusers folder (pickled weights)", "files": {f.name: sha256(f) for f in pickles},
            "conversion": "unpickled (--allow-pickle) and written as safetensors"}


def base_folder(src: Path, out: Path, allow_pickle: bool) -> dict[str, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer") if not (src / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"--base {src}: a diffusers Stable Diffusion folder needs unet/ vae/ text_encoder/ "
                                f"tokenizer/; missing {', '.join(missing)}/")
    records = {}
    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        records[part] = copy_model_folder(src / part, out / part,
                                          lambda d, c=cls: c.from_pretrained(d, use_safetensors=False),
                                          allow_pickle, "--base")
    shutil.copytree(src / "tokenizer", out / "tokenizer")
    records["tokenizer"] = {"format": "tokenizer folder", "conversion": "none (copied)"}
    return records


def base_single_file(src: Path, out: Path, config_source: Path | None, allow_pickle: bool, work: Path) -> dict:
    """A single-file SD checkpoint (original LDM keys) -> unet/ vae/ text_encoder/ tokenizer/."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    conversion = ""
    path = src
    if is_pickle(src):
        from safetensors.torch import save_file

        tensors = load_tensors(src, allow_pickle, "--base")
        path = work / (src.stem + ".safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        del tensors
        conversion = "unpickled (--allow-pickle), "
    elif src.suffix.lower() != ".safetensors":
        raise ValueError(f"--base {src}: neither a diffusers folder nor a .safetensors/.ckpt checkpoint")
    cfg_dir = work / "base-config"
    cfg_what = write_config_dir(cfg_dir, config_source)
    with safe_open(str(path), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    check_single_file_shapes(shapes, json.loads((cfg_dir / "unet" / "config.json").read_text()),
                             json.loads((cfg_dir / "text_encoder" / "config.json").read_text()), src, cfg_what)
    try:
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(cfg_dir), local_files_only=True,
                                                        safety_checker=None, feature_extractor=None)
    except Exception as e:
        raise ValueError(f"--base {src}: diffusers could not convert it with {cfg_what}: {str(e)[:300]}") from None
    for part in ("unet", "vae", "text_encoder"):
        getattr(pipe, part).save_pretrained(out / part, safe_serialization=True)
    pipe.tokenizer.save_pretrained(out / "tokenizer")
    record = {"format": "single-file Stable Diffusion checkpoint (original LDM keys)",
              "files": {src.name: sha256(src)},
              "conversion": f"{conversion}diffusers StableDiffusionPipeline.from_single_file with {cfg_what}"}
    parts = {p: dict(record) for p in ("unet", "vae", "text_encoder")}
    parts["tokenizer"] = {"format": "tokenizer folder", "conversion": f"from {cfg_what}"}
    return parts


def check_single_file_shapes(shapes: dict, unet_cfg: dict, text_cfg: dict, src: Path, cfg_what: str) -> None:
    """The few tensors that tell a checkpoint's widths, against the configs it will be read with."""
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None:
        raise ValueError(f"--base {src} is not a Stable Diffusion checkpoint in the original layout "
                         "(no model.diffusion_model.input_blocks.0.0.weight)")
    problems = []
    if conv_in[0] != unet_cfg["block_out_channels"][0]:
        problems.append(f"its UNet's first block has width {conv_in[0]}, the configs say "
                        f"{unet_cfg['block_out_channels'][0]}")
    to_k = next((s for k, s in sorted(shapes.items()) if k.startswith("model.diffusion_model.")
                 and k.endswith("attn2.to_k.weight")), None)
    if to_k is not None and to_k[1] != unet_cfg["cross_attention_dim"]:
        problems.append(f"its cross-attention width is {to_k[1]}, the configs say {unet_cfg['cross_attention_dim']}")
    tok = shapes.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    if tok is not None and tok[1] != text_cfg["hidden_size"]:
        problems.append(f"its text encoder width is {tok[1]}, the configs say {text_cfg['hidden_size']}")
    if problems:
        raise ValueError(f"--base {src} does not have the architecture of {cfg_what}: {'; '.join(problems)}. "
                         "Pass --base-config with a diffusers folder of its architecture")


def motion_adapter_config(tensors: dict, override: dict | None = None) -> tuple[dict, list[str]]:
    """A MotionAdapter config read off original AnimateDiff keys; returns it and the keys that came
    from AnimateDiff's published values (the tensors cannot show them) rather than the file."""
    mm = re.compile(r"(down_blocks\.(\d+)|mid_block)\.motion_modules\.(\d+)\.temporal_transformer\.(.*)")
    blocks: dict[int, set] = {}
    mid, depth, max_len = set(), set(), None
    for k, v in tensors.items():
        m = mm.fullmatch(k)
        if not m:
            continue
        if m[2] is None:
            mid.add(m[3])
        else:
            blocks.setdefault(int(m[2]), set()).add(m[3])
        t = re.match(r"transformer_blocks\.(\d+)\.", m[4])
        if t and m[2] == "0" and m[3] == "0":
            depth.add(t[1])
        if m[4].endswith("pos_encoder.pe") and max_len is None:
            max_len = int(v.shape[1])
    if not blocks:
        raise ValueError("no AnimateDiff motion-module keys (down_blocks.N.motion_modules.M.temporal_transformer.*)")
    widths = [int(tensors[f"down_blocks.{i}.motion_modules.0.temporal_transformer.proj_in.weight"].shape[0])
              for i in sorted(blocks)]
    cfg = dict(block_out_channels=widths, motion_layers_per_block=len(blocks[0]),
               motion_transformer_layers_per_block=len(depth), use_motion_mid_block=bool(mid),
               motion_mid_block_layers_per_block=max(1, len(mid)), motion_max_seq_length=max_len or 32,
               **ANIMATEDIFF_UNSTORED)
    assumed = [k for k in ANIMATEDIFF_UNSTORED if k not in (override or {})]
    cfg.update({k: v for k, v in (override or {}).items() if not k.startswith("_")})
    return {"_class_name": "MotionAdapter", **cfg}, assumed


def motion_adapter(src: Path, out: Path, allow_pickle: bool, config_override: str | None, work: Path) -> dict:
    from diffusers import MotionAdapter

    if src.is_dir():
        if (src / "motion_adapter").is_dir():
            src = src / "motion_adapter"
        return copy_model_folder(src, out, lambda d: MotionAdapter.from_pretrained(d, use_safetensors=False),
                                 allow_pickle, "--motion-adapter")
    override = None
    if config_override:
        p = Path(config_override)
        p = p / "config.json" if p.is_dir() else p
        try:
            override = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--motion-adapter-config {config_override}: {e}") from None
    tensors = load_tensors(src, allow_pickle, "--motion-adapter")
    try:
        cfg, assumed = motion_adapter_config(tensors, override)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--motion-adapter {src} is not an AnimateDiff motion module: {e}") from None
    cfg_dir = work / "motion-config"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(json.dumps(cfg))
    try:
        model = MotionAdapter.from_single_file(tensors, config=str(cfg_dir), local_files_only=True)
    except Exception as e:
        raise ValueError(f"--motion-adapter {src}: diffusers could not convert it ({str(e)[:300]})") from None
    model.save_pretrained(out, safe_serialization=True)
    note = f"; {', '.join(assumed)} are AnimateDiff's published values (not stored in the file)" if assumed else ""
    return {"format": "original AnimateDiff motion module", "files": {src.name: sha256(src)},
            "conversion": f"{'unpickled (--allow-pickle), ' if is_pickle(src) else ''}diffusers "
                          f"MotionAdapter.from_single_file, config read off the tensors{note}",
            "config": {k: v for k, v in cfg.items() if not k.startswith("_")}}


def image_encoder(src: Path, out: Path, allow_pickle: bool) -> dict[str, dict]:
    """IP-Adapter's image encoder (the folder itself, or its image_encoder/ or models/image_encoder/)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    for sub in ("", "image_encoder", "models/image_encoder"):
        if (src / sub / "config.json").is_file():
            src = src / sub
            break
    else:
        raise FileNotFoundError(f"--image-encoder {src}: no config.json in it, nor in image_encoder/ or "
                                "models/image_encoder/ (IP-Adapter's layout)")
    rec = copy_model_folder(src, out / "image_encoder",
                            lambda d: CLIPVisionModelWithProjection.from_pretrained(d, use_safetensors=False),
                            allow_pickle, "--image-encoder")
    pre = src / "preprocessor_config.json"
    if pre.is_file():
        (out / "feature_extractor").mkdir()
        shutil.copy(pre, out / "feature_extractor" / pre.name)
        fe = {"format": "preprocessor config", "conversion": "none (copied)"}
    else:  # IP-Adapter ships none: CLIP's preprocessing at the encoder's own input size
        size = json.loads((src / "config.json").read_text()).get("image_size", 224)
        CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
            out / "feature_extractor")
        fe = {"source": "motioncharacter (built in)", "format": "preprocessor config",
              "conversion": f"CLIP's preprocessing at the encoder's image_size {size}"}
    return {"image_encoder": rec, "feature_extractor": fe}


def controlnet(src: Path, out: Path, kind: str, allow_pickle: bool) -> dict:
    from diffusers import ControlNetModel, SparseControlNetModel

    option = "--sparsectrl" if kind == "sparsectrl" else f"--{kind.replace('_', '-')}"
    cfg = src / "config.json"
    if not src.is_dir() or not cfg.is_file():
        raise ValueError(f"{option} {src}: expected a diffusers ControlNetModel/SparseControlNetModel folder "
                         "(config.json + safetensors)")
    cls_name = json.loads(cfg.read_text()).get("_class_name")
    classes = {"ControlNetModel": ControlNetModel, "SparseControlNetModel": SparseControlNetModel}
    if cls_name not in classes or (kind == "sparsectrl" and cls_name != "SparseControlNetModel"):
        want = "SparseControlNetModel" if kind == "sparsectrl" else "ControlNetModel or SparseControlNetModel"
        raise ValueError(f"{option} {src}: its config.json is a {cls_name!r}, expected {want}")
    return copy_model_folder(src, out, lambda d: classes[cls_name].from_pretrained(d, use_safetensors=False),
                             allow_pickle, option)


def face_adapter(src: Path, out: Path, staged: Path, allow_pickle: bool) -> dict:
    """ID-Animator's released ``animator.ckpt`` -> face_adapter/ (IDAnimatorFaceAdapter, safetensors)."""
    try:
        from .id_animator_release import adapter_from_state_dict, convert_release
    except ImportError as e:
        raise ValueError(f"--face-adapter needs motioncharacter.model.id_animator_release ({e})") from None
    from diffusers import MotionAdapter, UNet2DConditionModel

    from .motion_module import motion_unet

    if src.is_dir():
        raise ValueError(f"--face-adapter {src}: expected ID-Animator's released file (animator.ckpt or a "
                         ".safetensors copy), not a folder")
    # the UNet the pipeline will run (its processor order decides where the release's layers go)
    unet = motion_unet(UNet2DConditionModel.from_pretrained(staged / "unet"),
                       MotionAdapter.from_pretrained(staged / "motion_adapter"))
    adapter_from_state_dict(convert_release(str(src), unet, allow_pickle), unet).save_pretrained(
        out, safe_serialization=True)
    return {"format": "ID-Animator release (image_proj + face_adapter)", "files": {src.name: sha256(src)},
            "conversion": f"{'unpickled (--allow-pickle), ' if is_pickle(src) else ''}"
                          "model.id_animator_release.convert_release -> IDAnimatorFaceAdapter"}


def write_scheduler(out: Path) -> dict:
    from diffusers import DDIMScheduler

    from .presets import animatediff_scheduler_config

    DDIMScheduler(**animatediff_scheduler_config()).save_pretrained(out / "scheduler")
    return {"source": "motioncharacter (built in)", "format": "scheduler config",
            "conversion": "AnimateDiff's DDIM settings (linear betas), which its motion modules were trained with"}


# ---- cross-checks --------------------------------------------------------------------------------------
def incompatibilities(configs: dict[str, dict]) -> list[str]:
    """Every mismatch between the parts' configs, each naming both parts and their numbers."""
    u, problems = configs.get("unet"), []

    def differ(a: str, ka: str, b: str, kb: str, why: str) -> None:
        ca, cb = configs.get(a), configs.get(b)
        if ca is None or cb is None or ka not in ca or kb not in cb:
            return
        va, vb = ca[ka], cb[kb]
        if (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
            problems.append(f"{a} {ka} {_fmt(va)} != {b} {kb} {_fmt(vb)}: {why}")

    differ("unet", "cross_attention_dim", "text_encoder", "hidden_size", "the UNet attends to text embeddings of "
           "its cross-attention width")
    differ("unet", "in_channels", "vae", "latent_channels", "the UNet denoises the VAE's latents")
    differ("unet", "block_out_channels", "motion_adapter", "block_out_channels", "motion modules sit in the UNet's "
           "blocks, one width per block")
    differ("unet", "layers_per_block", "motion_adapter", "motion_layers_per_block", "one motion module per UNet layer")
    for part in ("adapter", "face_adapter", "content_guider"):
        differ("unet", "cross_attention_dim", part, "text_dim", "its tokens join the text tokens")
    differ("image_encoder", "projection_dim", "adapter", "clip_image_dim", "the adapter reads the image embedding")
    for part in ("face_adapter", "content_guider"):
        differ("image_encoder", "hidden_size", part, "clip_hidden_dim", "its resampler reads CLIP's hidden states")
    for part in ("controlnet_pose", "controlnet_depth", "sparsectrl"):
        differ("unet", "block_out_channels", part, "block_out_channels", "its residuals are added to the UNet's blocks")
        differ("unet", "cross_attention_dim", part, "cross_attention_dim", "it reads the same text embeddings")
    if u and configs.get("motion_adapter", {}).get("use_motion_mid_block") and u.get("mid_block_type", "") is None:
        problems.append("motion_adapter use_motion_mid_block true != unet mid_block_type null: the adapter has a "
                        "motion module for a mid block the UNet lacks")
    return problems


def _fmt(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


# ---- reading a weights folder (local or s3://) ------------------------------------------------------------
class Listing:
    """The files of a weights folder or s3:// prefix, and their JSON configs, without loading weights."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        base = self.uri + "/"
        self.files = {f[len(base):] if storage.is_s3(self.uri) else Path(f).relative_to(self.uri).as_posix()
                      for f in storage.list_files(self.uri)}

    def under(self, part: str) -> list[str]:
        return sorted(f[len(part) + 1:] for f in self.files if f.startswith(part + "/"))

    def json(self, rel: str) -> dict | None:
        if rel not in self.files:
            return None
        try:
            return json.loads(storage.read_bytes(storage.join(self.uri, rel)))
        except json.JSONDecodeError:
            return None


@dataclass
class PartStatus:
    name: str
    required: bool
    state: str  # ok | missing | no weights | pickled only | no config | unreadable config
    summary: str = ""
    source: str = ""


def part_status(listing: Listing, name: str, required: bool, info: dict) -> tuple[PartStatus, dict | None]:
    files = listing.under(name)
    src = (info.get(name) or {}).get("source", "")
    if not files:
        return PartStatus(name, required, "missing", source=src), None
    cfg_names = CONFIG_FILES.get(name, ("config.json",))
    cfg_name = next((c for c in cfg_names if c in files), None)
    if cfg_name is None:
        return PartStatus(name, required, "no config", f"no {' or '.join(cfg_names)}", src), None
    cfg = listing.json(f"{name}/{cfg_name}")
    if cfg is None:
        return PartStatus(name, required, "unreadable config", cfg_name, src), None
    if name in WEIGHT_PARTS and not any(f.endswith(".safetensors") for f in files):
        pickled = [f for f in files if Path(f).suffix.lower() in PICKLE_SUFFIXES]
        state = "pickled only" if pickled else "no weights"
        hint = "convert with `weights assemble --allow-pickle`" if pickled else "no .safetensors"
        return PartStatus(name, required, state, hint, src), cfg
    return PartStatus(name, required, "ok", _summary(name, cfg), src), cfg


def _summary(name: str, c: dict) -> str:
    cls = (c.get("_class_name") or (c.get("architectures") or [""])[0] or c.get("tokenizer_class")
           or c.get("image_processor_type", ""))
    keys = {"unet": ("block_out_channels", "cross_attention_dim", "sample_size"),
            "motion_adapter": ("block_out_channels", "motion_max_seq_length"),
            "vae": ("block_out_channels", "latent_channels"), "text_encoder": ("hidden_size",),
            "image_encoder": ("hidden_size", "projection_dim", "image_size"),
            "adapter": ("text_dim", "clip_image_dim"), "face_adapter": ("text_dim", "clip_hidden_dim"),
            "content_guider": ("text_dim", "clip_hidden_dim")}.get(name, ("block_out_channels",) if "control" in name
                                                                   or name == "sparsectrl" else ())
    dims = " ".join(f"{k}={_fmt(c[k])}" for k in keys if k in c)
    return f"{cls} {dims}".strip()


def check_weights(uri: str) -> tuple[list[PartStatus], list[str], dict]:
    """(status of every part, incompatibilities, weights.json) of a weights folder or s3:// prefix."""
    listing = Listing(uri)
    meta = listing.json(WEIGHTS_JSON) or {}
    info = meta.get("parts", {})
    statuses, configs = [], {}
    for name, required in [(n, True) for n in REQUIRED] + [(n, False) for n in OPTIONAL]:
        st, cfg = part_status(listing, name, required, info)
        statuses.append(st)
        if cfg is not None and name not in CONFIG_FILES:
            configs[name] = _text_config(cfg) if name in ("text_encoder", "image_encoder") else cfg
    return statuses, incompatibilities(configs), meta


def _text_config(cfg: dict) -> dict:
    """A transformers config as saved (a CLIPModel config nests its text/vision parts)."""
    for nested in ("text_config", "vision_config"):
        if isinstance(cfg.get(nested), dict) and "hidden_size" not in cfg:
            return {**cfg[nested], "projection_dim": cfg.get("projection_dim", cfg[nested].get("projection_dim"))}
    return cfg


def usable(statuses: list[PartStatus], problems: list[str]) -> bool:
    return not problems and all(s.state == "ok" for s in statuses if s.required or s.state != "missing")


def format_report(uri: str, statuses: list[PartStatus], problems: list[str], meta: dict) -> str:
    lines = [f"weights {uri}" + (f" (assembled {meta['created']})" if meta.get("created") else "")]
    for s in statuses:
        kind = "required" if s.required else "optional"
        mark = "ok " if s.state == "ok" else ("-- " if s.state == "missing" and not s.required else "XX ")
        src = f"  <- {s.source if len(s.source) <= 60 else '...' + s.source[-57:]}" if s.source else ""
        lines.append(f"  {mark}{s.name:<18}{kind:<9}{s.state if s.state != 'ok' else '':<13}{s.summary}{src}")
    for p in problems:
        lines.append(f"  incompatible: {p}")
    missing = [s.name for s in statuses if s.required and s.state != "ok"]
    verdict = "usable" if usable(statuses, problems) else "NOT usable: " + "; ".join(
        ([f"required parts not usable: {', '.join(missing)}"] if missing else [])
        + ([f"{len(problems)} incompatibilit{'y' if len(problems) == 1 else 'ies'}"] if problems else [])
        + ([f"broken optional parts: {', '.join(b)}"] if (b := [s.name for s in statuses if not s.required
                                                                and s.state not in ('ok', 'missing')]) else []))
    lines.append(verdict)
    return "\n".join(lines)


# ---- assemble ------------------------------------------------------------------------------------------
def assemble(base: str, motion_adapter_src: str, image_encoder_src: str, output: str, *,
             controlnet_pose: str | None = None, controlnet_depth: str | None = None, sparsectrl: str | None = None,
             face_adapter_src: str | None = None, base_config: str | None = None,
             motion_adapter_config_src: str | None = None, allow_pickle: bool = False) -> dict:
    """Build a weights folder at ``output`` (local or s3://); returns weights.json's content.

    Everything is written to a staging folder first and moved (or uploaded) only when every part
    converted and the cross-checks passed, so a failure leaves no half-built folder."""
    out_is_s3 = storage.is_s3(output)
    if not out_is_s3 and Path(output).exists() and any(Path(output).iterdir()):
        raise ValueError(f"--output {output} exists and is not empty; choose a new folder")
    if out_is_s3 and storage.exists(storage.join(output, WEIGHTS_JSON)):
        raise ValueError(f"--output {output} already holds a weights folder ({WEIGHTS_JSON}); choose a new prefix")
    stage_parent = storage.cache_dir() if out_is_s3 else Path(output).resolve().parent
    stage_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".weights-staging-", dir=stage_parent) as tmp:
        tmp = Path(tmp)
        staged, work = tmp / "out", tmp / "work"
        staged.mkdir()
        work.mkdir()
        parts: dict[str, dict] = {}

        def add(name_or_records, origin: dict, record: dict | None = None):
            recs = {name_or_records: record} if record is not None else name_or_records
            for n, r in recs.items():
                parts[n] = {**origin, **r} if "source" not in r else r

        cfg_src = None
        if base_config:
            cfg_src, _ = resolve(base_config, "--base-config", work, allow_pickle,
                                 ["*/config.json", "tokenizer/*", "model_index.json"])
        path, origin = resolve(base, "--base", work, allow_pickle,
                               ["model_index.json", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*"])
        logger.info("base: %s", origin["source"])
        add(base_folder(path, staged, allow_pickle) if path.is_dir()
            else base_single_file(path, staged, cfg_src, allow_pickle, work), origin)
        path, origin = resolve(motion_adapter_src, "--motion-adapter", work, allow_pickle)
        logger.info("motion adapter: %s", origin["source"])
        add("motion_adapter", origin, motion_adapter(path, staged / "motion_adapter", allow_pickle,
                                                     motion_adapter_config_src, work))
        path, origin = resolve(image_encoder_src, "--image-encoder", work, allow_pickle,
                               ["models/image_encoder/*", "image_encoder/*", "config.json", "model.safetensors",
                                "preprocessor_config.json"])
        logger.info("image encoder: %s", origin["source"])
        add(image_encoder(path, staged, allow_pickle), origin)
        add("scheduler", {}, write_scheduler(staged))
        for kind, spec in (("controlnet_pose", controlnet_pose), ("controlnet_depth", controlnet_depth),
                           ("sparsectrl", sparsectrl)):
            if spec:
                option = "--sparsectrl" if kind == "sparsectrl" else f"--{kind.replace('_', '-')}"
                path, origin = resolve(spec, option, work, allow_pickle)
                add(kind, origin, controlnet(path, staged / kind, kind, allow_pickle))
        statuses, problems, _ = check_weights(str(staged))
        if problems:  # before the (slow) face-adapter conversion, which needs a UNet that fits
            raise ValueError("the parts do not fit together:\n  " + "\n  ".join(problems))
        if face_adapter_src:
            path, origin = resolve(face_adapter_src, "--face-adapter", work, allow_pickle)
            add("face_adapter", origin, face_adapter(path, staged / "face_adapter", staged, allow_pickle))
            statuses, problems, _ = check_weights(str(staged))
            if problems:
                raise ValueError("the parts do not fit together:\n  " + "\n  ".join(problems))
        broken = [s for s in statuses if s.state not in ("ok", "missing") or (s.required and s.state != "ok")]
        if broken:
            raise ValueError("assembled folder is incomplete: " + ", ".join(f"{s.name} ({s.state})" for s in broken))
        meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "tool": "motioncharacter weights assemble", "parts": parts}
        (staged / WEIGHTS_JSON).write_text(json.dumps(meta, indent=1))
        if out_is_s3:
            storage.upload_dir(staged, output)
        else:
            if Path(output).exists():
                Path(output).rmdir()  # empty (checked above)
            staged.rename(output)
    return meta


def write_tiny(output: str, seed: int = 0, with_adapter: bool = True, controlnets: bool = False) -> Path | str:
    """The tiny preset in the weights layout (plus weights.json), locally or to s3://."""
    from .presets import save_tiny_weights

    def write(d: Path) -> None:
        save_tiny_weights(d, seed=seed, with_adapter=with_adapter)
        origin = {"source": f"motioncharacter tiny preset (random, seed {seed})", "format": "diffusers folder",
                  "conversion": "none"}
        names = list(REQUIRED) + ["scheduler", "feature_extractor"] + (["adapter"] if with_adapter else [])
        if controlnets:
            from .control import tiny_controlnet

            for kind, sub in (("pose", "controlnet_pose"), ("depth", "controlnet_depth"), ("sparse", "sparsectrl")):
                tiny_controlnet(kind, seed={"pose": 11, "depth": 12, "sparse": 13}[kind]).save_pretrained(
                    d / sub, safe_serialization=True)
                names.append(sub)
        meta = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "tool": "motioncharacter weights tiny", "parts": {n: dict(origin) for n in names}}
        (d / WEIGHTS_JSON).write_text(json.dumps(meta, indent=1))

    if storage.is_s3(output):
        with tempfile.TemporaryDirectory(prefix="mc-tiny-", dir=storage.cache_dir()) as tmp:
            write(Path(tmp))
            storage.upload_dir(tmp, output)
        return output
    if Path(output).exists() and any(Path(output).iterdir()):
        raise ValueError(f"{output} exists and is not empty; choose a new folder")
    write(Path(output))
    return Path(output)


# ---- CLI -------------------------------------------------------------------------------------------------
def add_commands(sub) -> None:
    p = sub.add_parser("weights", help="assemble, check or write a weights folder (--weights)",
                       description="Weights folders for --weights: assemble one from public checkpoints, check what "
                                   "one holds, or write the tiny preset in the same layout.")
    wsub = p.add_subparsers(dest="weights_command", metavar="SUBCOMMAND", required=True)
    a = wsub.add_parser(
        "assemble", help="build a weights folder from SD1.5, AnimateDiff, IP-Adapter's image encoder, ...",
        description="Assemble a weights folder (unet/ vae/ text_encoder/ tokenizer/ motion_adapter/ image_encoder/ "
                    "scheduler/ feature_extractor/ [+ ControlNets, face_adapter/]) from public parts, check the parts "
                    "against each other and write weights.json saying where each came from. Every input may be a "
                    "local path, an s3:// URI or (with network) a Hugging Face hub repository id.")
    a.add_argument("--base", required=True, metavar="DIR_OR_FILE",
                   help="SD1.5: a diffusers folder (unet/ vae/ text_encoder/ tokenizer/) or a single-file "
                        "checkpoint in the original layout (.safetensors, or .ckpt with --allow-pickle)")
    a.add_argument("--base-config", metavar="DIR",
                   help="for a single-file --base of another architecture than SD1.5: a diffusers folder whose "
                        "unet/ vae/ text_encoder/ configs describe it (default: SD1.5's configs, built in)")
    a.add_argument("--motion-adapter", required=True, metavar="DIR_OR_FILE",
                   help="AnimateDiff: a diffusers MotionAdapter folder, or the original motion module "
                        "(mm_sd_v15_v2.ckpt with --allow-pickle, or a .safetensors copy)")
    a.add_argument("--motion-adapter-config", metavar="JSON_OR_DIR",
                   help="MotionAdapter config values for an original motion module that its tensors cannot show "
                        "(motion_num_attention_heads, motion_norm_num_groups; default: AnimateDiff's 8 and 32)")
    a.add_argument("--image-encoder", required=True, metavar="DIR",
                   help="CLIPVisionModelWithProjection folder, e.g. IP-Adapter's models/image_encoder (or the "
                        "IP-Adapter folder holding it)")
    a.add_argument("--controlnet-pose", metavar="DIR", help="pose ControlNet (diffusers ControlNetModel folder)")
    a.add_argument("--controlnet-depth", metavar="DIR", help="depth ControlNet (diffusers ControlNetModel folder)")
    a.add_argument("--sparsectrl", metavar="DIR", help="SparseCtrl (diffusers SparseControlNetModel folder)")
    a.add_argument("--face-adapter", metavar="FILE",
                   help="ID-Animator's released face adapter (animator.ckpt with --allow-pickle, or .safetensors)")
    a.add_argument("--allow-pickle", action="store_true",
                   help="read pickled inputs (.ckpt/.bin/.pt), which can run code when loaded; they are written "
                        "as safetensors, so this is needed once")
    a.add_argument("--output", required=True, metavar="DIR_OR_S3", help="new weights folder or s3:// prefix")
    a.set_defaults(func=run_assemble)
    c = wsub.add_parser("check", help="what a weights folder holds, lacks, and what does not fit",
                        description="Report each part of a weights folder (required/optional, present, its sizes and "
                                    "source) and every mismatch between parts; exit status 1 when it is unusable.")
    c.add_argument("weights", metavar="DIR_OR_S3", help="weights folder or s3:// prefix")
    c.set_defaults(func=run_check)
    t = wsub.add_parser("tiny", help="write the tiny preset (small random models) as a weights folder",
                        description="Write the tiny preset's random models in the weights layout, for smoke runs "
                                    "and tests of --weights paths.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("output", metavar="DIR_OR_S3", help="new folder or s3:// prefix")
    t.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    t.add_argument("--no-adapter", action="store_true", help="leave out adapter/ (the MotionCharacter adapter)")
    t.add_argument("--controlnets", action="store_true",
                   help="also write tiny controlnet_pose/, controlnet_depth/ and sparsectrl/")
    t.set_defaults(func=run_tiny)


def run_assemble(args) -> int:
    meta = assemble(args.base, args.motion_adapter, args.image_encoder, args.output,
                    controlnet_pose=args.controlnet_pose, controlnet_depth=args.controlnet_depth,
                    sparsectrl=args.sparsectrl, face_adapter_src=args.face_adapter, base_config=args.base_config,
                    motion_adapter_config_src=args.motion_adapter_config, allow_pickle=args.allow_pickle)
    for name, rec in meta["parts"].items():
        print(f"{name:<18} {rec.get('format', '')}: {rec.get('conversion', '')}")
    print(f"wrote {args.output} ({WEIGHTS_JSON} says where each part came from)")
    return 0


def run_check(args) -> int:
    statuses, problems, meta = check_weights(args.weights)
    print(format_report(args.weights, statuses, problems, meta))
    return 0 if usable(statuses, problems) else 1


def run_tiny(args) -> int:
    out = write_tiny(args.output, seed=args.seed, with_adapter=not args.no_adapter, controlnets=args.controlnets)
    print(f"wrote the tiny preset to {out}")
    return 0
