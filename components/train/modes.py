"""What `motioncharacter train` trains in each ``train.mode``, on the same DeepSpeed loop:

* ``motioncharacter``: the MotionCharacter adapter (trainer.MCTrainModule);
* ``id-animator``: ID-Animator's face adapter (resampler + LoRA and face K/V per cross-attention
  layer). Its recipe: a random face-pool crop of the clip as the reference (random-reference
  training, the data already draws one per item); a dropped reference is an all-zero CLIP input,
  which is also what its release uses as the unconditional image at inference;
* ``dreamoving``: DreaMoving's Content Guider, on the face crop (CLIP + face-recognition tokens)
  and, optionally, a cloth/body image: another frame of the same clip (``data.cloth_dropout``
  leaves it out). A dropped image contributes nothing: its tokens are zeroed.

The base UNet stays frozen in every mode (its motion modules train with model.train_motion_module).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODES = ("motioncharacter", "id-animator", "dreamoving")
# where each mode's trained model lives in a weights folder, and where training exports it
EXPORT_DIR = {"motioncharacter": "adapter", "id-animator": "face_adapter", "dreamoving": "content_guider"}
_GUIDER = {"id-animator": "face_adapter", "dreamoving": "content_guider"}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"train.mode {mode!r} is unknown; choose from {', '.join(MODES)}")


def build_guider(mode: str, unet, clip_hidden_dim: int, face_dim: int, seed: int, tiny: bool,
                 weights_root: Path | None = None):
    """The face adapter or Content Guider to train: the weights folder's own (to continue from, e.g.
    a converted ID-Animator release) or a fresh, zero-output one."""
    from motioncharacter.model.content_guider import ContentGuider
    from motioncharacter.model.face_adapter import IDAnimatorFaceAdapter
    from motioncharacter.model.features import TINY_FACE_ADAPTER, guider_class

    sub = _GUIDER[mode]
    if weights_root is not None and (weights_root / sub).is_dir():
        model = guider_class(weights_root / sub).from_pretrained(weights_root / sub, use_safetensors=True)
        want = IDAnimatorFaceAdapter if mode == "id-animator" else ContentGuider
        if not isinstance(model, want):
            raise ValueError(f"{weights_root / sub} holds a {type(model).__name__}, not the {want.__name__} that "
                             f"mode {mode} trains")
        return model
    if mode == "id-animator":
        return IDAnimatorFaceAdapter.for_unet(unet, clip_hidden_dim=clip_hidden_dim, seed=seed,
                                              **(TINY_FACE_ADAPTER if tiny else {}))
    return ContentGuider.for_unet(unet, clip_hidden_dim=clip_hidden_dim, face_dim=face_dim, seed=seed,
                                  **({"num_queries": 4} if tiny else {}))


class GuiderTrainModule(nn.Module):
    """What DeepSpeed wraps in modes id-animator and dreamoving: the frozen UNet + the image-prompt model.
    Every branch runs for every sample (dropped ones with zero tokens), so all ranks of a ZeRO run
    produce gradients for the same weights."""

    def __init__(self, unet, guider, mode: str):
        super().__init__()
        self.unet, self.adapter, self.mode = unet, guider, mode
        guider.attach(unet)

    def forward(self, noisy, t, text, face_hidden, face_emb, cloth_hidden, keep_face, keep_cloth):
        from motioncharacter.model.content_guider import GuiderConditioning

        g, cloth = self.adapter, None
        if self.mode == "dreamoving":
            face = g.face_tokens(face_hidden, face_emb) * keep_face.to(face_hidden.dtype)[:, None, None]
            cloth = g.cloth_tokens(cloth_hidden) * keep_cloth.to(cloth_hidden.dtype)[:, None, None]
        else:  # a dropped reference already is the all-zero CLIP input
            face = g.face_tokens(face_hidden)
        cond = GuiderConditioning(face, cloth, face_scale=1.0, cloth_scale=1.0)
        return self.unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs=cond.kwargs()).sample


def clip_hidden(parts: dict, images, device, dtype, zero: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's penultimate hidden states (B, N, hidden) of uint8 images (B, H, W, 3); rows where
    ``zero`` (B,) is 1 get an all-zero CLIP input instead (ID-Animator's dropped reference)."""
    px = parts["feature_extractor"](images=list(images.numpy()), return_tensors="pt").pixel_values
    if zero is not None:
        px = px * (1 - zero.to(px.dtype)).view(-1, 1, 1, 1)
    return parts["image_encoder"](px.to(device, dtype), output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def guider_inputs(parts: dict, batch: dict, mode: str, device, dtype) -> tuple:
    """GuiderTrainModule's inputs after (noisy, t, text), from a training batch."""
    keep = batch["keep_image"].to(device, dtype)
    if mode == "id-animator":
        face = clip_hidden(parts, batch["ref"], device, dtype, zero=1 - batch["keep_image"])
        return face, None, None, keep, None
    face = clip_hidden(parts, batch["ref"], device, dtype)
    cloth = clip_hidden(parts, batch["body"], device, dtype)
    return face, batch["face_emb"].to(device, dtype), cloth, keep, batch["keep_cloth"].to(device, dtype)
