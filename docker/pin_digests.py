"""Pin the base and third-party images by digest: ``name:tag`` -> ``name:tag@sha256:...``.

    python docker/pin_digests.py            # rewrite docker/Dockerfile* and k8s/**/*.yaml in place
    python docker/pin_digests.py --check    # exit 1 naming every image still pinned by tag only

Run it where the registries are reachable (this project's CI machine cannot resolve them). The
digest is the registry's own ``Docker-Content-Digest`` for the tag's manifest (the multi-arch
index where there is one), asked with the Registry HTTP API v2 and an anonymous bearer token from
the registry's ``WWW-Authenticate`` challenge: no docker, crane or skopeo needed. The tag stays
beside the digest so people can read what it is; the digest is what gets pulled. The project's
own images (``motioncharacter*``) are built here and pinned by the overlays, not by this script.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCEPT = ", ".join(["application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json",
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])
# FROM <image> [AS name] in Dockerfiles; `image: <image>` in manifests
PATTERNS = (re.compile(r"^(FROM\s+)(\S+)", re.M), re.compile(r"^(\s*(?:-\s+)?image:\s*)([^\s#]+)", re.M))


def split_reference(ref: str) -> tuple[str, str, str] | None:
    """(registry, repository, tag) of ``ref``, or None for a reference already pinned or not ours to pin."""
    if "@" in ref or ref.split("/")[-1].startswith("motioncharacter") or "$" in ref:
        return None
    name, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "latest")
    first = name.split("/")[0]
    if "." in first or ":" in first or first == "localhost":
        registry, repo = first, name[len(first) + 1:]
    else:  # Docker Hub: "python" is library/python
        registry, repo = "registry-1.docker.io", name if "/" in name else f"library/{name}"
    return registry, repo, tag


def parse_challenge(header: str) -> dict[str, str]:
    """The fields of ``Bearer realm="...",service="...",scope="..."``."""
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


def resolve(ref: str, timeout: float = 30.0) -> str:
    """The registry's digest for ``ref``'s tag (sha256:...)."""
    registry, repo, tag = split_reference(ref)
    url = f"https://{registry}/v2/{repo}/manifests/{tag}"
    headers = {"Accept": ACCEPT}
    for attempt in range(2):
        req = urllib.request.Request(url, headers=headers, method="HEAD")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                digest = r.headers.get("Docker-Content-Digest")
                if not digest:
                    raise RuntimeError(f"{registry} gave no Docker-Content-Digest for {ref}")
                return digest
        except urllib.error.HTTPError as e:
            if e.code != 401 or attempt:
                raise RuntimeError(f"{registry} answered {e.code} for {ref}") from None
            c = parse_challenge(e.headers.get("WWW-Authenticate", ""))
            query = urllib.parse.urlencode({k: c[k] for k in ("service", "scope") if k in c}
                                           or {"scope": f"repository:{repo}:pull"})
            with urllib.request.urlopen(f"{c['realm']}?{query}", timeout=timeout) as r:
                body = json.loads(r.read())
            headers["Authorization"] = f"Bearer {body.get('token') or body['access_token']}"
    raise AssertionError("unreachable")


def pin_text(text: str, lookup) -> tuple[str, list[str]]:
    """``text`` with every unpinned image reference given ``@<lookup(ref)>``; and those references."""
    found = []
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))  # FROM <earlier stage>

    def sub(m):
        ref = m.group(2)
        if ref in stages or split_reference(ref) is None:
            return m.group(0)
        found.append(ref)
        return f"{m.group(1)}{ref}@{lookup(ref)}"

    for pattern in PATTERNS:
        text = pattern.sub(sub, text)
    return text, found


def files() -> list[Path]:
    return sorted((ROOT / "docker").glob("Dockerfile*")) + sorted((ROOT / "k8s").rglob("*.yaml"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if an image lacks a digest")
    a = ap.parse_args(argv)
    cache: dict[str, str] = {}
    unpinned = []
    for f in files():
        text = f.read_text()
        if a.check:
            unpinned += [f"{f.relative_to(ROOT)}: {ref}" for ref in pin_text(text, lambda r: "")[1]]
            continue
        new, refs = pin_text(text, lambda r: cache.setdefault(r, resolve(r)))
        if refs:
            f.write_text(new)
            print(f"{f.relative_to(ROOT)}: " + ", ".join(f"{r}@{cache[r][:19]}..." for r in refs))
    if a.check and unpinned:
        print("pinned by tag only (run docker/pin_digests.py where the registries are reachable):\n  "
              + "\n  ".join(unpinned), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
