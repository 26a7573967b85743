"""The evaluation set: portraits x prompt bank x action phrases x intensities, deterministic.

Item k (in order) takes portrait ``k % P`` and, per round ``r = k // P``, the bank prompt
``(portrait_index * prompts_per_image + r) % len(bank)``; intensity and action cycle over the
global item counter (intensity fastest) so any prefix (``--limit``) covers many portraits,
intensities and actions. Every item's seed is ``crc32(item id) + base seed``: the same
portrait, prompt, action and intensity always get the same noise.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from motioncharacter.config import PACKAGED_CONFIGS
from motioncharacter.video import IMAGE_SUFFIXES

from .settings import EvalSetSettings

DEFAULT_BANK = PACKAGED_CONFIGS / "eval_prompts.yaml"


@dataclass
class EvalItem:
    id: str
    portrait: str      # local path or s3:// URI
    prompt_id: int
    prompt: str
    action: str
    intensity: float
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_prompt_bank(path: str = "") -> tuple[str, list[str]]:
    """(version, prompts) from a prompt-bank YAML (``version:`` + ``prompts:`` list)."""
    from motioncharacter.storage import read_bytes

    src = path or str(DEFAULT_BANK)
    data = yaml.safe_load(read_bytes(src) if path else Path(src).read_bytes()) or {}
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompt bank {src} must hold a non-empty 'prompts' list of strings")
    return str(data.get("version", "unversioned")), [p.strip() for p in prompts]


def list_portraits(eval_set: str) -> list[str]:
    """Image files under a folder or s3:// prefix, sorted."""
    from motioncharacter.storage import list_files

    found = [f for f in list_files(eval_set) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise FileNotFoundError(f"no portrait images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {eval_set}")
    return found


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "none"


def build_items(portraits: list[str], bank: list[str], s: EvalSetSettings, limit: int | None = None) -> list[EvalItem]:
    n = len(portraits) * s.prompts_per_image
    items = []
    for k in range(n if limit is None else min(n, limit)):
        pi, r = k % len(portraits), k // len(portraits)
        prompt_id = (pi * s.prompts_per_image + r) % len(bank)
        intensity = float(s.intensities[k % len(s.intensities)])
        action = s.actions[(k // len(s.intensities)) % len(s.actions)]
        stem = _slug(Path(portraits[pi]).stem)
        item_id = f"{stem}_p{prompt_id:03d}_a-{_slug(action)}_i{intensity:g}"
        seed = (s.seed + zlib.crc32(item_id.encode())) % 2**31
        items.append(EvalItem(item_id, portraits[pi], prompt_id, bank[prompt_id], action, intensity, seed))
    return items
