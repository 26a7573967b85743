"""The DeepSpeed training loop (paper sec. 3.4, 4.1): one code path for a CPU process
(gloo) and N GPUs under ``deepspeed`` / ``torchrun``.

Only the adapter (and optionally the motion modules) is in the optimizer; VAE, text and
image encoders stay frozen outside the DeepSpeed engine. Noise, timesteps and data are
drawn from generators seeded by (seed, micro-step, rank), so a resumed run repeats the
uninterrupted run's losses exactly.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from motioncharacter import storage
from motioncharacter.stack import free_port

from . import checkpoint as ck
from .data import REF_SIZE, ManifestDataset, check_files, loader, mix_seed, read_manifest
from .modes import EXPORT_DIR, GuiderTrainModule, build_guider, guider_inputs
from .settings import TrainConfig

log = logging.getLogger("motioncharacter.train")
EXIT_PREEMPTED = 143  # 128 + SIGTERM: Kubernetes restarts the pod (restartPolicy OnFailure)


class TrainingError(ValueError):
    """Training cannot go on (printed by the CLI without a traceback)."""


class Preempted(Exception):
    pass


# ---- distributed setup -------------------------------------------------------------------------

def setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size). Without a launcher: one process on loopback (gloo)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"])


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- DeepSpeed config ----------------------------------------------------------------------------

def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    """The versioned JSON (packaged deepspeed_zero2.json, then train.deepspeed_config) with
    the training config's values written in: they are the single source of truth."""
    from motioncharacter.config import PACKAGED_CONFIGS

    ds = json.loads((PACKAGED_CONFIGS / "deepspeed_zero2.json").read_text())
    if cfg.train.deepspeed_config:
        ds = _merge(ds, json.loads(storage.read_bytes(cfg.train.deepspeed_config)))
    o, r = cfg.optim, cfg.train
    ds["train_micro_batch_size_per_gpu"] = r.batch_size
    ds["gradient_accumulation_steps"] = r.grad_accum
    ds.pop("train_batch_size", None)
    ds["gradient_clipping"] = o.grad_clip
    ds.setdefault("zero_optimization", {})["stage"] = r.zero_stage
    ds["bf16"] = {"enabled": bf16}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("optimizer", {"type": "AdamW"})
    ds["optimizer"]["params"] = {**ds["optimizer"].get("params", {}), "lr": o.lr, "betas": list(o.betas),
                                 "weight_decay": o.weight_decay}
    if o.warmup_steps:
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": o.lr,
                                                          "warmup_num_steps": o.warmup_steps}}
    return ds


# ---- model ----------------------------------------------------------------------------------------

class MCTrainModule(nn.Module):
    """What DeepSpeed wraps: the UNet (frozen, unless its motion modules train) + the adapter."""

    def __init__(self, unet, adapter, motion_control: bool):
        super().__init__()
        self.unet, self.adapter, self.motion_control = unet, adapter, motion_control
        adapter.attach(unet)

    def forward(self, noisy, t, text, clip, face, action, intensity, keep_image, keep_action, keep_motion,
                ref_pixels=None, keep_clip=None):
        """``keep_*`` (B,) switch the ID, action and motion branches off per sample: image dropout,
        an empty action phrase, joint condition dropout (all off = CFG's "no condition")."""
        mc = self.motion_control
        cond = self.adapter.conditioning(clip_embeds=clip, face_embeds=face, action_embeds=action if mc else None,
                                         intensity=intensity if mc else None, id_keep=keep_image,
                                         action_keep=keep_action if mc else None,
                                         motion_keep=keep_motion if mc else None, ref_pixels=ref_pixels,
                                         clip_keep=keep_clip)
        return self.unet(noisy, t, encoder_hidden_states=text, cross_attention_kwargs=cond.kwargs()).sample


MOTION_BRANCH = ("to_q_motion", "to_k_action", "to_v_action", "to_k_motion", "to_v_motion", "out_motion")


def build_parts(cfg: TrainConfig) -> dict:
    from motioncharacter.model.adapter import MotionCharacterAdapter

    m = cfg.model
    if bool(m.weights) == bool(m.preset):
        raise ValueError("give exactly one of --weights DIR_OR_URI (model.weights) and --preset tiny (model.preset)")
    face_dim = 512 if m.arcface_pack else 128  # ArcFace or the offline SFace
    if m.preset == "mini":
        from motioncharacter.model.presets import mini_weights

        m.weights, m.preset = mini_weights(), ""
    if m.preset:
        from motioncharacter.model.motion_module import motion_unet
        from motioncharacter.model.presets import PRESETS, build_tiny

        if m.preset not in PRESETS:
            raise ValueError(f"unknown preset {m.preset!r}; choose from {', '.join(PRESETS)}")
        parts = build_tiny(seed=0)
        parts["unet"] = motion_unet(parts["unet"], parts["motion_adapter"])
        parts["adapter"] = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=32, face_dim=face_dim, seed=0)
    else:
        from motioncharacter.model.loading import load_components

        parts = load_components(m.weights)
        if parts["adapter"] is None:  # a base trained here may ask for its adapter's shape (motioncharacter.json)
            parts["adapter"] = MotionCharacterAdapter.for_unet(
                parts["unet"], clip_image_dim=parts["image_encoder"].config.projection_dim, face_dim=face_dim,
                seed=cfg.train.seed, **((parts.get("info") or {}).get("adapter") or {}))
    if cfg.train.mode != "motioncharacter":  # the face adapter or Content Guider trains instead (modes.py)
        root = None if m.preset else Path(storage.local_copy(m.weights))
        parts["adapter"] = build_guider(cfg.train.mode, parts["unet"], parts["image_encoder"].config.hidden_size,
                                        face_dim, seed=0 if m.preset else cfg.train.seed, tiny=bool(m.preset),
                                        weights_root=root)
    if getattr(parts["adapter"].config, "face_dim", face_dim) != face_dim:
        raise ValueError(f"the adapter takes {parts['adapter'].config.face_dim}-d face embeddings but "
                         f"{'ArcFace' if m.arcface_pack else 'SFace'} gives {face_dim}-d: set model.arcface_pack "
                         "to match")
    for name in ("vae", "text_encoder", "image_encoder", "unet"):
        parts[name].requires_grad_(False).eval()
    adapter = parts["adapter"].train().requires_grad_(True)
    if not m.motion_control and cfg.train.mode == "motioncharacter":  # ablation: no action/intensity branch
        adapter.intensity_encoder.requires_grad_(False)
        for layer in adapter.mc_layers.values():
            for n in MOTION_BRANCH:
                getattr(layer, n).requires_grad_(False)
    if m.train_motion_module:
        for n, mod in parts["unet"].named_modules():
            if n.endswith("motion_modules"):
                mod.requires_grad_(True)
        # the base's MotionAdapter configuration, for exporting the trained temporal layers in its layout
        if parts.get("motion_adapter") is not None:
            parts["motion_config"] = dict(parts["motion_adapter"].config)
        else:
            from diffusers import MotionAdapter

            parts["motion_config"] = MotionAdapter.load_config(Path(storage.local_copy(m.weights)) / "motion_adapter")
    if m.gradient_checkpointing:
        parts["unet"].enable_gradient_checkpointing()
    parts["unet"].train()
    return parts


def face_model(cfg: TrainConfig) -> nn.Module:
    """Eq. 4's frozen, differentiable face embedder; its ``name`` (arcface:<file>, sface or
    tiny-random) is logged with ``loss_id``. Real weights without a face model are refused by the config."""
    from motioncharacter.model.losses import TinyFaceEncoder

    if cfg.loss.face_model.strip() == "sface":  # the package-shipped SFace, converted to torch
        from motioncharacter.model.sface import SFace

        return SFace()
    source = cfg.face_model_source()
    if not source:
        return TinyFaceEncoder(dim=128).requires_grad_(False).eval()
    from motioncharacter.model.arcface import ArcFace

    return ArcFace(storage.local_copy(source))


# ---- one step -------------------------------------------------------------------------------------

def _tokens(parts: dict, texts: list[str], device) -> torch.Tensor:
    tok = parts["tokenizer"](list(texts), padding="max_length", max_length=parts["tokenizer"].model_max_length,
                             truncation=True, return_tensors="pt")
    return parts["text_encoder"](tok.input_ids.to(device))[0]


def _mc_prediction(engine, parts: dict, batch: dict, noisy, t, text, keep, device, dtype) -> torch.Tensor:
    """MCTrainModule's prediction: ID tokens from (CLIP embedding, face embedding), action, intensity."""
    with torch.no_grad():
        action = _tokens(parts, batch["action"], device)
        px = parts["feature_extractor"](images=list(batch["ref"].numpy()), return_tensors="pt").pixel_values
        clip = parts["image_encoder"](px.to(device, dtype)).image_embeds
        clip = clip * batch["keep_clip"].to(device, dtype)[:, None]  # CLIP-embedding dropout
    keep_motion = batch["keep_motion"].to(device)
    has_action = torch.tensor([bool(a.strip()) for a in batch["action"]], dtype=keep_motion.dtype, device=device)
    ref_pixels = keep_clip = None
    if getattr(getattr(engine, "module", engine).adapter, "ref_encoder", None) is not None:  # it learns to read the reference itself
        from motioncharacter.model.id_module import reference_pixels

        ref_pixels = reference_pixels(batch["ref"], device, dtype)
        keep_clip = batch["keep_clip"].to(device, dtype)
    return engine(noisy, t, text, clip, batch["face_emb"].to(device, dtype), action,
                  batch["intensity"].to(device, dtype), keep, has_action * keep_motion, keep_motion,
                  ref_pixels, keep_clip)


def compute_loss(engine, parts: dict, fmodel: nn.Module, batch: dict, cfg: TrainConfig, gen: torch.Generator,
                 device, dtype) -> tuple[torch.Tensor, dict]:
    """Eq. 11 on one micro-batch; returns (total, {component: value})."""
    from motioncharacter.model.losses import region_aware_loss, total_loss

    vae, sched = parts["vae"], parts["scheduler"]
    frames = batch["frames"].to(device, dtype)
    b, f = frames.shape[:2]
    with torch.no_grad():  # latents, noise and the noising in fp32 in bf16 mode too; the model gets a cast copy
        post = vae.encode(frames.flatten(0, 1)).latent_dist
        z = post.mean.float() + post.std.float() * torch.randn(post.mean.shape, generator=gen).to(device)
        latents = (z * vae.config.scaling_factor).reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen).to(device)
        noisy = sched.add_noise(latents, noise, t).to(dtype)
        text = _tokens(parts, batch["caption"], device).repeat_interleave(f, 0)
    keep = batch["keep_image"].to(device)
    if cfg.train.mode == "motioncharacter":
        pred = _mc_prediction(engine, parts, batch, noisy, t, text, keep, device, dtype)
    else:  # the face adapter (id-animator) or the Content Guider (dreamoving)
        pred = engine(noisy, t, text, *guider_inputs(parts, batch, cfg.train.mode, device, dtype))
    masks = batch["masks"] if cfg.loss.region_aware else None
    v_pred = sched.config.prediction_type == "v_prediction"  # the mini base is a v-prediction model
    l_r = region_aware_loss(pred, sched.get_velocity(latents, noise, t) if v_pred else noise, masks)
    l_id = torch.zeros((), device=device)
    if cfg.loss.id_loss:
        l_id = _id_loss(parts, fmodel, batch, cfg, pred, noisy, t, keep, v_pred, device, dtype)
    beta = cfg.loss.beta if cfg.loss.id_loss else 0.0
    total = total_loss(l_r, l_id, beta)
    return total, {"loss": total.detach().item(), "loss_region": l_r.detach().item(), "loss_id": l_id.detach().item()}


def _id_loss(parts: dict, fmodel: nn.Module, batch: dict, cfg: TrainConfig, pred, noisy, t, keep, v_pred: bool,
             device, dtype) -> torch.Tensor:
    """Eq. 4 on the samples where it means something: a reference was given (no image dropout),
    its face and the clip's were found (landmarks align both to the ArcFace template) and the
    timestep weight is > 0 (alpha-bar_t, and the optional loss.id_max_timestep bound)."""
    from motioncharacter.model.arcface import align_faces
    from motioncharacter.model.losses import id_consistency_from_prediction, id_timestep_weights

    sched = parts["scheduler"]
    w = id_timestep_weights(sched.alphas_cumprod, t, cfg.loss.id_weighting, cfg.loss.id_max_timestep).to(device)
    lm_valid = batch["landmark_valid"].to(device)
    sel = (keep > 0) & (batch["ref_landmark_valid"].to(device) > 0) & (w > 0) & (lm_valid.sum(1) > 0)
    if not bool(sel.any()):
        return torch.zeros((), device=device)
    ref = batch["ref"].to(device)[sel].permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0
    with torch.no_grad():  # the same network embeds the reference, aligned like the frames
        ref_emb = fmodel(align_faces(ref, batch["ref_landmarks"].to(device)[sel], size=fmodel.input_size))
    eps = pred[sel]
    if v_pred:  # eps = sqrt(a) v + sqrt(1 - a) x_t
        a = sched.alphas_cumprod.to(device)[t[sel]].to(dtype).view(-1, 1, 1, 1, 1)
        eps = a.sqrt() * eps + (1 - a).sqrt() * noisy[sel]
    return id_consistency_from_prediction(noisy[sel], eps, t[sel], sched.alphas_cumprod, parts["vae"], fmodel,
                                          ref_emb, frame_stride=cfg.loss.id_frame_stride,
                                          landmarks=batch["landmarks"].to(device)[sel], landmark_valid=lm_valid[sel],
                                          sample_weights=w[sel])


# ---- sample videos ----------------------------------------------------------------------------------

def sample_video(parts: dict, adapter, cfg: TrainConfig, step: int, workdir: Path, arcface_pack: str = "") -> Path:
    """A short generation on a fixed reference (a package-shipped portrait) with the current adapter."""
    from motioncharacter.faces import embedder
    from motioncharacter.fixtures import package_face
    from motioncharacter.model.inference import generate
    from motioncharacter.model.pipeline import MotionCharacterPipeline
    from motioncharacter.video import write_video

    keys = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "feature_extractor", "image_encoder")
    mode, extra = cfg.train.mode, {}
    if mode != "motioncharacter":  # the trained face adapter / Content Guider through the feature pipeline
        from motioncharacter.model.adapter import MotionCharacterAdapter

        extra, guider = {"mode": mode}, adapter
        adapter = MotionCharacterAdapter.for_unet(parts["unet"], face_dim=512 if arcface_pack else 128,
                                                  clip_image_dim=parts["image_encoder"].config.projection_dim)
    pipe = MotionCharacterPipeline(motion_adapter=None, adapter=adapter, **{k: parts[k] for k in keys})
    if extra:
        pipe.feature_parts = {"face_adapter" if mode == "id-animator" else "content_guider": guider}
    pipe.face_embedder = embedder(arcface_pack or None)
    pipe.set_progress_bar_config(disable=True)
    native = parts["unet"].config.sample_size * pipe.vae_scale_factor
    small = native <= 64
    frames = generate(pipe, image=package_face("grace_hopper"), prompt=cfg.train.sample_prompt, **extra,
                      action=cfg.train.sample_action if cfg.model.motion_control and not extra else "",
                      intensity=cfg.train.sample_intensity, steps=cfg.train.sample_steps or (4 if small else 25),
                      frames=8 if small else 16, height=native, width=native, seed=cfg.train.seed)
    return write_video(frames, workdir / f"sample-{step:08d}.mp4", fps=4.0)


# ---- the run --------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: TrainConfig, data: str, output: str, resume: bool = False):
        self.cfg, self.data, self.output, self.resume = cfg, data, output.rstrip("/"), resume
        if bool(cfg.model.weights) == bool(cfg.model.preset):
            raise ValueError("give exactly one of --weights DIR_OR_URI (model.weights) and --preset tiny "
                             "(model.preset)")
        self.rank, self.local_rank, self.world = 0, 0, 1
        self.stop_signal: int | None = None
        self.step_done = self.step_saved = 0  # the last completed step, the last checkpointed one
        self.updating = False

    def _on_signal(self, signum, frame):
        log.warning("signal %d: saving a checkpoint after this step, then exiting", signum)
        self.stop_signal = signum

    def run(self) -> int:
        import deepspeed
        import torch.distributed as dist

        cfg = self.cfg
        manifest = read_manifest(self.data)
        check_files(manifest)
        existing = ck.latest(self.output)
        if existing and not self.resume:
            raise ValueError(f"{self.output} already holds checkpoints (latest {existing}); pass --resume to "
                             "continue that run, or choose another --output")
        self.rank, self.local_rank, self.world = setup_distributed()
        state = ck.state(self.output, existing) if existing else None
        if state and state["world_size"] != self.world:  # before the model is built: fail in seconds
            raise TrainingError(f"checkpoint {existing} was saved by {state['world_size']} rank(s) and cannot "
                                f"resume on {self.world}: ZeRO shards are per rank. Resume with the same number "
                                "of processes, or start a new run from its adapter/ export")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        for uri in (cfg.model.weights, cfg.model.arcface_pack):
            if storage.is_s3(uri):  # into the node's cache once; every rank's local_copy then finds it there
                self._node_first(f"downloading {uri}", functools.partial(storage.local_copy, uri))
        if not storage.is_s3(self.output):
            Path(self.output).mkdir(parents=True, exist_ok=True)
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
        dtype = torch.bfloat16 if bf16 else torch.float32
        torch.manual_seed(cfg.train.seed)

        parts = build_parts(cfg)
        self.motion_config = parts.get("motion_config")
        for k in ("vae", "text_encoder", "image_encoder"):
            parts[k].to(device, dtype)
        fmodel = face_model(cfg).to(device, dtype)
        self.face_model_name = fmodel.name  # tagged on the MLflow run: which face model loss_id measures
        module = (MCTrainModule(parts["unet"], parts["adapter"], cfg.model.motion_control)
                  if cfg.train.mode == "motioncharacter" else GuiderTrainModule(parts["unet"], parts["adapter"],
                                                                                cfg.train.mode))
        if bf16:  # DeepSpeed casts the parameters; the buffers too (the motion modules' positional
            module.to(device, dtype)  # encodings), or adding them promotes the activations back to fp32
        params = [p for p in module.parameters() if p.requires_grad]
        ds_cfg = deepspeed_config(cfg, bf16)
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_cfg)
        adapter = module.adapter

        step, run_id = 0, None
        if existing:
            self._node_first(f"downloading checkpoint {existing}", functools.partial(ck.fetch, self.output, existing))
            local_root = ck.fetch(self.output, existing, download=False)
            ck.load(engine, local_root, existing)  # weights_only unpickling with an allow-list
            if storage.is_s3(self.output):  # the downloaded copy is read: free the node's disk
                if dist.is_initialized():
                    dist.barrier()
                if self.local_rank == 0:
                    import shutil

                    shutil.rmtree(local_root / existing, ignore_errors=True)
            step, run_id = int(state["step"]), state.get("mlflow_run_id")
            self.step_done = self.step_saved = step
            log.info("resumed from %s at step %d", existing, step)

        res = cfg.data.resolution or parts["unet"].config.sample_size * (2 ** (len(parts["vae"].config.block_out_channels) - 1))
        ds = ManifestDataset(manifest, cfg.data, res, seed=cfg.train.seed, rank=self.rank,
                             face_dim=getattr(adapter.config, "face_dim", 128), arcface_pack=cfg.model.arcface_pack,
                             body_images=cfg.train.mode == "dreamoving")
        accum, total = cfg.train.grad_accum, cfg.train.steps
        dl = loader(ds, cfg.train.batch_size, step * accum, total * accum, cfg.train.seed, self.rank,
                    cfg.data.num_workers, cfg.data.prefetch_factor)

        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        tracker = _Tracker(self, manifest, ds_cfg, run_id) if self.rank == 0 else None
        try:
            if tracker:
                tracker.start()
            step = self._loop(engine, parts, fmodel, dl, step, device, dtype, tracker)
        except BaseException as e:
            if tracker:
                tracker.failed = True
            self._save_after_failure(engine, tracker, e)
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if tracker:
                tracker.end()
        if dist.is_initialized():
            dist.barrier()
        return EXIT_PREEMPTED if self.stop_signal else 0

    def _loop(self, engine, parts, fmodel, dl, step, device, dtype, tracker) -> int:
        import torch.distributed as dist
        from tqdm import tqdm

        cfg = self.cfg
        accum, total = cfg.train.grad_accum, cfg.train.steps
        micro = step * accum
        bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=self.rank != 0)
        acc: dict[str, float] = {}
        t0 = time.perf_counter()
        for batch in dl:
            gen = torch.Generator().manual_seed(mix_seed(cfg.train.seed, micro, self.rank, 1))
            loss, parts_ = compute_loss(engine, parts, fmodel, batch, cfg, gen, device, dtype)
            if loss.grad_fn is None and self.world == 1:
                # every condition of the micro-batch was dropped (CFG's "no condition"): no trainable
                # weight took part and the gradient is zero, but DeepSpeed refuses a loss without a
                # graph. (With several ranks this zero would reach ZeRO's bucketed all-reduce in
                # another order than the other ranks' gradients, so it is not done there.)
                loss = loss + 0.0 * sum(p.sum() for p in engine.module.parameters() if p.requires_grad)
            bad = torch.tensor([0.0 if math.isfinite(parts_["loss"]) else 1.0], device=device)
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(bad)
            if bad.item() > 0:
                last = ck.latest(self.output)
                raise TrainingError(
                    f"loss is not finite at step {step + 1} ({', '.join(f'{k}={v}' for k, v in parts_.items())}; "
                    f"clips {list(batch['clip'])}); stopped without saving. The last good checkpoint is "
                    f"{storage.join(ck.root(self.output), last) if last else 'none (no checkpoint yet)'}")
            engine.backward(loss)
            self.updating = True  # a crash inside the optimizer step leaves a half-updated state
            engine.step()
            self.updating = False
            micro += 1
            for k, v in parts_.items():
                acc[k] = acc.get(k, 0.0) + v / accum
            if micro % accum:
                continue
            step += 1
            self.step_done = step
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            if dist.is_initialized() and self.world > 1:  # log the mean over ranks, not rank 0's share
                keys = sorted(acc)
                v = torch.tensor([acc[k] for k in keys], dtype=torch.float64, device=device)
                dist.all_reduce(v)
                acc = {k: float(x) / self.world for k, x in zip(keys, v.tolist())}
            metrics = dict(acc, lr=float(engine.get_lr()[0]),
                           samples_per_s=cfg.train.batch_size * accum * self.world / max(dt, 1e-9))
            acc = {}
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if tracker:
                tracker.step(step, metrics)
            preempt = self._agree(self.stop_signal is not None)
            if step % cfg.train.checkpoint_every == 0 or step == total or preempt:
                self.save(engine, step, tracker)
            if tracker and cfg.train.sample_every and (step == total or step % cfg.train.sample_every == 0):
                tracker.sample(parts, engine, step)
            if preempt:
                log.warning("stopped by signal at step %d after saving a checkpoint", step)
                break
        bar.close()
        if step == total:
            from motioncharacter.model.loading import save_adapter

            exported = self._export_adapter(engine)  # collective under ZeRO-3: every rank
            motion = self._export_motion_adapter(engine)
            if self.rank == 0:
                save_adapter(exported, storage.join(self.output, EXPORT_DIR[cfg.train.mode]))
                if motion is not None:  # trained temporal layers: deploy and evaluate must get these
                    save_adapter(motion, storage.join(self.output, "motion_adapter"))
        return step

    def _node_first(self, what: str, fn) -> None:
        """Run ``fn`` (a download into a folder every rank of a node shares) on the node's local
        rank 0 only, while the other ranks wait: two ranks downloading the same files at once
        collide (minio's fget_object writes a fixed temporary name). The all-reduce is the
        barrier and also tells the waiting ranks when that download failed."""
        import torch.distributed as dist

        if not (dist.is_initialized() and self.world > 1):
            fn()
            return
        failed = None
        if self.local_rank == 0:
            try:
                fn()
            except Exception as e:
                failed = e
        flag = torch.tensor([0.0 if failed is None else 1.0], device=self.device)
        dist.all_reduce(flag)
        if failed is not None:
            raise failed
        if flag.item() > 0:
            raise TrainingError(f"{what} failed on a node's local rank 0 (its log says why)")

    def _save_after_failure(self, engine, tracker, err: BaseException) -> None:
        """A crash keeps the steps done since the last checkpoint: save one before re-raising.

        Not for a non-finite loss (by design the last good checkpoint stays the latest), not from
        inside the optimizer step (half-updated weights), and not with more than one rank: the
        others are blocked in a collective and cannot join a save."""
        if isinstance(err, TrainingError) or self.step_done <= self.step_saved:
            return
        why = "one rank cannot save alone" if self.world > 1 else \
            "it failed inside the optimizer step" if self.updating else ""
        if why:
            log.error("training failed at step %d; no checkpoint after step %d: %s", self.step_done + 1,
                      self.step_saved, why)
            return
        try:
            self.save(engine, self.step_done, tracker)
            log.error("training failed at step %d (%s); saved a checkpoint of step %d first", self.step_done + 1,
                      type(err).__name__, self.step_done)
        except Exception as e:  # the original error is what the user must see
            log.error("training failed, and saving a checkpoint of step %d failed too: %s", self.step_done, e)

    def _agree(self, flag: bool) -> bool:
        """Every rank stops together when any of them was signalled."""
        import torch.distributed as dist

        if not (dist.is_initialized() and self.world > 1):
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return t.item() > 0

    def _export_adapter(self, engine):
        """A float32 copy of the trained adapter, face adapter or Content Guider (gathered under ZeRO-3)."""
        import deepspeed

        ad = engine.module.adapter
        params = list(ad.parameters())
        gather = deepspeed.zero.GatheredParameters(params) if self.cfg.train.zero_stage == 3 else _null()
        with gather:
            sd = {k: v.detach().float().cpu().clone() for k, v in ad.state_dict().items()}
        out = type(ad).from_config(ad.config)
        out.load_state_dict(sd)
        return out

    def _export_motion_adapter(self, engine):
        """With model.train_motion_module: the UNet's trained motion modules as a float32 diffusers
        MotionAdapter in the base's own configuration (gathered under ZeRO-3); else None."""
        import deepspeed
        from diffusers import MotionAdapter

        if not self.cfg.model.train_motion_module:
            return None
        unet = engine.module.unet
        params = [p for n, p in unet.named_parameters() if "motion_modules" in n]
        gather = deepspeed.zero.GatheredParameters(params) if self.cfg.train.zero_stage == 3 else _null()
        with gather:
            sd = {k: v.detach().float().cpu().clone() for k, v in unet.state_dict().items() if "motion_modules" in k}
        out = MotionAdapter.from_config(self.motion_config)
        out.load_state_dict(sd)  # strict: every temporal layer of the base is in the export
        return out

    def save(self, engine, step: int, tracker) -> None:
        import torch.distributed as dist

        from motioncharacter.model.loading import save_adapter

        name = ck.tag(step)
        local_root = ck.staging_dir(self.output)
        engine.save_checkpoint(str(local_root), tag=name, save_latest=False)
        exported = self._export_adapter(engine)  # collective under ZeRO-3: every rank
        motion = self._export_motion_adapter(engine)
        if self.rank == 0:
            save_adapter(exported, str(local_root / name / EXPORT_DIR[self.cfg.train.mode]))
            if motion is not None:
                save_adapter(motion, str(local_root / name / "motion_adapter"))
            state = dict(step=step, world_size=self.world, zero_stage=self.cfg.train.zero_stage,
                         mlflow_run_id=tracker.run_id if tracker else None, manifest=self.data)
            (local_root / name / "state.json").write_text(json.dumps(state, indent=1))
        if dist.is_initialized():
            dist.barrier()
        ck.publish(self.output, name, local_root, upload=self.local_rank == 0)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            ck.mark_latest(self.output, name)
            log.info("checkpoint %s", storage.join(ck.root(self.output), name))
        self.step_saved = step
        if tracker:
            tracker.flush()  # a checkpoint is also when buffered tracking data gets another try


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class _Tracker:
    """MLflow on rank 0: params, per-step metrics, sample videos, the ablation tag. A resumed
    run continues the MLflow run its checkpoint names. The server must answer at the start;
    after that every call goes through a tracking.Guard, so an outage never stops training."""

    def __init__(self, trainer: Trainer, manifest, ds_cfg: dict, run_id: str | None):
        self.t, self.manifest, self.ds_cfg, self.run_id = trainer, manifest, ds_cfg, run_id
        self._run = None
        self.guard = None
        self.failed = False
        self.samples = None  # sample videos wait here until MLflow has them

    def start(self):
        import tempfile

        import mlflow

        from motioncharacter import tracking
        from motioncharacter.config import to_dict

        cfg = self.t.cfg
        tracking.check_server()
        mlflow.set_tracking_uri(tracking.tracking_uri())
        mlflow.set_experiment(cfg.experiment)
        tags = {"ablation": cfg.ablation_name(), "stage": "train",
                "face_model": getattr(self.t, "face_model_name", "") if cfg.loss.id_loss else "none"}
        self.samples = Path(tempfile.mkdtemp(prefix="mc-samples-"))
        if self.run_id:
            from mlflow.exceptions import MlflowException

            try:
                self._run = mlflow.start_run(run_id=self.run_id)
                self.guard = tracking.Guard(self.run_id)
                self.guard.call("the resumed tag", mlflow.set_tag, "resumed", "true")
                return
            except MlflowException:  # another tracking server than the checkpoint's: a new, linked run
                log.warning("MLflow run %s of the checkpoint is not on %s; starting a new run",
                            self.run_id, tracking.tracking_uri())
                tags["resumed_from_run"] = self.run_id
        self._run = mlflow.start_run(tags=tags)
        self.run_id = self._run.info.run_id
        self.guard = tracking.Guard(self.run_id)
        self.guard.call("params", tracking.log_params, to_dict(cfg))
        self.guard.call("params", tracking.log_params, self.ds_cfg, prefix="deepspeed.")
        self.guard.call("params", tracking.log_params, {
            "data.manifest": self.t.data, "data.manifest_sha256": self.manifest.sha256,
            "data.kept_clips": len(self.manifest.records), "git_commit": git_commit(), "world_size": self.t.world,
            "output": self.t.output})

    def step(self, step: int, metrics: dict):
        if step % self.t.cfg.train.log_every == 0 or step == self.t.cfg.train.steps:
            self.guard.metrics(metrics, step=step)
        log.debug("step %d %s", step, metrics)
        if not storage.is_s3(self.t.output):  # a plain per-step record next to the checkpoints
            with open(Path(self.t.output) / "steps.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def flush(self):
        if self.guard:
            self.guard.flush(force=True)

    def sample(self, parts, engine, step: int):
        from motioncharacter import tracking

        if self.t.cfg.train.zero_stage == 3:
            log.info("sample videos are skipped under ZeRO-3 (partitioned weights); use the adapter export")
            return
        module = engine.module
        module.eval()
        try:
            path = sample_video(parts, module.adapter, self.t.cfg, step, self.samples, self.t.cfg.model.arcface_pack)
        finally:
            module.train()
            module.adapter.attach(module.unet)  # the pipeline re-attached the same layers; keep ours

        def log_sample():
            tracking.log_artifact(path, "samples")
            path.unlink()

        self.guard.call(f"sample video {path.name}", log_sample)

    def end(self):
        import shutil

        import mlflow

        if self.guard is not None:
            status = "FAILED" if self.failed else "KILLED" if self.t.stop_signal else "FINISHED"
            self.guard.flush(force=True)
            self.guard.call("the end of the run", mlflow.end_run, status)
            (log.warning if self.guard.outages else log.info)("%s", self.guard.summary())
        if self.samples:
            shutil.rmtree(self.samples, ignore_errors=True)
