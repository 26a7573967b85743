"""ID-Animator's face adapter (sec. 3.2 of the paper), in the layout of its released ``animator.ckpt``.

* ``Resampler``: the query-based image encoder. A fixed set of learnable queries attends to the
  CLIP image encoder's patch features (the penultimate hidden states) and returns ``num_queries``
  tokens in the text-embedding width (the release: depth 4, 12 heads of 64, ff x4, 16 queries).
  DreaMoving's Content Guider (content_guider.py) uses it too.
* ``IDAnimatorFaceAdapter``: the resampler plus, per spatial cross-attention layer, LoRA on
  to_q/to_k/to_v/to_out (rank 128 in the release) and the decoupled face projections
  to_k_face/to_v_face. Per layer:
      Q = h Wq + LoRA_q(h),  K, V = c_t (Wk, Wv) + LoRA_k/v(c_t)
      Z = Attn(Q, K, V) + lambda * Attn(Q, c_f W_k^face, c_f W_v^face)
      out = Z Wout + b + LoRA_out(Z)
  The release appends the face tokens c_f after the text tokens and splits them off inside the
  processor; here they travel in ``cross_attention_kwargs`` (``GuiderConditioning``), which is the
  same computation. The LoRA also changes the text path, so (unlike the Content Guider) lambda = 0
  is the base model only while the LoRA is untrained (its ``up`` weights start at zero).
  id_animator_release.py converts the published checkpoint into this model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys and values from [image features; latents]."""

    def __init__(self, width: int, heads: int, dim_head: int | None = None):
        super().__init__()
        if dim_head is None:  # the attention keeps the resampler's width
            if width % heads:
                raise ValueError(f"resampler width {width} is not divisible by {heads} heads")
            dim_head = width // heads
        self.heads, self.inner = heads, heads * dim_head
        self.norm_x = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, self.inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * self.inner, bias=False)
        self.to_out = nn.Linear(self.inner, width, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        b, n, _ = latents.shape
        lat = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_x(x), lat], dim=1)
        hd = self.inner // self.heads
        q = self.to_q(lat).view(b, n, self.heads, hd).transpose(1, 2)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        k = k.view(b, -1, self.heads, hd).transpose(1, 2)
        v = v.view(b, -1, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.inner))


class Resampler(nn.Module):
    """(B, N, in_dim) image features -> (B, num_queries, out_dim) tokens."""

    def __init__(self, in_dim: int, width: int, out_dim: int, num_queries: int = 16, depth: int = 2,
                 heads: int = 4, ff_mult: int = 2, dim_head: int | None = None):
        """``dim_head`` None: heads split ``width``; ID-Animator's release uses 12 heads of 64 (inner 768)."""
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, width) / width ** 0.5)
        self.proj_in = nn.Linear(in_dim, width)
        self.attn = nn.ModuleList(PerceiverAttention(width, heads, dim_head) for _ in range(depth))
        self.ff = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, ff_mult * width, bias=False),
                                              nn.GELU(), nn.Linear(ff_mult * width, width, bias=False))
                                for _ in range(depth))
        self.proj_out = nn.Linear(width, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        latents = self.queries.expand(x.shape[0], -1, -1)
        for attn, ff in zip(self.attn, self.ff):
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class LoRA(nn.Module):
    """x -> up(down(x)): a rank-``rank`` update of a frozen linear layer (``up`` starts at zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class FaceAdapterLayer(nn.Module):
    """The face adapter's weights for one attn2 layer (names as in the release)."""

    def __init__(self, query_dim: int, inner_dim: int, text_dim: int, rank: int, zero_init: bool):
        super().__init__()
        self.to_q_lora = LoRA(query_dim, inner_dim, rank)
        self.to_k_lora = LoRA(text_dim, inner_dim, rank)
        self.to_v_lora = LoRA(text_dim, inner_dim, rank)
        self.to_out_lora = LoRA(inner_dim, query_dim, rank)
        self.to_k_face = nn.Linear(text_dim, inner_dim, bias=False)
        self.to_v_face = nn.Linear(text_dim, inner_dim, bias=False)
        if zero_init:  # an untrained adapter adds nothing
            nn.init.zeros_(self.to_v_face.weight)


class IDAnimatorAttnProcessor:
    """The face adapter's cross-attention (see the module doc). A plain object, so the weights stay
    in the adapter and never enter the UNet's state dict."""

    def __init__(self, layer: FaceAdapterLayer):
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 motioncharacter_conditioning=None):
        from .attention import _per_sample_attention

        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None \
                or attn.residual_connection:
            raise ValueError("the ID-Animator face adapter supports transformer cross-attention layers only")
        lay = self.layer
        b = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.to_q(hidden_states) + lay.to_q_lora(hidden_states)
        key = attn.to_k(context) + lay.to_k_lora(context)
        value = attn.to_v(context) + lay.to_v_lora(context)
        hd = key.shape[-1] // attn.heads
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        q, k, v = (x.view(b, -1, attn.heads, hd).transpose(1, 2) for x in (query, key, value))
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        z = z.transpose(1, 2).reshape(b, -1, attn.heads * hd).to(query.dtype)
        c = motioncharacter_conditioning
        if c is not None and c.face_tokens is not None and c.face_scale != 0:
            # the face branch shares the LoRA-adapted query and is added before the out-projection
            z = z + c.face_scale * _per_sample_attention(query, c.face_tokens.to(query.dtype), lay.to_k_face,
                                                         lay.to_v_face, attn.heads)
        out = attn.to_out[1](attn.to_out[0](z) + lay.to_out_lora(z))
        return out / attn.rescale_output_factor


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot contain dots


class IDAnimatorFaceAdapter(ModelMixin, ConfigMixin):
    """ID-Animator's trainable weights: ``image_proj`` (the resampler) and one ``FaceAdapterLayer`` per
    spatial cross-attention layer. Saved as ``face_adapter/`` in a weights folder (safetensors)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, layer_dims: dict[str, list[int]], text_dim: int = 768, clip_hidden_dim: int = 1280,
                 num_queries: int = 16, resampler_depth: int = 4, resampler_heads: int = 12,
                 resampler_dim_head: int = 64, resampler_ff_mult: int = 4, lora_rank: int = 128,
                 zero_init: bool = True):
        """``layer_dims``: attn2 layer name -> [query dim, inner dim]. The defaults are the release's."""
        super().__init__()
        self.image_proj = Resampler(clip_hidden_dim, text_dim, text_dim, num_queries=num_queries,
                                    depth=resampler_depth, heads=resampler_heads, ff_mult=resampler_ff_mult,
                                    dim_head=resampler_dim_head)
        self.layers = nn.ModuleDict({_key(n): FaceAdapterLayer(qd, inner, text_dim, lora_rank, zero_init)
                                     for n, (qd, inner) in layer_dims.items()})

    @classmethod
    def for_unet(cls, unet, clip_hidden_dim: int, seed: int | None = None, **kw) -> "IDAnimatorFaceAdapter":
        """A fresh adapter shaped for ``unet`` (zero-output unless ``zero_init=False``)."""
        from .attention import spatial_cross_attention_layers

        dims = {n: [m.to_q.in_features, m.inner_dim] for n, m in spatial_cross_attention_layers(unet).items()}
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            return cls(layer_dims=dims, text_dim=unet.config.cross_attention_dim, clip_hidden_dim=clip_hidden_dim,
                       **kw)

    def attach(self, unet) -> None:
        from .attention import install_processors

        install_processors(unet, self.config.layer_dims, lambda name: IDAnimatorAttnProcessor(
            self.layers[_key(name)]), "face adapter")

    def face_tokens(self, clip_hidden: torch.Tensor, face_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """c_f (B, num_queries, text_dim) from CLIP's penultimate hidden states; ID-Animator uses no
        face-recognition embedding (``face_embeds`` is accepted for the Content Guider's signature)."""
        return self.image_proj(clip_hidden.to(self.dtype))

    def cloth_tokens(self, clip_hidden: torch.Tensor) -> torch.Tensor:
        raise ValueError("ID-Animator's face adapter has no cloth branch: use mode dreamoving")


def clip_zero_pixels(feature_extractor, batch: int = 1) -> torch.Tensor:
    """All-zero CLIP input pixels (after normalisation): ID-Animator's "no face image", whose CLIP
    features give the unconditional tokens in its release and the dropped reference in training."""
    crop = feature_extractor.crop_size
    return torch.zeros(batch, 3, crop["height"], crop["width"])
