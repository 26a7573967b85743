"""``pipeline run --local --containers``: every step in the project's image, through kfp's DockerRunner.

kfp.local's DockerRunner talks to a Docker API: Docker's, or Podman's (``podman system service``),
which :func:`engine_socket` starts when DOCKER_HOST is unset and podman is installed. Locally:

- the CUDA image's steps (train, evaluate) run in the CPU image: there is no GPU here (and the CUDA
  image cannot be built without NVIDIA's registry); :data:`LOCAL_IMAGES` maps one to the other;
- the steps share the host's network (the stack's S3 and MLflow on loopback, the Triton container);
- local folders the steps write (pipeline root, work_uri, model repository, an sqlite MLflow store)
  are mounted at the same paths, and, when we are root, given to the image's non-root user;
- the Triton smoke test talks to the CPU Triton image (:func:`triton_container`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

from motioncharacter import storage

from motioncharacter.images import GPU_IMAGE, IMAGE

IMAGE_UID = 10001  # docker/Dockerfile's user
LOCAL_IMAGES = {GPU_IMAGE: IMAGE}
# what a step needs from this environment: the object store, MLflow, the Triton admin key
ENV_PREFIXES = ("MOTIONCHARACTER_", "MLFLOW_", "AWS_")


class EngineError(RuntimeError):
    """No container engine to run the steps in; says what to install or set."""


@contextlib.contextmanager
def engine_socket() -> Iterator[str]:
    """DOCKER_HOST for the Docker API: as set, else a ``podman system service`` started for the run."""
    if os.environ.get("DOCKER_HOST") or not shutil.which("podman"):
        if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
            raise EngineError("no container engine: install podman (docker/engine-setup.sh) or set DOCKER_HOST")
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    path = Path(tempfile.mkdtemp(prefix="motioncharacter-podman-")) / "podman.sock"
    url = f"unix://{path}"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    old = os.environ.get("DOCKER_HOST")
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise EngineError(f"`podman system service {url}` did not start (exit status {proc.poll()})")
            time.sleep(0.2)
        os.environ["DOCKER_HOST"] = url
        yield url
    finally:
        os.environ.pop("DOCKER_HOST", None) if old is None else os.environ.__setitem__("DOCKER_HOST", old)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(path.parent, ignore_errors=True)


def run_container(client, image: str, command: list[str], volumes: dict, extra_volumes: dict | None = None,
                  **run_args) -> int:
    """Run one step's container and return its real exit status (replaces kfp's run_docker_container).

    kfp 2.17's ``docker_task_handler.run_docker_container`` starts the container with
    ``auto_remove=True`` and then asks for its status: podman 4.3 answers for a removed container
    with 500 (kfp handles only 404), and when kfp does get a 404 it returns exit code 0, so a step
    that failed was reported SUCCESS. Here the container is kept until its status is read, then
    removed; an unreadable status is an error, never a success. ``extra_volumes``: kfp's runner
    refuses ``volumes`` in its run arguments and mounts only the pipeline root."""
    image = LOCAL_IMAGES.get(image, image)
    if ":" not in image.rsplit("/", 1)[-1]:
        image += ":latest"
    run_args = {k: v for k, v in run_args.items() if k != "auto_remove"}
    volumes = {**volumes, **(extra_volumes or {})}
    container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                      volumes=volumes, **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


@contextlib.contextmanager
def kfp_docker_fix(dirs: list[Path]) -> Iterator[None]:
    """kfp's DockerTaskHandler with :func:`run_container` in place of its run_docker_container,
    mounting ``dirs`` at the same paths."""
    import functools

    from kfp.local import docker_task_handler

    volumes = {str(d): {"bind": str(d), "mode": "rw"} for d in dirs}
    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = functools.partial(run_container, extra_volumes=volumes)
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


def local_dirs(params: dict, pipeline_root: str) -> list[Path]:
    """The host folders the steps write (pipeline root, a local work_uri and model repository)."""
    dirs = [Path(pipeline_root)]
    for key in ("work_uri", "model_repository"):
        uri = params.get(key) or ""
        if uri and not storage.is_s3(uri):
            dirs.append(Path(uri))
    return [d.resolve() for d in dirs]


def writable_for_image(dirs: list[Path]) -> None:
    """Create the folders; as root, give them to the image's user (uid 10001 cannot write root's folders)."""
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            for p in [d, *d.rglob("*")]:
                os.lchown(p, IMAGE_UID, IMAGE_UID)


def step_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def docker_runner(extra_env: dict | None = None):
    from kfp import local

    return local.DockerRunner(network_mode="host", environment={**step_env(), **(extra_env or {})}, shm_size="256m")


def require_images(tags: list[str]) -> None:
    """Fail before the first step, naming the images the engine lacks and the command that builds them."""
    import docker

    client = docker.from_env()
    try:
        have = {tag for image in client.images.list() for tag in image.tags}
    finally:
        client.close()
    missing = [t for t in tags if t not in have]
    if missing:
        raise EngineError(f"the container engine has no {', '.join(missing)}: build with `motioncharacter images build`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def triton_container(model_repository: str, image: str, ready_timeout_s: float = 300.0) -> Iterator[str]:
    """The CPU Triton image serving ``model_repository`` on loopback (host network), polling it for
    the versions the deploy step writes; yields its HTTP URL, removes the container afterwards."""
    import docker
    import requests

    http, grpc, metrics = free_port(), free_port(), free_port()
    volumes = {}
    if not storage.is_s3(model_repository):
        Path(model_repository).mkdir(parents=True, exist_ok=True)
        volumes[str(Path(model_repository).resolve())] = {"bind": str(Path(model_repository).resolve()), "mode": "ro"}
    client = docker.from_env()
    container = client.containers.run(
        image, ["motioncharacter", "serve", "--model-repository", model_repository, "--host", "127.0.0.1",
                "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                "--model-control", "poll", "--poll-seconds", "2"],
        detach=True, network_mode="host", environment=step_env(), volumes=volumes, shm_size="256m")
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            container.reload()
            if container.status == "exited":
                raise EngineError(f"the Triton container ({image}) exited: "
                                  f"{container.logs(tail=30).decode(errors='replace')}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/v2/health/live", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise EngineError(f"the Triton container ({image}) was not live after {ready_timeout_s:.0f} s")
            time.sleep(1)
        print(f"Triton (CPU image {image}) at {url}, serving {model_repository}", flush=True)
        yield url
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)
        client.close()


@contextlib.contextmanager
def container_run(args: dict, pipeline_root: str, triton_image: str) -> Iterator[object]:
    """What a run with every step in a container needs; yields kfp's runner. Sets ``args["triton_url"]``
    to a CPU Triton container unless one was given. Without MLFLOW_TRACKING_URI, the steps log to
    ``<pipeline_root>/mlflow.db`` (a folder the image's user can be given; never the working folder)."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow = old or f"sqlite:///{Path(pipeline_root).resolve() / 'mlflow.db'}"
    dirs = local_dirs(args, pipeline_root)
    writable_for_image(dirs)
    if mlflow.startswith("sqlite:///"):  # a store given by the user must be writable by uid 10001 already
        dirs.append(Path(mlflow[len("sqlite:///"):]).parent)
    os.environ["MLFLOW_TRACKING_URI"] = mlflow
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(engine_socket())
            require_images([IMAGE] + ([] if args.get("triton_url") else [triton_image]))
            stack.enter_context(kfp_docker_fix(dirs))
            if not args.get("triton_url"):
                args["triton_url"] = stack.enter_context(triton_container(args["model_repository"], triton_image))
            # DeepSpeed JIT-builds its CPU op on first use (minutes on 2 cores): once per run, not per step
            yield docker_runner({"TORCH_EXTENSIONS_DIR": str(Path(pipeline_root).resolve() / "torch_extensions")})
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
