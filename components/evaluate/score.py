"""Every metric of one video: ``Scorer(...).score(frames, reference=..., prompt=..., ...)``.

Keys (each ``{"value": x}`` or ``{"value": None, "reason": ...}``, see ``metrics``):
``face_sim_<embedder>`` (sface or arcface), ``clip_i``, ``clip_t``, ``dynamic_degree`` (RAFT) or
``dynamic_degree_dis``, ``motion_smoothness`` (AMT) or ``motion_smoothness_flowinterp``, ``dover``,
``intensity`` (eq. 5-7 measured with DIS flow, 512-px scale), and with CLIP and an action
phrase ``action_clip_t`` and ``action_top1`` (1 when the frames match the requested action better
than every other phrase of the action bank).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import metrics as M

PROMPT_CHECK = "the text the video was generated from"


@dataclass
class MetricWeights:
    arcface_pack: str = ""   # insightface pack (folder/s3://) -> face_sim_arcface; else SFace
    clip_weights: str = ""   # open_clip folder or checkpoint file -> clip_i, clip_t, action adherence
    clip_model: str = ""     # open_clip architecture when clip_weights is a single file
    raft_weights: str = ""   # torchvision raft_large state dict (.safetensors) -> dynamic_degree
    amt_model: str = ""      # AMT TorchScript export -> motion_smoothness
    dover_model: str = ""    # DOVER TorchScript export -> dover


class Scorer:
    def __init__(self, weights: MetricWeights | None = None, flow_short_side: int = 256, face_every: int = 1):
        from motioncharacter.components.prepare.flow import DISFlow, RAFTFlow
        from motioncharacter.faces import detector, embedder

        from .models import AMTInterpolator, ClipScorer, DoverScorer

        w = weights or MetricWeights()
        self.weights = w
        self.flow_short_side = flow_short_side
        self.face_every = max(1, face_every)
        self.detector = detector()
        self.embedder = embedder(w.arcface_pack or None)
        self.dis = DISFlow()
        self.raft = RAFTFlow(w.raft_weights) if w.raft_weights else None
        self.clip = ClipScorer(w.clip_weights, w.clip_model) if w.clip_weights else None
        self.amt = AMTInterpolator(w.amt_model) if w.amt_model else None
        self.dover = DoverScorer(w.dover_model) if w.dover_model else None
        self.timings: dict[str, float] = {}

    # ---- single metrics -------------------------------------------------------------------

    @property
    def face_key(self) -> str:
        return f"face_sim_{self.embedder.name}"

    def face_similarity(self, frames: np.ndarray, reference: np.ndarray | None, face_index: int | None = None) -> dict:
        from motioncharacter.faces import FaceError

        if reference is None:
            return M.absent("no reference face given (--reference)")
        if lacking := M.too_few(len(frames), 1):
            return lacking
        try:
            ref = self.embedder.embed(reference, self.detector.one(reference, "reference image", face_index))
        except FaceError as e:
            return M.absent(str(e))
        embs, looked = [], 0
        for f in frames[::self.face_every]:
            looked += 1
            faces = self.detector.detect(f)
            if faces:  # the largest face is the generated person
                embs.append(self.embedder.embed(f, faces[0]))
        if not embs:
            return M.absent(f"no face detected in any of {looked} frames")
        # frames without a detectable face (stylised, a small full-body figure) are counted, not scored 0
        return M.present(M.mean_similarity(ref, np.stack(embs)), face_rate=len(embs) / looked,
                         frames_scored=len(embs), frames_without_face=looked - len(embs))

    def clip_scores(self, frames: np.ndarray, reference: np.ndarray | None, prompt: str | None,
                    action: str | None, action_bank: list[str] | None) -> dict:
        why = M.absent("no CLIP weights supplied (--clip-weights)") if self.clip is None else M.too_few(len(frames), 1)
        if why:
            return {k: dict(why) for k in ("clip_i", "clip_t", *(["action_clip_t"] if action else []))}
        out = {}
        emb = self.clip.images(frames)
        out["clip_i"] = (M.present(M.mean_similarity(self.clip.images(reference)[0], emb)) if reference is not None
                         else M.absent("no reference image given"))
        out["clip_t"] = (M.present(M.mean_similarity(self.clip.texts([prompt])[0], emb)) if prompt
                         else M.absent("no prompt given (--prompt)"))
        if action:
            bank = list(dict.fromkeys([action, *[a for a in (action_bank or []) if a]]))
            sims = M.cosine(emb.mean(0), self.clip.texts([f"a person {a}" for a in bank]))[0]
            out["action_clip_t"] = M.present(sims[0])
            out["action_top1"] = (M.present(float(np.argmax(sims) == 0)) if len(bank) > 1
                                  else M.absent("action bank has a single phrase"))
        return out

    def flow_metrics(self, frames: np.ndarray) -> dict:
        from motioncharacter.components.prepare.flow import flow_magnitude, measure

        n = len(frames)
        short = min(frames.shape[1:3]) if n else 0
        est, dd_key = (self.raft, "dynamic_degree") if self.raft else (self.dis, "dynamic_degree_dis")
        interp, ms_key = ((self.amt, "motion_smoothness") if self.amt
                          else (M.FlowInterpolator(self.dis), "motion_smoothness_flowinterp"))
        return {
            # eq. 5-7 exactly as data preparation measures it (never upsampled: tiny videos are 64 px)
            "intensity": M.too_few(n, 2, "one flow pair") or M.present(
                measure(frames, self.dis, min(self.flow_short_side, short))[0]),
            dd_key: M.too_few(n, M.DYNAMIC_DEGREE_MIN_FRAMES, "VBench ignores the last 2 flow pairs") or M.present(
                M.dynamic_degree(flow_magnitude(est(frames)), short)),
            ms_key: M.too_few(n, M.MOTION_SMOOTHNESS_MIN_FRAMES, "one frame re-created between two") or M.present(
                M.motion_smoothness(frames, interp)),
        }

    # ---- everything -----------------------------------------------------------------------

    def score(self, frames: np.ndarray, reference: np.ndarray | None = None, prompt: str | None = None,
              action: str | None = None, action_bank: list[str] | None = None,
              face_index: int | None = None) -> dict:
        frames = np.asarray(frames)
        out: dict = {}
        steps = [
            ("face", lambda: {self.face_key: self.face_similarity(frames, reference, face_index)}),
            ("clip", lambda: self.clip_scores(frames, reference, prompt, action, action_bank)),
            ("flow", lambda: self.flow_metrics(frames)),
            ("dover", lambda: {"dover": (M.too_few(len(frames), 1) or M.present(self.dover(frames))) if self.dover
                               else M.absent("no DOVER model supplied (--dover-model)")}),
        ]
        for name, fn in steps:
            t = time.perf_counter()
            out.update(fn())
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
        return out
