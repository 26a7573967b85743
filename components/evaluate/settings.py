"""Settings of the evaluation stage; defaults in motioncharacter/configs/evaluate.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field

from ...model.acceleration import Acceleration
from .score import MetricWeights


@dataclass
class EvalSetSettings:
    prompt_bank: str = ""
    prompts_per_image: int = 4
    actions: list[str] = field(default_factory=lambda: ["", "talking", "smiling", "turning head", "nodding"])
    intensities: list[float] = field(default_factory=lambda: [0.0, 5.0, 10.0, 15.0, 20.0])
    seed: int = 0
    face_index: int = -1


@dataclass
class GenerationSettings:
    negative_prompt: str = ""
    frames: int = 16
    steps: int = 0
    height: int = 0
    width: int = 0
    guidance: float = 8.0
    scheduler: str = ""      # "" = the weights' own (DDIM); ddim | dpm++ | lcm (model/schedulers.py)
    acceleration: Acceleration = field(default_factory=Acceleration)  # speed/memory (model/acceleration.py)
    dtype: str = "auto"      # fp32 | fp16 | bf16 | auto (fp16 on CUDA, fp32 on a CPU): model/precision.py
    id_scale: float = 1.0
    motion_scale: float = 1.0
    fps: float = 8.0


@dataclass
class MetricSettings(MetricWeights):
    flow_short_side: int = 256


@dataclass
class OutputSettings:
    gifs: int = 8
    contact_rows: int = 12


@dataclass
class EvalConfig:
    evalset: EvalSetSettings = field(default_factory=EvalSetSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    experiment: str = "motioncharacter-eval"

    def validate(self) -> None:
        e, g = self.evalset, self.generation
        if e.prompts_per_image < 1:
            raise ValueError("evalset.prompts_per_image must be >= 1")
        if not e.intensities or any(not 0 <= i <= 20 for i in e.intensities):
            raise ValueError(f"evalset.intensities must be a non-empty list in [0, 20], got {e.intensities}")
        if not e.actions:
            raise ValueError("evalset.actions must hold at least one phrase ('' = none)")
        if g.frames < 3:
            raise ValueError("generation.frames must be >= 3 (motion smoothness needs 3)")
        from ...model.precision import check

        try:
            check(g.dtype)
        except ValueError as err:
            raise ValueError(f"generation.{err}") from None
