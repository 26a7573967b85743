"""Speed and memory options of a loaded pipeline, in one place for the CLI, evaluation and Triton.

    pipe = load_pipeline(preset="tiny", acceleration=Acceleration(cache_interval=3, vae_slicing=True))

Each option was measured (bench/bench_sampling.py, bench/bench_gpu.py; figures in the README);
defaults are the ones that help without changing the output beyond the measured tolerance.
* cache_interval / cache_depth: DeepCache-style feature reuse across steps (model/deepcache.py).
* vae_slicing / vae_tiling: decode one frame / one tile at a time (diffusers' AutoencoderKL options).
* ff_chunking: feed-forward layers run over chunks of the sequence (diffusers' forward chunking).
* split_guidance: the unconditional and conditional halves of classifier-free guidance run one after
  the other instead of as one batch: half the activation memory, same result.
* split_frames: diffusers' FreeNoise split inference for the spatial layers (resnets, spatial
  attention, samplers): N frames at a time, so a long video's activations inside a layer stop growing
  with its frame count. It implies split_guidance: the per-sample conditioning must see one video per
  UNet call.
* cpu_offload: diffusers' model CPU offload (accelerator devices only: weights wait in host memory).
* channels_last, fuse_qkv, compile: memory layout, fused self-attention projections, torch.compile.
* action_tokens: "eot" lets the action attention read the phrase up to its end-of-text token only
  instead of all 77 CLIP positions (the rest is padding).
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields

ACTION_TOKENS = ("all", "eot")
MAX_INTERVAL = 10


def check_cache(interval, depth, unet=None) -> None:
    """ValueError naming the bad option (before any model work)."""
    if isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL:
        raise ValueError(f"cache_interval must be an integer in [1, {MAX_INTERVAL}] (1 = no caching), "
                         f"got {interval!r}")
    if depth is not None:
        layers = len(unet.up_blocks[-1].resnets) if unet is not None else None
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 or (layers and depth > layers):
            raise ValueError(f"cache_depth must be an integer in [1, {layers or 'layers of the last up block'}], "
                             f"got {depth!r}")
    if unet is not None and interval > 1:
        if getattr(unet.config, "addition_embed_type", None) or getattr(unet, "encoder_hid_proj", None) is not None:
            raise ValueError("cache_interval > 1 supports SD1.5-style UNets (no added embeddings); "
                             "use cache_interval=1 for this model")


@dataclass(frozen=True)
class Acceleration:
    # on by default: interval 3 keeps the mini model's intensity adherence (Spearman 0.713 vs 0.708
    # uncached, PSNR 35.9 dB against the uncached frames) at 2.61x fewer UNet FLOPs (README)
    cache_interval: int = 3
    cache_depth: int = 1
    vae_slicing: bool = False
    vae_tiling: bool = False
    ff_chunking: bool = False
    split_guidance: bool = False
    split_frames: int = 0
    cpu_offload: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    action_tokens: str = "all"

    def check(self) -> "Acceleration":
        check_cache(self.cache_interval, self.cache_depth)
        for f in fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")
        if isinstance(self.split_frames, bool) or not isinstance(self.split_frames, int) or self.split_frames < 0:
            raise ValueError(f"split_frames must be an integer >= 0 (0 = off), got {self.split_frames!r}")
        if self.action_tokens not in ACTION_TOKENS:
            raise ValueError(f"action_tokens must be one of {', '.join(ACTION_TOKENS)}, got {self.action_tokens!r}")
        return self

    def validate(self) -> None:  # the config loader's hook
        self.check()

    # ---- transport: Triton config parameters and MLflow params are strings ------------------------
    def to_params(self) -> dict[str, str]:
        return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict) -> "Acceleration":
        kw = {}
        for f in fields(cls):
            if f.name not in params or params[f.name] in ("", None):
                continue
            v = params[f.name]
            if f.type in ("bool", bool):
                s = str(v).lower()
                if s not in ("true", "false", "1", "0"):
                    raise ValueError(f"{f.name} must be true or false, got {v!r}")
                kw[f.name] = s in ("true", "1")
            elif f.type in ("int", int):
                try:
                    kw[f.name] = int(v)
                except (TypeError, ValueError):
                    raise ValueError(f"{f.name} must be an integer, got {v!r}") from None
            else:
                kw[f.name] = str(v)
        return cls(**kw).check()

    # ---- applying to a loaded pipeline (the per-step parts are read by pipeline.denoise) ----------
    def apply(self, pipe) -> None:
        self.check()
        import torch

        pipe.acceleration = self
        check_cache(self.cache_interval, self.cache_depth, pipe.unet)
        if self.vae_slicing:
            pipe.vae.enable_slicing()
        if self.vae_tiling:
            pipe.vae.enable_tiling()
        if self.ff_chunking:
            pipe.unet.enable_forward_chunking(chunk_size=1, dim=1)
        split_frames(pipe.unet, self.split_frames)
        if self.fuse_qkv:
            pipe.unet.fuse_qkv_projections()  # every processor becomes the fused one ...
            pipe.adapter.attach(pipe.unet)     # ... then the MotionCharacter cross-attention comes back
        if self.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if self.cpu_offload:
            if pipe.device.type == "cpu":
                raise ValueError("cpu_offload keeps weights in host memory while an accelerator computes; "
                                 "on a CPU-only device it has nothing to offload (drop --cpu-offload)")
            pipe.enable_model_cpu_offload(device=pipe.device)
        if self.compile:
            pipe.unet = torch.compile(pipe.unet)


# layer list -> keyword inputs split on the (B*F) batch axis, as diffusers'
# AnimateDiffFreeNoiseMixin.enable_free_noise_split_inference wires the spatial layers
_SPATIAL = {"resnets": ("input_tensor", "temb"), "attentions": ("hidden_states", "encoder_hidden_states"),
            "downsamplers": ("hidden_states",), "upsamplers": ("hidden_states",)}


def split_frames(unet, frames: int) -> None:
    """diffusers' SplitInferenceModule around each spatial layer's forward, ``frames`` rows of the
    (B*F) batch at a time; 0 undoes it.

    The forward method is replaced on the instance instead of the module in its list (what
    ``enable_free_noise_split_inference`` does), so layer names, state-dict keys and the adapters'
    processor names stay the same and the option can be switched off. The motion modules are not
    split here: FreeNoise rebuilds their blocks for each long video and already runs them window by
    window (model/long_video.py)."""
    from diffusers.pipelines.free_noise_utils import SplitInferenceModule

    # a mid block without motion modules is diffusers' UNetMidBlock2DCrossAttn, which passes its inputs
    # by position (SplitInferenceModule splits keywords only); it is the smallest level anyway
    mid = [unet.mid_block] if getattr(unet.mid_block, "motion_modules", None) is not None else []
    for block in [*unet.down_blocks, *mid, *unet.up_blocks]:
        for attr, keys in _SPATIAL.items():
            for mod in getattr(block, attr, None) or ():
                mod.__dict__.pop("forward", None)
                if frames:  # an instance attribute, not a registered submodule: the module tree stays
                    object.__setattr__(mod, "forward", SplitInferenceModule(mod.forward, frames, 0, list(keys)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options as command-line flags (generate, evaluate --set generation..., deploy)."""
    g = p.add_argument_group("speed and memory (see README: measured effect of each)")
    d = Acceleration()
    g.add_argument("--cache-interval", type=int, default=d.cache_interval, metavar="N",
                   help=f"DeepCache: run the full UNet every N-th step and only its shallow branch in between "
                        f"(1 = off, up to {MAX_INTERVAL})")
    g.add_argument("--cache-depth", type=int, default=d.cache_depth, metavar="L",
                   help="layers of the outermost up block the shallow branch recomputes (1 = fastest)")
    for name, text in (("vae-slicing", "decode one frame at a time (less memory, same frames)"),
                       ("vae-tiling", "decode in overlapping tiles (for large frames)"),
                       ("ff-chunking", "run feed-forward layers over sequence chunks (less memory)"),
                       ("split-guidance", "run guidance's two halves one after the other (half the activations)"),
                       ("cpu-offload", "keep idle models in host memory (GPU only)"),
                       ("channels-last", "channels-last memory layout for the UNet"),
                       ("fuse-qkv", "fused self-attention projections"),
                       ("compile", "torch.compile the UNet (slow first call; see README)")):
        g.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=getattr(d, name.replace("-", "_")),
                       help=text)
    g.add_argument("--split-frames", type=int, default=d.split_frames, metavar="N",
                   help="spatial layers over N frames at a time (diffusers' FreeNoise split inference; "
                        "implies --split-guidance; 0 = off)")
    g.add_argument("--action-tokens", choices=ACTION_TOKENS, default=d.action_tokens,
                   help="action attention over all 77 CLIP positions or up to the end-of-text token")


def from_args(args: argparse.Namespace) -> Acceleration:
    return Acceleration(**{f.name: getattr(args, f.name) for f in fields(Acceleration)}).check()
