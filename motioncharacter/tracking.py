"""MLflow tracking in one place.

The tracking server comes from ``MLFLOW_TRACKING_URI`` (set by ``motioncharacter stack up``
for the local stack, or by the cluster); the embedded default is a sqlite file in the
working directory, ``mlflow.db``, named by its absolute path (MLflow caches stores by URI, so a
relative ``sqlite:///mlflow.db`` would keep writing to the first working directory's file).

Stages log through ``log_params`` (flattened, secrets refused), ``log_metrics`` and
``log_artifact`` (a local file or folder, or an s3:// URI) inside ``run(...)``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from .cli import UserError

DEFAULT_DB = "mlflow.db"
CHECK_TIMEOUT = 3.0  # seconds to wait for a tracking server's /health before giving up
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
log = logging.getLogger(__name__)

# A key segment that names a credential ("secret_key", "db.password", "hf_token", "api-key",
# "aws_access_key_id"), but not "max_tokens", "tokenizer", "keyframes", "sort_key" or "author".
_SECRET = re.compile(r"secret|passw|^pwd$|credential|^auth(orization)?$|"
                     r"(^|_)(access|auth|api|bearer|session|refresh|id|hf)?_?token$|"
                     r"(private|api|access|secret|session|signing|encryption|master)_?key(_?id)?$|^key$", re.I)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
               "MLFLOW_TRACKING_TOKEN", "OPENAI_API_KEY", "HF_TOKEN", "MOTIONCHARACTER_VLM_API_KEY",
               "MOTIONCHARACTER_TRITON_ADMIN_KEY")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^/@:\s]*):(?P<password>[^/@\s]+)@", re.I)


def _env_secrets() -> set[str]:
    """Values of the environment's credentials: the known names and any name that reads like one."""
    names = set(_SECRET_ENV) | {k for k in os.environ if is_secret_key(k.lower()) and k not in ("PWD", "OLDPWD")}
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

    metrics = {k: float(v) for k, v in flatten(values, prefix).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if metrics:
        mlflow.log_metrics(metrics, step=step)
    return metrics


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a local file or folder (or an s3:// object/prefix) as artifact(s) of the active run."""
    import mlflow

    from . import storage

    local = storage.local_copy(str(path)) if storage.is_s3(path) else Path(path)
    if local.is_dir():
        mlflow.log_artifacts(str(local), artifact_path)
    elif local.is_file():
        mlflow.log_artifact(str(local), artifact_path)
    else:
        raise FileNotFoundError(f"cannot log {path} as an artifact: it does not exist")
