"""``motioncharacter images build``: the project's container images, built with the local engine.

What can be built here is built: the CPU project image (docker/Dockerfile) and the CPU Triton
image (docker/Dockerfile.triton-cpu: the project image's tritonserver from the pinned
nvidia-pytriton wheel with the project's Python backend). The CUDA image and the GPU Triton image
start from NVIDIA's registry images; they are built only with ``--all`` where those can be pulled.

When no registry can be reached (this project's CI machines), the base of docker/Dockerfile is made
from Debian's own packages with debootstrap (``--base-from-debian``, or automatically when the pull
fails) and given to the build as a replacement for the Dockerfile's first FROM (``--from``), so the
Dockerfile keeps naming the real base. HTTPS goes through a proxy with its own CA on such machines:
the host's CA bundle is lent to the build's RUN steps as a read-only mount, never copied into a
layer. docker/README.md has the engine settings.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The images' names, as the compiled pipeline (pipelines/pipeline.py) and k8s/ use them. Here, not
# in the pipeline module, so that the CLI does not import kfp to list its commands.
IMAGE = "ghcr.io/motioncharacter/motioncharacter:0.1.0"
GPU_IMAGE = "ghcr.io/motioncharacter/motioncharacter:0.1.0-cuda"
TRITON_IMAGE = "ghcr.io/motioncharacter/motioncharacter-triton:0.1.0"
TRITON_CPU_IMAGE = "ghcr.io/motioncharacter/motioncharacter-triton:0.1.0-cpu"
DEBIAN_BASE = "localhost/motioncharacter-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# what docker/Dockerfile's python:3.11-slim base gives it: Python 3.11 with venv and pip, `python`
DEBIAN_PACKAGES = ["python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates"]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class Image:
    name: str
    dockerfile: str
    tag: str
    needs_registry: bool  # its base comes from a registry only (NVIDIA's images)


IMAGES = [
    Image("cpu", "docker/Dockerfile", IMAGE, False),
    Image("triton-cpu", "docker/Dockerfile.triton-cpu", TRITON_CPU_IMAGE, False),  # FROM the cpu image
    Image("cuda", "docker/Dockerfile.cuda", GPU_IMAGE, True),
    Image("triton", "docker/Dockerfile.triton", TRITON_IMAGE, True),
]


class ImageError(RuntimeError):
    """An image could not be built; names the image, the command and what to do."""


def find_engine(preferred: str | None = None) -> str:
    """``podman`` or ``docker``: the one asked for, else the first installed (podman first)."""
    for name in ([preferred] if preferred else ["podman", "docker"]):
        if shutil.which(name):
            return name
    raise ImageError(f"no container engine: {preferred or 'podman or docker'} is not installed "
                     "(docker/engine-setup.sh installs and configures podman from Debian's packages)")


def source_root(given: str | None = None) -> Path:
    """The checkout to build from: ``given``, else the one this package is installed from, else cwd."""
    for cand in ([Path(given)] if given else [Path(__file__).resolve().parents[1], Path.cwd()]):
        if (cand / "docker" / "Dockerfile").is_file():
            return cand.resolve()
    raise ImageError(f"{given or 'neither the installed package nor the working folder'} is not a checkout of the "
                     "project (no docker/Dockerfile): give --source DIR")


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, **kw)
    if r.returncode:
        raise ImageError(f"{what} failed (exit status {r.returncode}): {' '.join(cmd)}")
    return r


def exists(engine: str, tag: str) -> bool:
    return subprocess.run([engine, "image", "inspect", tag], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def dockerfile_base(path: Path) -> str:
    """The image named by the Dockerfile's first FROM."""
    for line in path.read_text().splitlines():
        if line.strip().upper().startswith("FROM "):
            return line.split()[1]
    raise ImageError(f"{path} has no FROM")


def can_pull(engine: str, ref: str, timeout_s: float = 60.0) -> bool:
    try:
        return subprocess.run([engine, "pull", ref], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def debian_base(engine: str, tag: str = DEBIAN_BASE, mirror: str = DEBIAN_MIRROR, rebuild: bool = False) -> str:
    """A Debian bookworm image with Python 3.11, from Debian's packages (debootstrap; the packages are
    checked against the mirror's signed Release file), imported as ``tag``; kept and reused."""
    if exists(engine, tag) and not rebuild:
        print(f"Debian base {tag} is there (rebuild with --rebuild-base)")
        return tag
    if not shutil.which("debootstrap"):
        raise ImageError("the Debian base needs debootstrap (apt-get install debootstrap; docker/engine-setup.sh)")
    with tempfile.TemporaryDirectory(prefix="motioncharacter-rootfs-") as d:
        root = Path(d) / "rootfs"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}", "bookworm",
              str(root), mirror], "debootstrap of the Debian base", stdout=subprocess.DEVNULL)
        for junk in ("var/lib/apt/lists", "var/cache/apt/archives"):
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        _run([engine, "import", "--change", 'CMD ["/bin/bash"]', "-", tag], "importing the Debian base",
             stdin=tar.stdout, stdout=subprocess.DEVNULL)
        tar.wait()
    return tag


def build_command(engine: str, image: Image, src: Path, base: str | None, lend_ca: bool) -> list[str]:
    """The engine's build command for ``image``; ``base`` replaces the Dockerfile's first FROM."""
    cmd = [engine, "build", "-f", str(src / image.dockerfile), "-t", image.tag]
    if engine == "podman":
        cmd += ["--pull=never" if base or not image.needs_registry else "--pull=missing", "--network=host"]
        if lend_ca and Path(CA_BUNDLE).is_file():  # read-only, for RUN steps only: never in a layer
            cmd += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    if base:
        if engine != "podman":
            raise ImageError("a replacement base (--base-from-debian) needs podman's --from; docker cannot")
        cmd += ["--from", base]
    return cmd + [str(src)]


def size_bytes(engine: str, tag: str) -> int:
    out = subprocess.run([engine, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def build(engine: str, src: Path, which: list[str], base_from_debian: bool | None = None,
          lend_ca: bool = True) -> dict[str, dict]:
    """Build the named images in order; returns {name: {tag, seconds, bytes}}.

    ``base_from_debian``: True always, False never, None when docker/Dockerfile's base is not in
    the engine's store and cannot be pulled."""
    results = {}
    for image in IMAGES:
        if image.name not in which:
            continue
        base = None
        if image.name == "cpu":
            ref = dockerfile_base(src / image.dockerfile)
            if base_from_debian is None:
                base_from_debian = not exists(engine, ref) and not can_pull(engine, ref)
                if base_from_debian:
                    print(f"{ref} is not here and cannot be pulled: making the base from Debian's packages")
            if base_from_debian:
                base = debian_base(engine)
        elif image.needs_registry and not exists(engine, dockerfile_base(src / image.dockerfile)) \
                and not can_pull(engine, dockerfile_base(src / image.dockerfile)):
            raise ImageError(f"{image.name}: its base {dockerfile_base(src / image.dockerfile)} cannot be pulled "
                             "from here (no registry reachable); build it where NVIDIA's registry is")
        t0 = time.monotonic()
        _run(build_command(engine, image, src, base, lend_ca), f"building {image.name} ({image.dockerfile})")
        results[image.name] = {"tag": image.tag, "seconds": round(time.monotonic() - t0, 1),
                               "bytes": size_bytes(engine, image.tag)}
        print(f"built {image.tag} in {results[image.name]['seconds']} s, "
              f"{results[image.name]['bytes'] / 1e9:.2f} GB", flush=True)
    return results


def add_commands(sub) -> None:
    p = sub.add_parser("images", help="build the project's container images with the local engine",
                       description=__doc__.split("\n\n")[1])
    ps = p.add_subparsers(dest="images_command", metavar="ACTION")
    b = ps.add_parser("build", help="build the CPU and CPU-Triton images (and the GPU ones with --all)",
                      description="Build the images this machine can build, tagged as the manifests and the "
                      "compiled pipeline name them: " + ", ".join(f"{i.name}={i.tag}" for i in IMAGES) + ".")
    b.add_argument("--engine", choices=["podman", "docker"], help="container engine (default: podman if installed)")
    b.add_argument("--base-from-debian", action="store_true", default=None,
                   help="make docker/Dockerfile's base from Debian's packages (debootstrap) instead of pulling "
                        "it; automatic when the base cannot be pulled (podman only)")
    b.add_argument("--rebuild-base", action="store_true", help="make the Debian base again even if it is there")
    b.add_argument("--all", action="store_true",
                   help="also the CUDA and GPU Triton images (their bases come from NVIDIA's registry)")
    b.add_argument("--only", action="append", choices=[i.name for i in IMAGES], help="just this image (repeatable)")
    b.add_argument("--no-ca-bundle", dest="lend_ca", action="store_false",
                   help=f"do not lend the host's {CA_BUNDLE} to the build (it is lent read-only, never copied)")
    b.add_argument("--source", metavar="DIR", help="the checkout to build (default: the one installed, else cwd)")
    b.set_defaults(func=_build)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _build(args: argparse.Namespace) -> int:
    import json

    from .cli import UserError

    which = args.only or [i.name for i in IMAGES if args.all or not i.needs_registry]
    try:
        engine = find_engine(args.engine)
        if args.rebuild_base:
            debian_base(engine, rebuild=True)
        results = build(engine, source_root(args.source), which, args.base_from_debian, args.lend_ca)
    except ImageError as e:
        raise UserError(str(e)) from e
    json.dump(results, sys.stdout, indent=1)
    print()
    return 0

