"""MLflow tracking in one place.

The tracking server comes from ``MLFLOW_TRACKING_URI`` (set by ``motioncharacter stack up``
for the local stack, or by the cluster); the embedded default is a sqlite file in the
working directory, ``mlflow.db``, named by its absolute path (MLflow caches stores by URI, so a
relative ``sqlite:///mlflow.db`` would keep writing to the first working directory's file).

Stages log through ``log_params`` (flattened, secrets refused), ``log_metrics`` and
``log_artifact`` (a local file or folder, or an s3:// URI) inside ``run(...)``. A long job
(training) logs through a ``Guard``, which an unreachable server cannot stop.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .cli import UserError

DEFAULT_DB = "mlflow.db"
CHECK_TIMEOUT = 3.0  # seconds to wait for a tracking server's /health before giving up
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
log = logging.getLogger(__name__)

# A key segment that names a credential ("secret_key", "db.password", "hf_token", "api-key",
# "aws_access_key_id"), but not "max_tokens", "tokenizer", "keyframes", "sort_key" or "author".
_SECRET = re.compile(r"secret|passw|^pwd$|credential|^auth(orization)?$|"
                     r"(^|_)(access|auth|api|bearer|session|refresh|id|hf)?_?token$|"
                     r"(private|api|access|secret|session|signing|encryption|master)_?key(_?id)?$|^key$|"
                     r"(tracking|auth)_?user(name)?$", re.I)  # MLflow's basic-auth login is not a param either
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "OPENAI_API_KEY", "HF_TOKEN", "MOTIONCHARACTER_VLM_API_KEY",
               "MOTIONCHARACTER_TRITON_ADMIN_KEY")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@", re.I)


def _env_secrets() -> set[str]:
    """Values of the environment's credentials: the known names and any name that reads like one."""
    # a login name is kept out of params by its key, but its value (e.g. "motioncharacter") is no
    # secret to hunt for inside other values
    names = set(_SECRET_ENV) | {k for k in os.environ if is_secret_key(k.lower())
                                and k not in ("PWD", "OLDPWD", "MLFLOW_TRACKING_USERNAME")}
    return {os.environ[k] for k in names if len(os.environ.get(k) or "") >= 6}


def redact_url_credentials(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


class TrackingError(UserError):
    """The tracking server cannot be reached, or something cannot be logged."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def check_server(uri: str | None = None, timeout: float = CHECK_TIMEOUT) -> None:
    """Fail fast with a clear error when an http(s) tracking server does not answer.

    (MLflow's own client retries for minutes before saying anything.)
    """
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            why = f"HTTP {r.status}"
    except Exception as e:  # refused, timeout, DNS, HTTP error
        why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable ({why}). Start the local one with "
        "`motioncharacter stack up`, or unset MLFLOW_TRACKING_URI to log to the embedded "
        f"{DEFAULT_DB} in the working directory")


@contextlib.contextmanager
def run(experiment: str, run_name: str | None = None, tags: dict | None = None) -> Iterator["object"]:
    """Start (and always end) an MLflow run in ``experiment``; yields the active run."""
    import mlflow

    uri = tracking_uri()
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name, tags=tags or {}) as active:
        yield active


def is_secret_key(name: str) -> bool:
    """True when a (dotted) parameter name looks like it holds a credential."""
    return any(_SECRET.search(part) for part in re.split(r"[.\-/]", name))


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2, 3]} -> {"a.b": 1, "c.0": 2, "c.1": 3}."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        name = f"{prefix}{k}"
        if hasattr(v, "__dataclass_fields__"):
            import dataclasses

            v = dataclasses.asdict(v)
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (Mapping, list, tuple)) for x in v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, name + "."))
        else:
            out[name] = v
    return out


def safe_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flattened params as strings, without anything that looks like a secret.

    Dropped: keys named like credentials, and values holding a secret of the environment; a
    password inside a URL (``s3://user:pw@host``) is masked.
    Only the key of a dropped entry is logged, never its value.
    """
    known = _env_secrets()
    out = {}
    for k, v in flatten(values, prefix).items():
        s = "" if v is None else str(v)
        if is_secret_key(k) or any(secret in s for secret in known):
            log.warning("not logging parameter %r: it looks like a secret", k)
            continue
        out[k] = redact_url_credentials(s)[:MAX_PARAM_CHARS]
    return out


def log_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Log a (nested) dict as flattened params in the active run; returns what was logged."""
    import mlflow

    params = safe_params(values, prefix)
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow's batch limit
        mlflow.log_params(dict(items[i:i + 100]))
    return params


def log_metrics(values: Mapping[str, Any], step: int | None = None, prefix: str = "") -> dict[str, float]:
    """Log the numeric leaves of a (nested) dict as metrics; returns what was logged."""
    import mlflow

    metrics = numeric(values, prefix)
    if metrics:
        mlflow.log_metrics(metrics, step=step)
    return metrics


def numeric(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) dict, flattened, as floats."""
    return {k: float(v) for k, v in flatten(values, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a local file or folder (or an s3:// object/prefix) as artifact(s) of the active run."""
    import mlflow

    from . import storage

    with storage.local_file(str(path)) as local:  # an s3:// copy only for as long as the upload takes
        if local.is_dir():
            mlflow.log_artifacts(str(local), artifact_path)
        elif local.is_file():
            mlflow.log_artifact(str(local), artifact_path)
        else:
            raise FileNotFoundError(f"cannot log {path} as an artifact: it does not exist")


# MLflow error codes that mean "the server is down or overloaded, try later" (a refused
# connection arrives as INTERNAL_ERROR); any other code is a refusal that retrying cannot fix.
TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED")
BATCH_METRICS = 1000  # MLflow's limit on metrics per log_batch


class _Unsent(Exception):
    pass


def _transient(e: Exception) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in TRANSIENT_CODES
    if isinstance(e, requests.RequestException):  # artifact uploads (HTTP artifact proxy)
        status = getattr(e.response, "status_code", None)
        return status is None or status >= 500
    return isinstance(e, (ConnectionError, TimeoutError))


class Guard:
    """Tracking calls for the active run that an unreachable server cannot stop.

    Each call is tried ``tries`` times; what could not be sent waits in memory (metric points:
    the newest ``max_points``; other calls: the newest ``max_calls``) and goes out, oldest
    first, once the server answers again: tried again on a later call (at most every
    ``retry_every`` seconds while it is down, so a hanging server costs little) and on
    ``flush(force=True)`` (checkpoints, the end). One warning per outage. A call the server
    refuses (a 4xx: a bad value, a deleted run) is dropped with a warning, not retried.
    """

    def __init__(self, run_id: str, tries: int = 2, backoff: float = 0.5, max_points: int = 10_000,
                 max_calls: int = 100, retry_every: float = 30.0, client=None):
        from mlflow.tracking import MlflowClient

        # MLflow's own client retries a refused connection 7 times with backoff (minutes per call)
        # and waits 120 s for an answer: the guard's retries are the short ones.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.run_id, self.client = run_id, client or MlflowClient()  # default: the current tracking URI
        self.tries, self.backoff, self.retry_every = tries, backoff, retry_every
        self.points: collections.deque = collections.deque(maxlen=max_points)
        self.calls: collections.deque = collections.deque(maxlen=max_calls)
        self.buffered = self.dropped = self.calls_dropped = self.outages = 0  # metric points / calls
        self.down_since: float | None = None
        self._last_try = 0.0

    def metrics(self, values: Mapping[str, Any], step: int) -> bool:
        """Log the numeric leaves of ``values`` at ``step``; True when they reached the server."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the time of the step, also when it is sent later
        new = [Metric(k, v, now, step) for k, v in numeric(values).items()]
        self.dropped += max(0, len(self.points) + len(new) - self.points.maxlen)  # the deque drops the oldest
        self.points.extend(new)
        sent = self.flush()
        if not sent:
            self.buffered += len(new)
        return sent

    def call(self, what: str, fn: Callable, *args, **kwargs) -> bool:
        """``fn(*args, **kwargs)`` (params, a tag, an artifact, the end of the run); True when done."""
        if len(self.calls) == self.calls.maxlen:
            self.calls_dropped += 1
        self.calls.append((what, functools.partial(fn, *args, **kwargs)))
        return self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what waits; True when nothing is left."""
        if not (self.points or self.calls):
            return True
        if self.down_since is not None and not force and time.monotonic() - self._last_try < self.retry_every:
            return False
        self._last_try = time.monotonic()
        try:
            while self.calls:
                what, fn = self.calls[0]
                if not self._send(what, fn):
                    self.calls_dropped += 1
                self.calls.popleft()
            while self.points:
                batch = [self.points[i] for i in range(min(BATCH_METRICS, len(self.points)))]
                if not self._send("metrics", lambda: self.client.log_batch(self.run_id, metrics=batch)):
                    self.dropped += len(batch)
                for _ in batch:
                    self.points.popleft()
        except _Unsent:
            return False
        if self.down_since is not None:
            log.warning("MLflow tracking server %s answers again after %.0f s; the buffered data was sent",
                        self.client.tracking_uri, time.monotonic() - self.down_since)
            self.down_since = None
        return True

    def _send(self, what: str, fn: Callable) -> bool:
        """True when sent, False when the server refused it; raises _Unsent when it is unreachable."""
        tries = 1 if self.down_since is not None else self.tries  # already down: one look per flush
        for attempt in range(tries):
            try:
                fn()
                return True
            except Exception as e:
                if not _transient(e):
                    log.warning("MLflow refused %s (%s); dropped", what, str(e)[:300])
                    return False
                err = e
            if attempt < tries - 1:
                time.sleep(self.backoff * 2 ** attempt)
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            log.warning("MLflow tracking server %s is unreachable (%s); training goes on and keeps up to %d "
                        "metric points in memory until it is back", self.client.tracking_uri, str(err)[:200],
                        self.points.maxlen)
        raise _Unsent from err

    def summary(self) -> str:
        """One line for the end of the job: what waited, and what never reached the server."""
        lost, calls_lost = self.dropped + len(self.points), self.calls_dropped + len(self.calls)
        return (f"MLflow tracking: {self.outages} outage(s), {self.buffered} metric points buffered, {lost} dropped, "
                f"{calls_lost} other call(s) dropped")
