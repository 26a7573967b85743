"""``motioncharacter train-base``: train the ``mini`` base model from scratch on a prepared manifest.

The paper builds on a pre-trained video diffusion model; on this machine nothing can be
downloaded, so the ``mini`` preset makes its own, small enough for 2 CPU cores:

1. a VAE (diffusers ``AutoencoderKL``, 8x down-sampling as SD's: 64x64 frames <-> 8x8x8 latents),
   trained as an autoencoder (L1 + MSE + a small KL term) on every frame of the manifest, its
   ``scaling_factor`` set so the latents have unit variance (as SD's 0.18215 was chosen);
2. a UNet + AnimateDiff motion modules (``UNet2DConditionModel`` + ``MotionAdapter``, saved
   separately as real weights are), trained jointly as a text-to-video diffusion model
   (v-prediction, which samples far better than epsilon from a briefly trained model; min-SNR-5
   weighting; 10 % empty captions for guidance; EMA weights)
   on the manifest's 8-frame clips with their captions.

Text and image encoders are small random CLIP models (frozen, never trained: they only need to
give distinct embeddings). The output is a weights folder in the diffusers layout, with
``motioncharacter.json`` naming the sizes to generate at, so ``generate --weights``, ``train``,
``evaluate``, ``deploy`` and the pipeline take it unchanged. The MotionCharacter adapter is then
trained on this frozen base by ``motioncharacter train``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from motioncharacter import storage

log = logging.getLogger("motioncharacter.train")
from motioncharacter.model.loading import WEIGHTS_INFO  # generation defaults and lineage, at the weights root


@dataclass
class BaseSettings:
    resolution: int = 64
    num_frames: int = 8
    vae_steps: int = 400
    vae_batch: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 1800
    unet_batch: int = 4
    unet_lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    seed: int = 0
    infer_steps: int = 25      # written to motioncharacter.json as the generation default
    guidance: float = 4.0
    ref_encoder_size: int = 64  # the adapter trained on this base encodes the reference crop at this size
    mean_latents: bool = True   # train the UNet on the VAE posterior means (samples teach frame jitter)
    latent_channels: int = 8
    vae_downsample: int = 8     # 8 (SD's factor) or 4: 16x16 latents at 64 px keep more of a face (vae_ceiling)
    vae_face_weight: float = 0.0  # > 0: an SFace identity term on the VAE's reconstructions (see train_vae)


MINI = {"text_dim": 32, "clip_image_dim": 32}


def mini_configs(s: BaseSettings) -> dict:
    if s.vae_downsample not in (2, 4, 8):
        raise ValueError(f"vae_downsample must be 2, 4 or 8, got {s.vae_downsample!r}")
    lat = s.resolution // s.vae_downsample
    blocks = int(math.log2(s.vae_downsample)) + 1  # each block but the last halves the size
    return dict(
        # cross-attention at both latent resolutions (8x8 and 4x4 at 64 px): the ID tokens, the
        # reference's patch tokens among them, need the finer level to place a face's features
        unet=dict(sample_size=lat, in_channels=s.latent_channels, out_channels=s.latent_channels, layers_per_block=1,
                  block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=MINI["text_dim"],
                  attention_head_dim=8, norm_num_groups=16),
        motion_adapter=dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=16, motion_max_seq_length=32, use_motion_mid_block=False),
        vae=dict(in_channels=3, out_channels=3, latent_channels=s.latent_channels,
                 block_out_channels=(16, 32, 64, 64)[:blocks], down_block_types=("DownEncoderBlock2D",) * blocks,
                 up_block_types=("UpDecoderBlock2D",) * blocks,
                 layers_per_block=1, norm_num_groups=16, sample_size=s.resolution, mid_block_add_attention=False),
    )


def build_mini(s: BaseSettings) -> dict:
    """Freshly initialised mini components (the tiny preset's encoders and tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    from motioncharacter.model.presets import animatediff_scheduler_config, build_tiny

    tiny = build_tiny(seed=s.seed)  # random CLIP text/image encoders + the real tokenizer
    c = mini_configs(s)
    with torch.random.fork_rng():
        torch.manual_seed(s.seed)
        parts = dict(unet=UNet2DConditionModel(**c["unet"]), motion_adapter=MotionAdapter(**c["motion_adapter"]),
                     vae=AutoencoderKL(**c["vae"]))
    for k in ("text_encoder", "tokenizer", "image_encoder", "feature_extractor"):
        parts[k] = tiny[k]
    parts["scheduler"] = DDIMScheduler(**animatediff_scheduler_config(), prediction_type="v_prediction")
    return parts


# ---- data -----------------------------------------------------------------------------------------

def load_clips(manifest_uri: str, s: BaseSettings, landmarks: bool = False):
    """Every kept clip's first ``num_frames`` frames at the training size, (N, F, 3, R, R) in [-1, 1],
    and its caption. Stills (one repeated frame) are included, as in image-video joint training.
    ``landmarks``: also the face's 5 points per frame in those pixels, (N, F, 5, 2), and their
    validity (N, F) (0 where the face was not detected)."""
    from .data import ManifestDataset, read_manifest
    from .settings import DataSettings

    m = read_manifest(manifest_uri)
    reader = ManifestDataset(m, DataSettings(), s.resolution)
    clips, captions, lms, valid = [], [], [], []
    for rec in m.records:
        paths = list(rec["frames"])[: s.num_frames]
        sel = list(range(len(paths))) + [len(paths) - 1] * (s.num_frames - len(paths))
        paths += [paths[-1]] * (s.num_frames - len(paths))
        frames = np.stack([reader._frame(rec, p) for p in paths])
        clips.append(frames)
        captions.append(str(rec.get("caption") or ""))
        if landmarks:
            lm, ok = reader._landmarks(rec, sel)
            lms.append(lm)
            valid.append(ok)
    x = torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
    if landmarks:
        return x, captions, torch.from_numpy(np.stack(lms)), torch.from_numpy(np.stack(valid))
    return x, captions


# ---- the two trainings ------------------------------------------------------------------------------

def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))


def _lr_at(step: int, s: BaseSettings, base: float, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < s.warmup:
        return base * (step + 1) / s.warmup
    p = (step - s.warmup) / max(1, total - s.warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, clips: torch.Tensor, s: BaseSettings, on_step=None, landmarks=None, valid=None,
              face_model=None) -> list[float]:
    """Autoencoder training: L1 + MSE reconstruction + a KL term (``kl_weight`` per latent element:
    strong enough to keep the latent space smooth, which the diffusion model needs), random flips.
    With ``face_model`` (a differentiable face embedder, e.g. SFace) and the frames' ``landmarks``
    (N, F, 5, 2) / ``valid`` (N, F): plus ``vae_face_weight`` x (1 - cosine) between the embeddings
    of each reconstructed face and the original, both aligned by the landmarks, so that what makes
    a face that person's survives the 8x down-sampling (pixel losses alone keep a generic face)."""
    from motioncharacter.model.arcface import align_faces

    from .data import FLIP_LANDMARKS

    frames = clips.flatten(0, 1)
    use_face = face_model is not None and landmarks is not None and s.vae_face_weight > 0
    if use_face:
        lms, ok = landmarks.flatten(0, 1).float(), valid.flatten(0, 1) > 0
    g = torch.Generator().manual_seed(s.seed)
    opt = _adamw(vae.parameters(), s.vae_lr)
    vae.train()
    losses = []
    for step in range(s.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s, s.vae_lr, s.vae_steps)
        idx = torch.randint(len(frames), (s.vae_batch,), generator=g)
        x = frames[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + s.kl_weight * kl
        if use_face and bool(ok[idx].any()):
            lm = lms[idx]
            mirrored = lm[:, FLIP_LANDMARKS] * torch.tensor([-1.0, 1.0]) + torch.tensor([x.shape[-1] - 1.0, 0.0])
            lm = torch.where(flip[:, None, None], mirrored, lm)[ok[idx]]
            size = face_model.input_size
            with torch.no_grad():
                target = face_model(align_faces(x[ok[idx]], lm, size=size))
            got = face_model(align_faces(rec[ok[idx]], lm, size=size))
            loss = loss + s.vae_face_weight * (1 - (got * target).sum(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        if on_step:
            on_step("vae", step + 1, float(loss))
    vae.eval()
    return losses


@torch.no_grad()
def set_scaling_factor(vae, clips: torch.Tensor) -> float:
    """1 / std of the latent means, so the diffusion model sees unit-variance latents."""
    x = clips.flatten(0, 1)
    std = float(torch.cat([vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)]).std())
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    return vae.config.scaling_factor


@torch.no_grad()
def encode_latents(vae, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) latents of every clip and of its mirror image, (2N, C, F, h, w), scaled."""
    sf = vae.config.scaling_factor
    out_m, out_s = [], []
    for x in (clips, clips.flip(-1)):
        post = vae.encode(x.flatten(0, 1)).latent_dist
        n, f = x.shape[:2]
        for t, acc in ((post.mean, out_m), (post.std, out_s)):
            acc.append((t * sf).reshape(n, f, *t.shape[1:]).permute(0, 2, 1, 3, 4))
    return torch.cat(out_m), torch.cat(out_s)


def train_unet(unet, text_emb: torch.Tensor, lat_mean: torch.Tensor, lat_std: torch.Tensor, scheduler,
               s: BaseSettings, on_step=None) -> tuple[torch.nn.Module, list[float]]:
    """Text-to-video diffusion training of a UNetMotionModel from scratch; returns the EMA copy.

    ``text_emb``: (2N, 77, D) caption embeddings (row 0 of ``null`` is the empty caption at the end)."""
    g = torch.Generator().manual_seed(s.seed + 1)
    null = text_emb[-1:]
    text_emb = text_emb[:-1]
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = _adamw(unet.parameters(), s.unet_lr)
    ac = scheduler.alphas_cumprod
    snr = ac / (1 - ac)
    weight = torch.clamp(snr, max=s.min_snr_gamma) / (snr + 1)  # min-SNR-gamma for v-prediction
    unet.train()
    losses = []
    f = lat_mean.shape[2]
    for step in range(s.unet_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s, s.unet_lr, s.unet_steps)
        idx = torch.randint(len(lat_mean), (s.unet_batch,), generator=g)
        z = lat_mean[idx] if s.mean_latents else lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape,
                                                                                              generator=g)
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (s.unet_batch,), generator=g)
        noisy = scheduler.add_noise(z, noise, t)
        txt = text_emb[idx]
        drop = torch.rand(s.unet_batch, generator=g) < s.caption_dropout
        txt = torch.where(drop[:, None, None], null.expand_as(txt), txt).repeat_interleave(f, 0)
        pred = unet(noisy, t, encoder_hidden_states=txt).sample
        per = (pred - scheduler.get_velocity(z, noise, t)).pow(2).mean(dim=(1, 2, 3, 4))
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - d)
        losses.append(float(per.mean()))
        if on_step:
            on_step("unet", step + 1, losses[-1])
    return ema.eval(), losses


# ---- the stage -----------------------------------------------------------------------------------

def train_base(manifest_uri: str, output: str, s: BaseSettings | None = None, *, progress: bool = True,
               track: bool = True) -> dict:
    """Train the mini base on a manifest and write a weights folder (local or s3://) at ``output``."""
    import tempfile

    from tqdm import tqdm

    from motioncharacter.model.motion_module import motion_unet

    s = s or BaseSettings()
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    clips, captions, landmarks, valid = load_clips(manifest_uri, s, landmarks=True)
    parts = build_mini(s)
    bar = tqdm(total=s.vae_steps + s.unet_steps, desc="train-base", unit="step", disable=not progress)

    def on_step(stage, step, loss):
        bar.update(1)
        bar.set_postfix(stage=stage, loss=f"{loss:.4f}")

    face_model = None
    if s.vae_face_weight > 0:
        from motioncharacter.model.sface import SFace

        face_model = SFace()
    vae_losses = train_vae(parts["vae"], clips, s, on_step, landmarks, valid, face_model)
    vae_psnr = reconstruction_psnr(parts["vae"], clips)
    set_scaling_factor(parts["vae"], clips)
    lat_mean, lat_std = encode_latents(parts["vae"], clips)
    with torch.no_grad():
        tok = parts["tokenizer"](captions + [""], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt")
        emb = parts["text_encoder"](tok.input_ids)[0]
    text_emb = torch.cat([emb[:-1], emb[:-1], emb[-1:]])  # captions of the clips and of their mirrors, then ""
    unet = motion_unet(parts["unet"], parts["motion_adapter"])
    ema, unet_losses = train_unet(unet, text_emb, lat_mean, lat_std, parts["scheduler"], s, on_step)
    bar.close()
    history = {"vae": vae_losses, "unet": unet_losses}
    minutes = (time.perf_counter() - t0) / 60

    from .data import read_manifest

    info = {"preset": "mini", "trained_here": True, "adapter": {"ref_encoder_size": s.ref_encoder_size},
            "defaults": {"frames": s.num_frames, "height": s.resolution, "width": s.resolution,
                         "steps": s.infer_steps, "guidance": s.guidance},
            "training": {"manifest": manifest_uri, "manifest_sha256": read_manifest(manifest_uri).sha256,
                         "clips": len(clips), "settings": s.__dict__, "minutes": round(minutes, 2),
                         "vae_psnr_db": round(vae_psnr, 2), "final_vae_loss": float(np.mean(vae_losses[-20:])),
                         "final_unet_loss": float(np.mean(unet_losses[-50:]))}}
    local = Path(output) if not storage.is_s3(output) else Path(tempfile.mkdtemp(prefix="mc-base-"))
    save_weights(ema, parts, local, info)
    (local / "train_base_losses.json").write_text(json.dumps(history))
    loss_plot(history, local / "train_base_losses.png")
    if storage.is_s3(output):
        storage.upload_dir(local, output)
    if track:
        _log_run(s, info, local)
    return {"output": output, **info["training"]}


def save_weights(unet_motion, parts: dict, d: Path, info: dict) -> Path:
    """The diffusers layout real weights use: unet/ (2-D UNet) and motion_adapter/ apart."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    d.mkdir(parents=True, exist_ok=True)
    # UNetMotionModel keeps the 2-D UNet's module names, plus motion_modules.*: split them back
    sd = unet_motion.state_dict()
    unet2d = UNet2DConditionModel.from_config(parts["unet"].config)
    missing, _ = unet2d.load_state_dict({k: v for k, v in sd.items() if "motion_modules" not in k}, strict=False)
    if missing:
        raise RuntimeError(f"mini UNet export lost weights: {missing[:3]}")
    adapter = MotionAdapter.from_config(parts["motion_adapter"].config)
    # {down,up}_blocks.i.motion_modules.j.* have the same names in MotionAdapter
    missing, unexpected = adapter.load_state_dict({k: v for k, v in sd.items() if "motion_modules" in k},
                                                  strict=False)
    if missing or unexpected:
        raise RuntimeError(f"mini motion-module export does not match MotionAdapter: {(missing or unexpected)[:3]}")
    unet2d.save_pretrained(d / "unet", safe_serialization=True)
    adapter.save_pretrained(d / "motion_adapter", safe_serialization=True)
    for name in ("vae", "text_encoder", "image_encoder"):
        parts[name].save_pretrained(d / name, safe_serialization=True)
    for name in ("tokenizer", "feature_extractor", "scheduler"):
        parts[name].save_pretrained(d / name)
    (d / WEIGHTS_INFO).write_text(json.dumps(info, indent=1, default=str))
    return d


def loss_plot(history: dict[str, list[float]], path: Path) -> Path:
    """Both training curves (moving average over 20 steps) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=100)
    for ax, (name, ys) in zip(axes, history.items()):
        y = np.asarray(ys, float)
        if len(y) >= 20:
            y = np.convolve(y, np.ones(20) / 20, mode="valid")
        ax.plot(y)
        ax.set(title=f"{name} loss", xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


@torch.no_grad()
def reconstruction_psnr(vae, clips: torch.Tensor, n: int = 64) -> float:
    """PSNR (dB, 8-bit scale) of VAE reconstructions (posterior mean) of up to ``n`` frames."""
    x = clips.flatten(0, 1)[:: max(1, len(clips.flatten(0, 1)) // n)][:n]
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = float(((rec - x) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _log_run(s: BaseSettings, info: dict, local: Path) -> None:
    import mlflow

    from motioncharacter import tracking

    with tracking.run("motioncharacter-train", run_name="train-base-mini", tags={"stage": "train-base"}):
        tracking.log_params({"base": s.__dict__, "manifest": info["training"]["manifest"],
                             "manifest_sha256": info["training"]["manifest_sha256"]})
        t = info["training"]
        mlflow.log_metrics({"vae_psnr_db": t["vae_psnr_db"], "final_vae_loss": t["final_vae_loss"],
                            "final_unet_loss": t["final_unet_loss"], "minutes": t["minutes"]})
        mlflow.log_artifact(str(local / WEIGHTS_INFO))
        mlflow.log_artifact(str(local / "train_base_losses.json"))
        mlflow.log_artifact(str(local / "train_base_losses.png"))
