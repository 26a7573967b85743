"""Attention processor for the spatial cross-attention layers (attn2) of UNetMotionModel.

One processor per layer computes, in order:
  eq. 3  Z'  = to_out( Attn(Q, K^t, V^t) + lambda * Attn(Q, K^i, V^i) )      text + ID tokens
  eq. 8  Z'' = Attn(Q', K^a, V^a) + alpha * Attn(Q', K^m, V^m),  Q' = Z' W'q   action + motion
  out  = Z' + out_motion(Z'')
``to_v_id`` and ``out_motion`` start at zero, so an untrained adapter returns the stock
output exactly. Per-sample keep masks switch branches off for single samples of a batch
(classifier-free guidance's unconditional half, condition dropout in training, an empty
action phrase): a sample with every branch off gets exactly the base model's output, with
no out-projection bias added. The conditioning travels under the project's own key,
``cross_attention_kwargs["motioncharacter_conditioning"]``, never under a key another adapter may
read (IP-Adapter's ``ip_hidden_states``): ``install_processors`` puts the project's processor on each
spatial cross-attention and has every other attention layer's processor (stock, fused or a user's)
accept and ignore the key, as diffusers' Attention would otherwise warn on every call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

COND_KEY = "motioncharacter_conditioning"


@dataclass
class MCConditioning:
    """Per-sample (not per-frame) extra tokens and the two scales.

    Token tensors are (B, T, text_dim) with B the UNet batch before frames are folded in;
    ``None`` skips that branch. ``id_scale`` is lambda (eq. 3), ``motion_scale`` alpha (eq. 8).
    ``*_keep`` are per-sample (B,) masks (1 = on, 0 = off; ``None`` = on for every sample).
    """

    id_tokens: torch.Tensor | None = None
    action_tokens: torch.Tensor | None = None
    motion_tokens: torch.Tensor | None = None
    id_scale: float = 1.0
    motion_scale: float = 1.0
    id_keep: torch.Tensor | None = None
    action_keep: torch.Tensor | None = None
    motion_keep: torch.Tensor | None = None

    def kwargs(self) -> dict:
        return {COND_KEY: self}

    def batch_size(self) -> int:
        for t in (self.id_tokens, self.action_tokens, self.motion_tokens):
            if t is not None:
                return t.shape[0]
        return 0

    def unconditional(self) -> "MCConditioning":
        """The same shapes with every branch off: classifier-free guidance's "no condition"."""
        b = self.batch_size()
        zeros = None if b == 0 else torch.zeros(b, device=_device(self))
        return MCConditioning(self.id_tokens, self.action_tokens, self.motion_tokens, self.id_scale,
                              self.motion_scale, zeros, zeros, zeros)

    @staticmethod
    def cat(a: "MCConditioning", b: "MCConditioning") -> "MCConditioning":
        """``a`` and ``b`` stacked along the batch (scales from ``b``); a branch missing in one
        of them is kept with that half switched off."""
        na, nb = a.batch_size(), b.batch_size()
        toks, keeps = {}, {}
        for br in ("id", "action", "motion"):
            ta, tb = getattr(a, f"{br}_tokens"), getattr(b, f"{br}_tokens")
            if ta is None and tb is None:
                toks[br], keeps[br] = None, None
                continue
            like = tb if tb is not None else ta
            ta = torch.zeros((na, *like.shape[1:]), dtype=like.dtype, device=like.device) if ta is None else ta
            tb = torch.zeros((nb, *like.shape[1:]), dtype=like.dtype, device=like.device) if tb is None else tb
            ka = _keep_or(getattr(a, f"{br}_keep"), na, like.device) * (getattr(a, f"{br}_tokens") is not None)
            kb = _keep_or(getattr(b, f"{br}_keep"), nb, like.device) * (getattr(b, f"{br}_tokens") is not None)
            toks[br], keeps[br] = torch.cat([ta, tb]), torch.cat([ka, kb])
        return MCConditioning(toks["id"], toks["action"], toks["motion"], b.id_scale, b.motion_scale,
                              keeps["id"], keeps["action"], keeps["motion"])


def _device(c: MCConditioning):
    for t in (c.id_tokens, c.action_tokens, c.motion_tokens):
        if t is not None:
            return t.device
    return "cpu"


def _keep_or(keep: torch.Tensor | None, n: int, device) -> torch.Tensor:
    return torch.ones(n, device=device) if keep is None else keep.to(device).float().reshape(n)


def _per_frame(keep: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``out`` (B*F, N, C) with the samples whose keep is 0 zeroed (keep: (B,) or None)."""
    if keep is None:
        return out
    b = keep.shape[0]
    return out * keep.to(out.dtype).repeat_interleave(out.shape[0] // b).view(-1, 1, 1)


def _any_on(keep: torch.Tensor | None) -> bool:
    """Whether a branch must run. While training (gradients on) always: every rank of a distributed
    run must produce gradients for the same weights in the same order (ZeRO/DDP all-reduce them as
    buckets), whatever its own samples dropped; a dropped sample's branch is zeroed by its keep."""
    return keep is None or torch.is_grad_enabled() or bool((keep != 0).any())


class MCLayer(nn.Module):
    """The adapter's weights for one attn2 layer."""

    def __init__(self, hidden_size: int, inner_dim: int, text_dim: int):
        super().__init__()
        self.to_k_id = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v_id = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_q_motion = nn.Linear(hidden_size, inner_dim, bias=False)
        self.to_k_action = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v_action = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_k_motion = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v_motion = nn.Linear(text_dim, inner_dim, bias=False)
        self.out_motion = nn.Linear(inner_dim, hidden_size)
        nn.init.zeros_(self.to_v_id.weight)
        nn.init.zeros_(self.out_motion.weight)
        nn.init.zeros_(self.out_motion.bias)


def _per_sample_attention(q: torch.Tensor, tokens: torch.Tensor, to_k: nn.Linear, to_v: nn.Linear,
                          heads: int) -> torch.Tensor:
    """Attention of (B*F, N, inner) queries over per-sample tokens (B, T, D).

    All frames of a sample share the tokens, so the frames are folded into the query
    sequence (B, F*N) instead of repeating keys per frame: same result, F times less work.
    """
    bf, n, inner = q.shape
    b = tokens.shape[0]
    if bf % b:
        raise ValueError(f"conditioning batch {b} does not divide the UNet batch {bf}")
    hd = inner // heads
    k = to_k(tokens).view(b, -1, heads, hd).transpose(1, 2)
    v = to_v(tokens).view(b, -1, heads, hd).transpose(1, 2)
    qh = q.reshape(b, (bf // b) * n, heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, k, v)
    return out.transpose(1, 2).reshape(bf, n, inner)


class MotionCharacterAttnProcessor:
    """A plain object (not an nn.Module) so the adapter's weights stay in the adapter, not
    in the UNet's state dict; the base UNet's files are never touched by saving adapters."""

    def __init__(self, layer: MCLayer):
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 motioncharacter_conditioning: MCConditioning | None = None):
        # The text path below is diffusers' AttnProcessor2_0, step for step.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        q = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        c, layer = motioncharacter_conditioning, self.layer
        # eq. 3: decoupled ID cross-attention shares Q with the text attention.
        if c is not None and c.id_tokens is not None and c.id_scale != 0 and _any_on(c.id_keep):
            hidden_states = hidden_states + c.id_scale * _per_frame(c.id_keep, _per_sample_attention(
                query, c.id_tokens.to(query.dtype), layer.to_k_id, layer.to_v_id, attn.heads))

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        # eq. 8: action and motion attention in parallel on Q' = Z' W'q.
        # A sample with both branches off gets nothing here, not even out_motion's bias.
        use_action = c is not None and c.action_tokens is not None and _any_on(c.action_keep)
        use_motion = (c is not None and c.motion_tokens is not None and c.motion_scale != 0
                      and _any_on(c.motion_keep))
        if use_action or use_motion:
            q2 = layer.to_q_motion(hidden_states)
            z2, keeps = 0, []
            if use_action:
                z2 = _per_frame(c.action_keep, _per_sample_attention(
                    q2, c.action_tokens.to(q2.dtype), layer.to_k_action, layer.to_v_action, attn.heads))
                keeps.append(_keep_or(c.action_keep, c.action_tokens.shape[0], q2.device))
            if use_motion:
                z2 = z2 + c.motion_scale * _per_frame(c.motion_keep, _per_sample_attention(
                    q2, c.motion_tokens.to(q2.dtype), layer.to_k_motion, layer.to_v_motion, attn.heads))
                keeps.append(_keep_or(c.motion_keep, c.motion_tokens.shape[0], q2.device))
            on = (torch.stack(keeps).amax(0) != 0).float()  # either branch on for that sample
            hidden_states = hidden_states + _per_frame(on, layer.out_motion(z2))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class IgnoresConditioning:
    """Wraps another attention processor so that it takes (and drops) the conditioning key."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, motioncharacter_conditioning=None, **kwargs):
        return self.inner(attn, hidden_states, *args, **kwargs)


def takes_conditioning(processor) -> bool:
    import inspect

    return COND_KEY in inspect.signature(processor.__call__).parameters


def install_processors(unet, layers, processor_for, what: str) -> None:
    """``processor_for(name)`` on every spatial cross-attention layer, which must be the ``layers`` an
    adapter (``what``) was made for; every other attention layer keeps its processor, wrapped to
    accept the conditioning key (idempotent)."""
    from diffusers.models.attention_processor import Attention

    cross = spatial_cross_attention_layers(unet)
    differ = set(layers) ^ set(cross)
    if differ:
        raise ValueError(f"{what} does not match this UNet: layers {sorted(differ)[:4]} differ "
                         "(was it made for another base model?)")
    for name, mod in unet.named_modules():
        if name in cross:
            mod.set_processor(processor_for(name))
        elif isinstance(mod, Attention) and not takes_conditioning(mod.processor):
            mod.set_processor(IgnoresConditioning(mod.processor))


def spatial_cross_attention_layers(unet) -> dict:
    """name -> Attention for every spatial cross-attention (attn2 not under motion_modules)."""
    return {name: mod for name, mod in unet.named_modules()
            if name.endswith("attn2") and "motion_modules" not in name and getattr(mod, "is_cross_attention", False)}
