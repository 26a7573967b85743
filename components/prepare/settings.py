"""Settings of the data-preparation stage; defaults in motioncharacter/configs/prepare.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingSettings:
    fps: float = 4.0             # frames sampled per second (paper: 4)
    num_frames: int = 16         # frames per clip for flow and training (paper: 16)
    min_frames: int = 8          # clips shorter than this at `fps` are dropped


@dataclass
class FilterSettings:
    min_short_side: int = 512          # paper: resolution >= 512
    max_piqe: float = 80.0             # PIQE 81-100 is the "bad" band
    clip_iqa_weights: str = ""         # CLIP weights folder/URI: use CLIP-IQA instead of PIQE
    min_clip_iqa: float = 0.5
    ocr: bool = True
    ocr_frames: int = 2                # EasyOCR is ~1-2.5 s a frame on a CPU
    max_text_fraction: float = 0.01    # of the frame area covered by text boxes
    # Text detection (CRAFT) is nearly all of OCR's cost and scales with pixels: run it on a canvas of
    # this many px on the long side (2560 = the frame's own size, EasyOCR's readtext). 192 is ~7x
    # cheaper than 512 and finds the fixtures' and shared clips' overlays, but misses glyphs under
    # ~15 px on a 512 px frame (a small subtitle line that full size finds).
    ocr_canvas: int = 192
    # frames whose coarse text fraction is within this factor of max_text_fraction (either way) are
    # detected again at full size, so decisions near the threshold are full-size OCR's
    ocr_recheck_factor: float = 2.0
    min_face_confidence: float = 0.8   # YuNet score a detection needs to count at all
    # A face counts when tracked (IoU) across the sampled frames in >= this share of them: keeps
    # one-frame false positives from dropping a clip; a second person who stays in shot still does.
    face_min_presence: float = 0.5
    face_min_size: float = 0.05        # mean face-box short side / frame short side; smaller faces don't count


@dataclass
class FlowSettings:
    estimator: str = "dis"             # dis or farneback (OpenCV, no weights) or raft (weights required)
    raft_weights: str = ""             # torchvision RAFT state dict (.safetensors), local or s3://
    short_side: int = 256              # resolution the flow is computed at
    mask_normalize: bool = True        # eq. 9 normalisation of f_fg to 0..255 per pair (see flow.py)


@dataclass
class CaptionSettings:
    captioner: str = "offline"         # offline | vlm | sidecar (<input>.json beside each input; else offline)
    url: str = ""                      # OpenAI-compatible endpoint, e.g. http://vlm:8000/v1
    model: str = ""


@dataclass
class OutputSettings:
    face_pool: int = 5                 # face crops per kept clip (random frames)
    face_size: int = 224
    frame_quality: int = 95            # JPEG quality of saved frames
    bins: int = 10                     # intensity bins over 0..20 for resampling
    seed: int = 0


@dataclass
class PrepareConfig:
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    filters: FilterSettings = field(default_factory=FilterSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)
    caption: CaptionSettings = field(default_factory=CaptionSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    experiment: str = "motioncharacter-data"

    def validate(self) -> None:
        s = self.sampling
        if s.fps <= 0 or s.num_frames < 2 or not 2 <= s.min_frames <= s.num_frames:
            raise ValueError("sampling: need fps > 0 and 2 <= min_frames <= num_frames")
        f = self.filters
        if not 0 < f.face_min_presence <= 1 or not 0 <= f.face_min_size < 1:
            raise ValueError("filters: need 0 < face_min_presence <= 1 and 0 <= face_min_size < 1")
        if f.ocr_canvas < 32 or f.ocr_recheck_factor < 1:
            raise ValueError(f"filters: need ocr_canvas >= 32 px (got {f.ocr_canvas}) and "
                             f"ocr_recheck_factor >= 1 (got {f.ocr_recheck_factor})")
        if self.flow.estimator not in ("dis", "farneback", "raft"):
            raise ValueError(f"flow.estimator must be dis, farneback or raft, not {self.flow.estimator!r}")
        if self.caption.captioner not in ("offline", "vlm", "sidecar"):
            raise ValueError(f"caption.captioner must be offline, vlm or sidecar, not {self.caption.captioner!r}")
