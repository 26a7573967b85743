"""The prepared manifest as training batches (paper sec. 3.4 and 4.1).

Every random choice (which clips, window, flip, reference face, dropouts) is drawn from
generators seeded by (seed, micro-step, rank[, slot]), never from global state, so a run
resumed at step s sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from motioncharacter import storage

from .settings import DataSettings

log = logging.getLogger("motioncharacter.train")
FRAME_CACHE_BYTES = 512 << 20  # decoded training frames kept in memory per dataset (worker)
REF_SIZE = 224  # reference crops are fed to the CLIP image processor and the face models at this size


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (seed, step, rank, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class Manifest:
    uri: str
    base: str          # folder or s3:// prefix the relative paths resolve against
    records: list[dict]  # kept records only
    total: int         # all records, kept or not
    sha256: str

    def path(self, rel: str) -> str:
        return storage.join(self.base, rel)


def read_manifest(uri: str) -> Manifest:
    """Kept records of a manifest.jsonl (local or s3://), or a ValueError saying why none."""
    raw = storage.read_bytes(uri)
    records, dropped, n_dropped = [], {}, 0
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri} line {n} is not JSON ({e.msg})") from None
        if rec.get("kept"):
            for key in ("frames", "masks"):
                if not rec.get(key):
                    raise ValueError(f"{uri} line {n} ({rec.get('clip')}): kept clip without '{key}'")
            records.append(rec)
        else:
            n_dropped += 1
            for r in rec.get("reasons") or ["unknown"]:
                dropped[r] = dropped.get(r, 0) + 1
    total = len(records) + n_dropped
    if not records:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items())) or "the file is empty"
        raise ValueError(f"manifest {uri} has no kept clips to train on ({why}); "
                         "run `motioncharacter data prepare` on usable inputs")
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).resolve().parent)
    return Manifest(uri, base, records, total, hashlib.sha256(raw).hexdigest())


def check_files(m: Manifest, limit: int = 5) -> None:
    """Every file of a local manifest exists (object stores are checked when read)."""
    if storage.is_s3(m.base):
        return
    missing = []
    for rec in m.records:
        for rel in list(dict.fromkeys(rec["frames"])) + [rec["masks"]] + list(rec.get("faces") or []):
            if not os.path.isfile(m.path(rel)):
                missing.append(f"{rec['clip']}: {rel}")
    if missing:
        more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
        raise FileNotFoundError(f"manifest {m.uri} names files that do not exist under {m.base}: "
                                f"{'; '.join(missing[:limit])}{more}")


def resize_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and centre-crop to size x size (HxW or HxWxC)."""
    h, w = img.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    y, x = (nh - size) // 2, (nw - size) // 2
    return img[y:y + size, x:x + size]


def resize_crop_points(points: np.ndarray, hw: tuple[int, int], size: int) -> np.ndarray:
    """Pixel coordinates (..., 2) of an (h, w) image -> the same points after ``resize_crop``
    (pixel centres at integers, as cv2.resize maps them)."""
    h, w = hw
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    out = (np.asarray(points, np.float32) + 0.5) * np.array([nw / w, nh / h], np.float32) - 0.5
    return out - np.array([(nw - size) // 2, (nh - size) // 2], np.float32)


# a horizontal flip mirrors the face: the image-left eye and mouth corner swap places, and the
# ArcFace template wants them in image order
FLIP_LANDMARKS = [1, 0, 2, 4, 3]


class ManifestDataset(Dataset):
    """Items are keyed (micro_step, slot, index) by ``StepBatchSampler``; each is a dict of
    frames (F, 3, R, R) float32 in [-1, 1], masks (F, R, R) float32, ref (224, 224, 3) uint8,
    face_emb (d,), landmarks (F, 5, 2) in pixels of the training frames with landmark_valid (F,)
    (0 where the face was not detected, or the manifest predates landmarks), ref_landmarks (5, 2)
    in pixels of ref with ref_landmark_valid, caption, action, intensity, keep_image, keep_clip,
    keep_motion (0 under joint condition dropout), clip."""

    def __init__(self, manifest: Manifest, cfg: DataSettings, resolution: int, seed: int = 0, rank: int = 0,
                 face_dim: int = 128, arcface_pack: str = "", body_images: bool = False):
        """``body_images``: items also hold body (224, 224, 3) uint8, another frame of the clip as
        DreaMoving's cloth/body image, and keep_cloth (train.mode dreamoving)."""
        self.m, self.cfg, self.res, self.seed, self.rank = manifest, cfg, resolution, seed, rank
        self.face_dim, self.arcface_pack = face_dim, arcface_pack
        self.body_images = body_images
        self._embedder = None
        self._emb_cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self._warned_landmarks = False
        self._frames: dict[str, np.ndarray] = {}
        self._frame_hw: dict[str, tuple[int, int]] = {}
        self._frames_bytes = 0
        self._same_person: dict[str, list[int]] = {}
        for i, r in enumerate(manifest.records):
            if r.get("person") and r.get("faces"):
                self._same_person.setdefault(str(r["person"]), []).append(i)

    def _reference_pool(self, idx: int, rng: np.random.Generator) -> tuple[dict, list]:
        """(record, face pool) the reference is drawn from: with data.reference=person another clip of
        the same person when there is one (a different photo or video), else the clip itself."""
        rec = self.m.records[idx]
        if self.cfg.reference == "person":
            others = [i for i in self._same_person.get(str(rec.get("person")), []) if i != idx]
            if others:
                other = self.m.records[others[int(rng.integers(len(others)))]]
                return other, list(other["faces"])
        return rec, list(rec.get("faces") or [])

    def __len__(self) -> int:
        return len(self.m.records)

    def weights(self) -> torch.Tensor:
        w = torch.tensor([float(r.get("sample_weight") or 0.0) for r in self.m.records], dtype=torch.double)
        return w if float(w.sum()) > 0 else torch.ones(len(w), dtype=torch.double)

    # ---- reading --------------------------------------------------------------------------
    def _bytes(self, rec: dict, rel: str) -> bytes:
        uri = self.m.path(rel)
        try:
            return storage.read_bytes(uri)
        except FileNotFoundError:
            raise FileNotFoundError(f"clip {rec['clip']} of {self.m.uri}: {uri} does not exist") from None

    def _image(self, rec: dict, rel: str) -> np.ndarray:
        img = cv2.imdecode(np.frombuffer(self._bytes(rec, rel), np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"clip {rec['clip']} of {self.m.uri}: {rel} is not a readable image")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def _frame(self, rec: dict, rel: str) -> np.ndarray:
        """A frame at the training size; kept in memory (up to FRAME_CACHE_BYTES) because every
        epoch decodes the same JPEGs again, which at small sizes costs more than the step."""
        hit = self._frames.get(rel)
        if hit is None:
            img = self._image(rec, rel)
            self._frame_hw[rel] = img.shape[:2]  # the landmarks are in these pixels
            hit = resize_crop(img, self.res)
            if self._frames_bytes + hit.nbytes <= FRAME_CACHE_BYTES:
                self._frames[rel] = hit
                self._frames_bytes += hit.nbytes
        return hit

    def _masks(self, rec: dict) -> np.ndarray:
        with np.load(io.BytesIO(self._bytes(rec, rec["masks"]))) as z:
            return z["masks"].astype(np.float32)

    def _face_embedding(self, rel: str, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The ID encoder's face embedding (SFace, or ArcFace from a pack) of a face-pool crop, and
        the crop's 5 landmarks (None when no face is found again), which align it for eq. 4."""
        if rel not in self._emb_cache:
            from motioncharacter import faces

            if self._embedder is None:
                self._embedder = faces.embedder(self.arcface_pack or None)
            found = faces.detector().detect(crop)
            landmarks = None
            if found:
                face = max(found, key=lambda f: f.area)
                emb = self._embedder.embed(crop, face).astype(np.float32)
                landmarks = face.landmarks.astype(np.float32)
            else:  # a face-pool crop always held a face; a miss here is rare, so train without E_arc
                log.warning("no face found again in %s; using a zero face embedding", rel)
                emb = np.zeros(self.face_dim, np.float32)
            if emb.shape[-1] != self.face_dim:
                raise ValueError(f"the adapter expects {self.face_dim}-d face embeddings, the face embedder "
                                 f"gives {emb.shape[-1]}-d (set model.arcface_pack to match the adapter)")
            self._emb_cache[rel] = (emb, landmarks)
        return self._emb_cache[rel]

    def _landmarks(self, rec: dict, sel: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(F, 5, 2) landmarks of the selected frames at the training size, and (F,) validity."""
        n = len(sel)
        out, valid = np.zeros((n, 5, 2), np.float32), np.zeros(n, np.float32)
        per_frame = rec.get("landmarks")
        if per_frame is None:  # a manifest prepared before landmarks were recorded
            if not self._warned_landmarks:
                log.warning("manifest %s has no face landmarks (prepared by an older version): the ID loss "
                            "skips its clips; re-run `motioncharacter data prepare` to record them", self.m.uri)
                self._warned_landmarks = True
            return out, valid
        for j, i in enumerate(sel):
            lm = per_frame[i] if i < len(per_frame) else None
            if lm is not None:
                out[j] = resize_crop_points(np.asarray(lm, np.float32), self._frame_hw[rec["frames"][i]], self.res)
                valid[j] = 1.0
        return out, valid

    # ---- one item --------------------------------------------------------------------------
    def __getitem__(self, key) -> dict:
        step, slot, idx = key
        rec = self.m.records[idx]
        rng = np.random.default_rng(mix_seed(self.seed, step, self.rank, slot))
        n, c = self.cfg.num_frames, self.cfg
        paths = list(rec["frames"])
        start = int(rng.integers(0, len(paths) - n + 1)) if len(paths) > n else 0
        sel = list(range(start, min(start + n, len(paths))))
        sel += [sel[-1]] * (n - len(sel))  # short clip: repeat the last frame (and mask)
        cache: dict[str, np.ndarray] = {}  # stills repeat one path: read it once
        for i in sel:
            if paths[i] not in cache:
                cache[paths[i]] = self._frame(rec, paths[i])
        frames = np.stack([cache[paths[i]] for i in sel])
        masks = self._masks(rec)
        masks = np.stack([resize_crop(masks[min(i, len(masks) - 1)], self.res) for i in sel])
        landmarks, landmark_valid = self._landmarks(rec, sel)
        if rng.random() < c.flip_prob:  # same flip for frames, masks and landmarks
            frames, masks = frames[:, :, ::-1], masks[:, :, ::-1]
            landmarks = landmarks[:, FLIP_LANDMARKS] * np.array([-1, 1], np.float32) + np.array(
                [self.res - 1, 0], np.float32)
        ref_rec, pool = self._reference_pool(idx, rng)
        if pool:
            rel = pool[int(rng.integers(len(pool)))]
            ref = cv2.resize(self._image(ref_rec, rel), (REF_SIZE, REF_SIZE), interpolation=cv2.INTER_AREA)
            face_emb, ref_landmarks = self._face_embedding(rel, ref)
        else:
            ref = cv2.resize(self._image(rec, paths[0]), (REF_SIZE, REF_SIZE), interpolation=cv2.INTER_AREA)
            face_emb, ref_landmarks = self._face_embedding(paths[0], ref)
        drop_text, drop_image, drop_clip, drop_all = rng.random(4) < (c.text_dropout, c.image_dropout,
                                                                      c.clip_dropout, c.cond_dropout)
        # joint condition dropout: text, reference, action and intensity together (CFG's "no condition")
        drop_text, drop_image = drop_text or drop_all, drop_image or drop_all
        intensity = 0.0 if rec.get("still") else float(rec.get("motion_intensity") or 0.0)
        x = np.ascontiguousarray(frames).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        body = {}
        if self.body_images:  # drawn after everything else, so the rest of the item is unchanged
            img = resize_crop(self._image(rec, paths[int(rng.integers(len(paths)))]), REF_SIZE)
            body = dict(body=np.ascontiguousarray(img),
                        keep_cloth=0.0 if (drop_image or rng.random() < c.cloth_dropout) else 1.0)
        return body | dict(frames=x, masks=np.ascontiguousarray(masks, dtype=np.float32), ref=np.ascontiguousarray(ref),
                    face_emb=face_emb, caption="" if drop_text else str(rec.get("caption") or ""),
                    action=str(rec.get("action") or ""), intensity=min(max(intensity, 0.0), 20.0),
                    keep_image=0.0 if drop_image else 1.0, keep_clip=0.0 if (drop_clip or drop_image) else 1.0,
                    keep_motion=0.0 if drop_all else 1.0,
                    landmarks=np.ascontiguousarray(landmarks, dtype=np.float32), landmark_valid=landmark_valid,
                    ref_landmarks=np.zeros((5, 2), np.float32) if ref_landmarks is None else ref_landmarks,
                    ref_landmark_valid=np.float32(ref_landmarks is not None),
                    clip=str(rec["clip"]))


class StepBatchSampler:
    """Batches of keys for micro-steps ``start``..``stop``-1: each micro-step draws its clips
    with a WeightedRandomSampler (``sample_weight``) seeded by (seed, micro-step, rank)."""

    def __init__(self, weights: torch.Tensor, batch_size: int, start: int, stop: int, seed: int, rank: int = 0):
        self.weights, self.bs, self.start, self.stop, self.seed, self.rank = weights, batch_size, start, stop, seed, rank

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            g = torch.Generator().manual_seed(mix_seed(self.seed, step, self.rank))
            idx = list(WeightedRandomSampler(self.weights, self.bs, replacement=True, generator=g))
            yield [(step, slot, int(i)) for slot, i in enumerate(idx)]


def loader(ds: ManifestDataset, batch_size: int, start: int, stop: int, seed: int, rank: int = 0,
           num_workers: int = 0, prefetch_factor: int = 2):
    from torch.utils.data import DataLoader

    bs = StepBatchSampler(ds.weights(), batch_size, start, stop, seed, rank)
    kw = dict(num_workers=num_workers, persistent_workers=False)
    if num_workers:
        kw["prefetch_factor"] = prefetch_factor
    return DataLoader(ds, batch_sampler=bs, **kw)
