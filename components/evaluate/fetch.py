"""``motioncharacter evaluate fetch-unsplash50``: download the Unsplash-50 portraits.

The set is published only as a list of unsplash.com photo pages (LCM-Lookahead's
``static/unsplash_50.txt``); each page URL ends in the photo's 11-character id, and
``https://unsplash.com/photos/<id>/download`` redirects to the image file (Unsplash License).
"""
from __future__ import annotations

import io
import urllib.request
from pathlib import Path

LIST_URL = "https://lcm-lookahead.github.io/static/unsplash_50.txt"
DOWNLOAD = "https://unsplash.com/photos/{id}/download?force=true"
TIMEOUT = 30


class OfflineError(ValueError):
    pass


def _get(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "motioncharacter-eval/0.1"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.read()
    except Exception as e:
        raise OfflineError(
            f"cannot download {url} ({type(e).__name__}: {getattr(e, 'reason', e)}). This machine looks offline "
            "or the site refused the request: run the command on a machine with internet access and copy the "
            "folder (or upload it to s3://...), then pass it as --eval-set") from None


def photo_id(url: str) -> str:
    """Unsplash photo ids are the last 11 characters of the page URL (ids may contain '-')."""
    last = url.strip().rstrip("/").split("/")[-1].split("?")[0]
    if len(last) < 11:
        raise ValueError(f"{url!r} does not look like an unsplash.com/photos/<slug>-<id> URL")
    return last[-11:]


def read_list(urls: str | None) -> list[str]:
    text = Path(urls).read_text() if urls else _get(LIST_URL).decode()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"URL list {urls or LIST_URL} is empty")
    return lines


def fetch(out: str, urls: str | None = None, max_side: int = 1024, progress: bool = True) -> list[Path]:
    """Download every photo to ``out/NN_<id>.jpg`` (kept if already there), downscaled to ``max_side``."""
    from PIL import Image
    from tqdm import tqdm

    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for i, url in enumerate(tqdm(read_list(urls), desc="unsplash-50", disable=not progress)):
        p = dest / f"{i:02d}_{photo_id(url)}.jpg"
        if not p.exists():
            with Image.open(io.BytesIO(_get(DOWNLOAD.format(id=photo_id(url))))) as im:
                im = im.convert("RGB")
                if max_side:
                    im.thumbnail((max_side, max_side))
                tmp = p.with_suffix(".partial")
                im.save(tmp, "JPEG", quality=95)
                tmp.replace(p)
        written.append(p)
    return written
