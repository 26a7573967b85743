"""The images built for real and run: the `images` tier (``pytest -m images``; `.ci/run images`).

Builds the CPU and CPU-Triton images from a clean clone of this checkout's HEAD with
``motioncharacter images build`` (podman; the base from Debian's packages when no registry
answers), then runs the CLI in the image, one pipeline step through kfp's DockerRunner against the
same step through the subprocess runner, a failing step (it must fail), and the CPU Triton image
serving the tiny model. Excluded from the default run (pyproject's addopts): ~10 min and ~9 GB.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# the build alone can pass the suite-wide 900 s on a loaded 2-core machine
pytestmark = [pytest.mark.images, pytest.mark.slow, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "motioncharacter.cli"]


def _image_user_dir(path: Path) -> Path:
    """A folder the image's non-root user (uid 10001) can write, as the containers runner makes them."""
    from motioncharacter.pipelines.containers import writable_for_image

    writable_for_image([path])
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The images, built from a clean clone of HEAD (the engine set up by docker/engine-setup.sh)."""
    if not shutil.which("podman"):
        pytest.fail("podman is not installed: run docker/engine-setup.sh (`.ci/run images` does)")
    clone = tmp_path_factory.mktemp("clone") / "src"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    r = subprocess.run([*CLI, "images", "build", "--source", str(clone)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    from motioncharacter.images import IMAGE, TRITON_CPU_IMAGE

    for tag in (IMAGE, TRITON_CPU_IMAGE):
        assert subprocess.run(["podman", "image", "exists", tag]).returncode == 0, tag
    return {"cpu": IMAGE, "triton": TRITON_CPU_IMAGE}


def _podman_run(image: str, *cmd: str, volumes: dict[Path, str] | None = None) -> subprocess.CompletedProcess:
    mounts = [a for host, inner in (volumes or {}).items() for a in ("-v", f"{host}:{inner}")]
    return subprocess.run(["podman", "run", "--rm", *mounts, image, *cmd], capture_output=True, text=True)


def test_image_runs_the_cli_as_non_root_with_the_packages_version(images):
    from motioncharacter import __version__

    r = _podman_run(images["cpu"], "motioncharacter", "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"motioncharacter {__version__}", r.stderr
    r = _podman_run(images["cpu"], "id", "-u")  # Kubernetes' command/args run as given: no ENTRYPOINT
    assert r.stdout.strip() == "10001", r.stdout + r.stderr
    r = _podman_run(images["cpu"], "sh", "-c", "echo kfp-style")
    assert r.stdout.strip() == "kfp-style", r.stderr


def test_tiny_generate_in_the_image_writes_a_video(images, tmp_path):
    from PIL import Image

    from motioncharacter.fixtures import package_face
    work = _image_user_dir(tmp_path / "io")
    Image.fromarray(package_face("grace_hopper")).save(work / "face.png")
    os.chown(work / "face.png", 10001, 10001)
    r = _podman_run(images["cpu"], "motioncharacter", "generate", "--preset", "tiny", "--image", "/io/face.png",
                    "--prompt", "a person talking", "--action", "talking", "--out", "/io/out.mp4",
                    volumes={work: "/io"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    frames = _frames(work / "out.mp4")
    assert len(frames) == 8 and frames[0].shape[:2] == (64, 64)


def _frames(path) -> "np.ndarray":
    from motioncharacter.video import open_video, probe, read_frames

    vr = open_video(path)
    return read_frames(vr, list(range(probe(vr).num_frames)))


def _digest(p: Path) -> str:
    """sha256 of a file's bytes; of an .npz's arrays (numpy stamps each zip member with the time)."""
    if p.suffix != ".npz":
        return hashlib.sha256(p.read_bytes()).hexdigest()
    import numpy as np

    h = hashlib.sha256()
    with np.load(p) as z:
        for k in sorted(z.files):
            h.update(k.encode() + z[k].tobytes())
    return h.hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _run_step(runner_kind: str, work: Path, root: Path) -> str:
    from kfp import local

    from motioncharacter.pipelines import containers
    from motioncharacter.pipelines.pipeline import prepare_shard

    kwargs = dict(data_uri="fixtures", work_uri=str(work), index=0, count=1, overrides=["filters.ocr=false"])
    if runner_kind == "subprocess":
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        return prepare_shard(**kwargs).output
    dirs = [root, work]
    containers.writable_for_image(dirs)
    with containers.engine_socket(), containers.kfp_docker_fix(dirs):
        local.init(runner=containers.docker_runner(), pipeline_root=str(root), raise_on_error=True)
        return prepare_shard(**kwargs).output


def test_a_step_in_the_image_writes_what_the_subprocess_runner_writes(images, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{_image_user_dir(tmp_path / 'mlflow')}/mlflow.db")
    out = {}
    for kind in ("subprocess", "docker"):
        work, root = tmp_path / kind / "work", tmp_path / kind / "kfp"
        result = _run_step(kind, work, root)
        assert result.startswith(str(work)), result
        out[kind] = _files(work)
    assert out["docker"], "the containerized step wrote nothing into the mounted work folder"
    assert out["docker"].keys() == out["subprocess"].keys()
    assert out["docker"] == out["subprocess"]


def test_a_failing_step_in_a_container_is_a_failure(images, tmp_path):
    """kfp 2.17 read a vanished (auto-removed) container as exit code 0: the fix must keep failures."""
    from kfp import dsl, local

    from motioncharacter.pipelines import containers
    from motioncharacter.pipelines.pipeline import IMAGE

    @dsl.component(base_image=IMAGE, install_kfp_package=False)
    def fails(code: int) -> str:
        import sys

        sys.exit(code)

    @dsl.component(base_image=IMAGE, install_kfp_package=False)
    def succeeds(word: str) -> str:
        return word.upper()

    root = tmp_path / "kfp"
    containers.writable_for_image([root])
    with containers.engine_socket(), containers.kfp_docker_fix([root]):
        local.init(runner=containers.docker_runner(), pipeline_root=str(root), raise_on_error=True)
        assert succeeds(word="ok").output == "OK"
        with pytest.raises(RuntimeError, match="FAILURE"):
            fails(code=3)


def test_the_cpu_triton_image_serves_the_tiny_model(images, tmp_path):
    from motioncharacter.pipelines import containers
    from motioncharacter.pipelines.steps import smoke_step
    repo = tmp_path / "repo"
    subprocess.run([*CLI, "deploy", "--preset", "tiny", "--model-repository", str(repo)], check=True,
                   capture_output=True)
    with containers.engine_socket(), containers.triton_container(str(repo), images["triton"]) as url:
        assert url.startswith("http://127.0.0.1:")
        video = smoke_step(str(repo), url, str(tmp_path / "smoke"), "a person talking", "talking", 8.0)
    frames = _frames(video)
    assert len(frames) == 8
