"""Real people for the learn loop: ``../shared/data/people`` split by person.

The folder (never copied into the project) holds portraits (one person each), identities (2-5
photos of one person) and talking-head videos, with a ``person`` label for every file in
``sources.tsv`` / ``videos.tsv``. Splits are made on that label, never on file names, so no
person of the evaluation appears in training. When the folder is absent the learn loop falls
back to the package-shipped faces (``fixtures.py``) and says so.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

PEOPLE_ENV = "MOTIONCHARACTER_PEOPLE"


def people_dir() -> Path | None:
    """``$MOTIONCHARACTER_PEOPLE`` or ../shared/data/people beside the checkout; None when absent."""
    import os

    p = Path(os.environ[PEOPLE_ENV]) if os.environ.get(PEOPLE_ENV) else \
        Path(__file__).resolve().parents[2] / "shared" / "data" / "people"
    return p if (p / "sources.tsv").is_file() else None


@dataclass
class Person:
    name: str
    photos: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)


@dataclass
class PeopleSplit:
    train: list[Person]
    heldout: list[Person]   # each has >= 2 photos: photos[0] is the reference, the rest are unseen shots
    root: Path


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def load_people(root: Path) -> dict[str, Person]:
    """Every person of the folder, by the ``person`` column (photos and videos)."""
    people: dict[str, Person] = {}
    for r in _rows(root / "sources.tsv"):
        f = root / r["file"]
        if not f.is_file():
            continue
        p = people.setdefault(r["person"], Person(r["person"]))
        (p.videos if f.parent.name == "videos" else p.photos).append(f)
    for r in _rows(root / "videos.tsv") if (root / "videos.tsv").is_file() else []:
        f = root / r["file"]
        p = people.setdefault(r["person"], Person(r["person"]))
        if f.is_file() and f not in p.videos:
            p.videos.append(f)
    for p in people.values():
        p.photos.sort()
        p.videos.sort()
    return people


def _order(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_people(root: Path, heldout: int = 10, seed: int = 0) -> PeopleSplit:
    """Hold out ``heldout`` whole people with >= 2 photos and no video (so the reference photo and
    another shot of them exist, and nothing of them reaches training); everyone else trains."""
    people = load_people(root)
    candidates = sorted((p for p in people.values() if len(p.photos) >= 2 and not p.videos),
                        key=lambda p: _order(p.name, seed))
    if len(candidates) < heldout:
        raise ValueError(f"{root} has only {len(candidates)} people with several photos and no video; "
                         f"cannot hold out {heldout}")
    held = candidates[:heldout]
    names = {p.name for p in held}
    train = sorted((p for p in people.values() if p.name not in names), key=lambda p: p.name)
    return PeopleSplit(train=train, heldout=sorted(held, key=lambda p: p.name), root=root)
