"""Start and stop a real ``tritonserver`` (the binary shipped in the nvidia-pytriton wheel) on loopback.

The wheel carries the server, the Python backend and a stub per Python version; Triton wants them
in one backend folder, so ``backend_dir()`` assembles one (copied once into the cache). The stub
embeds this interpreter's libpython and must see this venv first on PATH to import our packages.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from .. import storage
from ..stack import free_port, pid_alive, port_free  # noqa: F401 (free_port: one helper for every loopback service)

log = logging.getLogger(__name__)


# APIs a client of the model never needs: loading/unloading models, registering shared memory
# (a client could point the server at memory regions), tracing and log settings. Calls to them
# must carry this header with the admin key.
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "triton-admin-key"
ADMIN_KEY_ENV = "MOTIONCHARACTER_TRITON_ADMIN_KEY"

# How a running server picks up a new version (serving/repository.py writes N+1, then re-points
# config.pbtxt): "explicit" loads every model at start and reloads one when `deploy --url` asks
# (the admin API); "poll" rescans the repository every poll_s seconds. Either way Triton loads and
# warms up the new version while the old one keeps serving, then unloads the old one.
MODEL_CONTROL = ("explicit", "poll")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (even by SIGKILL), so
    `serve` never leaves a server running under init. Not SIGTERM: with a generation in flight,
    Triton's clean shutdown waits for the Python stub and then hangs past its own exit timeout
    (seen here). Its stubs end themselves when it is gone (backend._exit_with_server)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# The Python backend keeps each model instance's tensors in /dev/shm regions named by this prefix.
# A killed server leaves them (about 2 MiB each, seen here), so each server gets its owner's pid in
# the prefix: stop() removes its own, and start() removes those whose owner is gone.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "motioncharacter_triton_"


def _shm_regions(prefix: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{prefix}*")) if SHM_DIR.is_dir() else []


def remove_stale_shm() -> list[str]:
    """Remove the shared-memory regions of servers whose owning process has exited; their names."""
    removed = []
    for region in _shm_regions(SHM_PREFIX):
        try:
            owner = int(region.name[len(SHM_PREFIX):].split("_", 1)[0])
        except ValueError:
            continue
        if not pid_alive(owner):
            region.unlink(missing_ok=True)
            removed.append(region.name)
    if removed:
        log.info("removed %d shared-memory regions left by servers that were killed", len(removed))
    return removed


class ServerError(RuntimeError):
    """tritonserver could not start, or did not become ready; the message holds its last log lines."""


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def tritonserver_binary() -> Path:
    return _pytriton_root() / "bin" / "tritonserver"


def backend_dir() -> Path:
    """A backend folder with ``python/`` holding libtriton_python.so, its utils and the 3.11 stub."""
    src = _pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = [src / "backends/python/libtriton_python.so", src / "backends/python/triton_python_backend_utils.py",
             src / f"python_backend_stubs/{py}/triton_python_backend_stub"]
    dest = storage.cache_dir() / "triton-backends"
    for f in files:
        target = dest / "python" / f.name
        if not target.exists() or target.stat().st_size != f.stat().st_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".{os.getpid()}.partial")
            shutil.copy2(f, tmp)
            tmp.replace(target)  # atomic, so concurrent test sessions never see half a file
    return dest


def server_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    libs = [str(Path(sys.prefix) / "lib" / "python3.11" / "site-packages" / "nvidia_pytriton.libs"),
            sysconfig.get_config_var("LIBDIR") or ""]
    try:
        import pytriton

        libs[0] = str(Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs")
    except ImportError:
        pass
    env["LD_LIBRARY_PATH"] = ":".join([*(p for p in libs if p), env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # Idle OpenMP threads of one model instance must not spin on cores that other instances (or
    # other processes on a shared CPU node) need: measured 0.8 s vs 10-15 s a tiny request here.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # Triton's S3 client wants a region, any for non-AWS stores
    return env


def triton_repository_uri(uri: str) -> str:
    """Triton's own spelling of an s3 repository: ``s3://host:port/bucket/prefix`` for non-AWS stores."""
    if not storage.is_s3(uri):
        return str(Path(uri).resolve())
    ep = storage.endpoint()
    if not ep:
        return uri  # AWS S3 proper: Triton resolves the bucket itself
    hostport = ep.split("://", 1)[-1].rstrip("/")
    return f"s3://{hostport}/{uri[len('s3://'):]}"


PORT_TRIES = 3


def _port_clash(error: str) -> bool:
    """The server's start failed because an address was taken (as tritonserver logs it)."""
    text = error.lower()
    return "already in use" in text or "address in use" in text


class TritonServer:
    """A tritonserver child process; use as a context manager or call start()/stop()."""

    def __init__(self, model_repository: str, *, http_port: int | None = 8000, grpc_port: int | None = 8001,
                 metrics_port: int | None = 8002, host: str = "127.0.0.1", log_file: str | Path | None = None,
                 log_verbose: int = 0, exit_timeout_s: int = 30, extra_args: tuple[str, ...] = (),
                 model_control: str = "explicit", poll_s: float = 15.0):
        if model_control not in MODEL_CONTROL:
            raise ValueError(f"model_control must be one of {', '.join(MODEL_CONTROL)}, got {model_control!r}")
        if model_control == "poll" and not poll_s > 0:
            raise ValueError(f"--poll-seconds must be > 0, got {poll_s}")
        if not storage.is_s3(model_repository) and not Path(model_repository).is_dir():
            raise FileNotFoundError(f"model repository {model_repository} does not exist (run `motioncharacter deploy`)")
        self.repository = model_repository
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        # ports picked here (None given): picked again when another program takes one before the start
        self._picked = tuple(n for n, v in (("http", http_port), ("grpc", grpc_port), ("metrics", metrics_port))
                             if not v)
        self.host = host
        self.log_file = Path(log_file) if log_file else None
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = tuple(extra_args)
        self.model_control, self.poll_s = model_control, poll_s
        self.proc: subprocess.Popen | None = None
        import secrets

        self._random_key = secrets.token_hex(16)
        self._started_key: str | None = None
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"

    @property
    def admin_key(self) -> str:
        """The key the restricted APIs (model load/unload, ...) want in the triton-admin-key header:
        the one this server was started with."""
        return self._started_key or os.environ.get(ADMIN_KEY_ENV) or self._random_key

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, redact: bool = False) -> list[str]:
        # without a configured admin key, a random one per start: the restricted APIs are simply off
        key = "****" if redact else self.admin_key
        restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={key}"
        control = ["--model-control-mode=poll", f"--repository-poll-secs={max(1, round(self.poll_s))}"] \
            if self.model_control == "poll" else ["--model-control-mode=explicit", "--load-model=*"]
        return [
            str(tritonserver_binary()),
            f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
            f"--model-repository={triton_repository_uri(self.repository)}", *control,
            f"--backend-directory={backend_dir()}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--allow-cpu-metrics=true", "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def start(self, wait: bool = True, timeout_s: float = 180.0) -> "TritonServer":
        """Start the server (and wait until it is ready). A port this server picked itself that
        another program took meanwhile is picked again, before the start and, if the server fails
        to bind it, for up to PORT_TRIES starts."""
        for attempt in range(1, PORT_TRIES + 1):
            for name in self._picked:
                if not port_free(getattr(self, f"{name}_port")):
                    setattr(self, f"{name}_port", free_port())
            try:
                return self._start(wait, timeout_s)
            except ServerError as e:
                taken = [n for n in self._picked if not port_free(getattr(self, f"{n}_port"))]
                if attempt == PORT_TRIES or not self._picked or not (taken or _port_clash(str(e))):
                    raise
                log.warning("tritonserver could not bind a picked port; picking new ports (try %d of %d)",
                            attempt + 1, PORT_TRIES)
                for name in self._picked:
                    setattr(self, f"{name}_port", free_port())
        raise AssertionError("unreachable")

    def _start(self, wait: bool, timeout_s: float) -> "TritonServer":
        if self.proc and self.proc.poll() is None:
            return self
        out = None
        if self.log_file:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "ab")
        remove_stale_shm()
        log.info("starting tritonserver: %s", " ".join(self.command(redact=True)))
        self._started_key = None
        self._started_key = self.admin_key  # what command() passes: later env changes do not reach the server
        # Own session: a last-resort kill reaches the Python stubs too, and Ctrl-C in a terminal
        # goes to us first so we can stop the server cleanly.
        self.proc = subprocess.Popen(self.command(), env=server_env(), stdout=out, stderr=subprocess.STDOUT if out else None,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        if out:
            out.close()
        if wait:
            self.wait_ready(timeout_s)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode} while starting"
                                  f"{self._log_tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout_s:g} s{self._log_tail()}")

    def _log_tail(self, n: int = 30) -> str:
        if self.log_file and self.log_file.exists():
            lines = self.log_file.read_text(errors="replace").splitlines()[-n:]
            return ":\n" + "\n".join(lines)
        return ""

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGINT (Triton unloads models and exits), then SIGKILL of its process group if it hangs."""
        if not self.proc:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s or self.exit_timeout_s + 15)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in time; killing its process group %d", self.proc.pid)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for region in _shm_regions(self.shm_prefix):  # what a killed server or stub could not remove
            region.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
