"""ID-Animator's released face adapter (``animator.ckpt``) -> our ``IDAnimatorFaceAdapter``.

Facts of the release (github.com/ID-Animator/ID-Animator, faceadapter/ and animatediff/models/):

* The file is a torch pickle of ``{"image_proj": {...}, "face_adapter": {...}}``; training
  checkpoints hold ``{"state_dict": {"[module.]image_proj_model.*", "[module.]adapter_modules.*"}}``.
* ``image_proj`` is a Perceiver resampler over CLIP's penultimate hidden states: ``latents``
  (1, 16, 768), ``proj_in``, ``layers.{i}.0`` = attention (``norm1`` on the image features,
  ``norm2`` on the latents, ``to_q``, ``to_kv``, ``to_out``; 12 heads of 64),
  ``layers.{i}.1.{0,1,3}`` = LayerNorm, Linear x4, GELU, Linear; depth 4; ``proj_out``, ``norm_out``.
* ``face_adapter`` is ``ModuleList(unet.attn_processors.values())``: keys ``"{index}.{weight}"``,
  the index being the position in the UNet's processor list. That list holds every diffusers
  ``Attention`` of the spatial transformers, self-attention (attn1, no weights) and cross-attention
  (attn2, the weights) alike, in module order: down_blocks, then up_blocks, then mid_block (the
  UNet registers mid_block last). The motion modules' attentions are another class without
  processors and are not in the list. So for SD1.5 the weights sit at the odd indices 1..31.
* Per cross-attention layer: ``to_{q,k,v,out}_lora.{down,up}.weight`` (rank 128, no alpha
  scaling) and ``to_k_face.weight``, ``to_v_face.weight``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .face_adapter import IDAnimatorFaceAdapter, _key

log = logging.getLogger("motioncharacter.model")

RELEASE_DIM_HEAD = 64  # the resampler's head width in the release (heads = inner width / 64)
LAYER_WEIGHTS = tuple(f"{p}.{w}.weight" for p in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora")
                      for w in ("down", "up")) + ("to_k_face.weight", "to_v_face.weight")
_SECTIONS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}
_PICKLED = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


def released_processor_order(unet) -> list[str]:
    """Names of the spatial attention layers (attn1 and attn2) in the release's processor order."""
    from diffusers.models.attention_processor import Attention

    names = [n for n, m in unet.named_modules()
             if isinstance(m, Attention) and "motion_modules" not in n and n.split(".")[0] in _SECTIONS]

    def order(name: str):
        first, *rest = name.split(".")
        return _SECTIONS[first], [int(p) if p.isdigit() else p for p in rest]

    return sorted(names, key=order)


def _split(raw: dict) -> tuple[dict, dict]:
    """(image_proj, face_adapter) sub-dicts from any of the release's layouts."""
    if isinstance(raw.get("image_proj"), dict) and isinstance(raw.get("face_adapter"), dict):
        return raw["image_proj"], raw["face_adapter"]
    flat = raw["state_dict"] if isinstance(raw.get("state_dict"), dict) else raw
    proj, face, other = {}, {}, []
    for k, v in flat.items():
        m = re.match(r"(?:module\.)?(image_proj_model|image_proj|adapter_modules|face_adapter)\.(.+)", k)
        if m is None:
            other.append(k)
        elif m.group(1).startswith("image_proj"):
            proj[m.group(2)] = v
        else:
            face[m.group(2)] = v
    if other or not (proj and face):
        raise ValueError("not an ID-Animator face adapter checkpoint: expected image_proj and face_adapter "
                         f"weights{'; unexpected keys ' + ', '.join(sorted(other)[:5]) if other else ''}")
    return proj, face


def _proj_key(k: str) -> str | None:
    if k == "latents":
        return "image_proj.queries"
    if re.fullmatch(r"(proj_in|proj_out|norm_out)\.(weight|bias)", k):
        return f"image_proj.{k}"
    m = re.fullmatch(r"layers\.(\d+)\.0\.(norm1|norm2|to_q|to_kv|to_out)\.(weight|bias)", k)
    if m:
        name = {"norm1": "norm_x", "norm2": "norm_latents"}.get(m.group(2), m.group(2))
        return f"image_proj.attn.{m.group(1)}.{name}.{m.group(3)}"
    m = re.fullmatch(r"layers\.(\d+)\.1\.([013])\.(weight|bias)", k)
    if m:
        return f"image_proj.ff.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    return None


def _config(sd: dict, unet) -> dict:
    """IDAnimatorFaceAdapter's config, read off the converted weights' shapes."""
    from .attention import spatial_cross_attention_layers

    try:
        q = sd["image_proj.queries"]
        inner = sd["image_proj.attn.0.to_q.weight"].shape[0]
        rank = next(v.shape[0] for k, v in sd.items() if k.endswith("to_q_lora.down.weight"))
        cfg = dict(text_dim=q.shape[-1], clip_hidden_dim=sd["image_proj.proj_in.weight"].shape[1],
                   num_queries=q.shape[1], resampler_ff_mult=sd["image_proj.ff.0.1.weight"].shape[0] // q.shape[-1],
                   resampler_depth=len({k.split(".")[2] for k in sd if k.startswith("image_proj.attn.")}),
                   resampler_heads=max(1, inner // RELEASE_DIM_HEAD), resampler_dim_head=min(inner, RELEASE_DIM_HEAD),
                   lora_rank=rank)
    except (KeyError, StopIteration) as e:
        raise ValueError(f"ID-Animator checkpoint is missing {e} (needed to read its sizes)") from None
    if cfg["text_dim"] != unet.config.cross_attention_dim:
        raise ValueError(f"ID-Animator checkpoint has text width {cfg['text_dim']} but this UNet's "
                         f"cross_attention_dim is {unet.config.cross_attention_dim} (another base model?)")
    cfg["layer_dims"] = {n: [m.to_q.in_features, m.inner_dim] for n, m in spatial_cross_attention_layers(unet).items()}
    return cfg


def convert_state_dict(raw: dict, unet) -> dict[str, torch.Tensor]:
    """The release's tensors under our IDAnimatorFaceAdapter keys (no copy; meta tensors work).

    Raises ValueError naming missing and unexpected keys and shape mismatches."""
    proj, face = _split(raw)
    order = released_processor_order(unet)
    out, unexpected = {}, []
    for k, v in proj.items():
        new = _proj_key(k)
        (unexpected.append(f"image_proj.{k}") if new is None else out.__setitem__(new, v))
    for k, v in face.items():
        idx, _, rest = k.partition(".")
        if not idx.isdigit() or rest not in LAYER_WEIGHTS:
            unexpected.append(f"face_adapter.{k}")
        elif int(idx) >= len(order) or not order[int(idx)].endswith("attn2"):
            where = order[int(idx)] if int(idx) < len(order) else f"past the last of {len(order)} processors"
            unexpected.append(f"face_adapter.{k} (processor {idx} is {where}, not a cross-attention layer)")
        else:
            out[f"layers.{_key(order[int(idx)])}.{rest}"] = v
    if unexpected:
        raise ValueError(f"ID-Animator checkpoint has {len(unexpected)} unexpected key(s): "
                         f"{', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
    want = expected_shapes(_config(out, unet))
    index = {_key(n): i for i, n in enumerate(order)}
    missing = [_release_name(k, index) for k in want if k not in out]
    wrong = [f"{_release_name(k, index)} is {tuple(out[k].shape)}, expected {want[k]}"
             for k in want if k in out and tuple(out[k].shape) != want[k]]
    extra = [_release_name(k, index) for k in out if k not in want]
    problems = [f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}" if missing else "",
                f"shape mismatches: {'; '.join(wrong[:6])}" if wrong else "",
                f"unexpected {', '.join(extra[:6])}" if extra else ""]
    if any(problems):
        raise ValueError(f"ID-Animator checkpoint does not fit this UNet: {'; '.join(p for p in problems if p)}")
    return out


def _release_name(our_key: str, index: dict[str, int]) -> str:
    """Our key, written as the release's key (what the user can look up in their file)."""
    if our_key.startswith("layers."):
        layer, _, rest = our_key[len("layers."):].partition(".")
        return f"face_adapter.{index.get(layer, '?')}.{rest}"
    return our_key


def expected_shapes(config: dict) -> dict[str, tuple]:
    """Parameter shapes of an IDAnimatorFaceAdapter with ``config``, built without memory."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = IDAnimatorFaceAdapter(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_checkpoint(path: str, allow_pickle: bool) -> dict:
    """A released file's tensors: safetensors always; pickles only with ``allow_pickle``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ID-Animator checkpoint {path} does not exist")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    if p.suffix.lower() not in _PICKLED:
        raise ValueError(f"{path}: unknown checkpoint format {p.suffix!r} (expected .safetensors or a torch "
                         "pickle such as animator.ckpt)")
    if not allow_pickle:
        raise ValueError(f"{path} is a pickle, which can run code when loaded; pass allow_pickle=True "
                         "(--allow-pickle) if you trust its source, and it is converted to safetensors once")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # an older pickle with non-tensor objects: the caller trusts the source
        log.warning("%s does not load with weights_only (%s); loading it as a full pickle", path, e)
        return torch.load(str(p), map_location="cpu", weights_only=False)


def convert_release(path: str, unet, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """``animator.ckpt`` (or a safetensors copy in any released layout) -> our state dict for ``unet``."""
    return convert_state_dict(read_checkpoint(path, allow_pickle), unet)


def adapter_from_state_dict(state_dict: dict[str, torch.Tensor], unet) -> IDAnimatorFaceAdapter:
    """An IDAnimatorFaceAdapter holding converted weights (save it with save_pretrained as face_adapter/)."""
    model = IDAnimatorFaceAdapter(**_config(state_dict, unet))
    model.load_state_dict(state_dict, strict=True)
    return model


def load_release(path: str, unet, allow_pickle: bool) -> IDAnimatorFaceAdapter:
    return adapter_from_state_dict(convert_release(path, unet, allow_pickle), unet)
