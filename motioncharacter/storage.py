"""One way to read and write data wherever it lives: local paths or ``s3://bucket/key``.

S3 goes through the ``minio`` SDK. The endpoint and credentials come from the
environment only (never from code, configs or logs):

- ``MOTIONCHARACTER_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL`` / ``MLFLOW_S3_ENDPOINT_URL``),
  e.g. ``http://127.0.0.1:8333``
- ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``

``motioncharacter stack up`` writes these for the local stack, and the CLI loads
them when the environment does not already set them.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from .faults import TransientError

RETRIES = 3  # with BACKOFF: an unreachable endpoint fails in about a second (plus connect timeouts)
BACKOFF = 0.25
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 300.0
# S3 error codes that mean the credentials were refused, not that the object is missing.
AUTH_CODES = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken")
# S3 error codes that say "try again" (e.g. a server still starting up).
TRANSIENT_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout")


class StorageError(RuntimeError):
    """A URI that cannot be read or written, with the reason."""


class StoreUnavailable(StorageError, TransientError):
    """The object store did not answer (or kept answering "try again") through the retries."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    p = urlparse(uri)
    if p.scheme != "s3" or not p.netloc:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return p.netloc, p.path.lstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base, *parts))


def endpoint() -> str | None:
    for var in ("MOTIONCHARACTER_S3_ENDPOINT", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


@functools.lru_cache(maxsize=4)
def _client(ep: str, access: str, secret: str, region: str | None = None):
    import certifi
    import urllib3
    from minio import Minio

    u = urlparse(ep if "://" in ep else f"http://{ep}")
    # minio's default pool waits 5 min to connect and retries 5 times inside urllib3; connection
    # failures are retried by _retry instead (short, with backoff), 5xx still inside urllib3.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT), maxsize=10,
        cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=3, connect=0, read=0, backoff_factor=0.2,
                              status_forcelist=[500, 502, 503, 504], raise_on_status=False))
    return Minio(u.netloc, access_key=access, secret_key=secret, secure=u.scheme == "https",
                 region=region, http_client=http)


def client():
    """A MinIO SDK client for the configured endpoint, or a clear error saying what is missing."""
    ep = endpoint()
    if not ep:
        raise StorageError(
            "an s3:// URI was given but no object store is configured: set MOTIONCHARACTER_S3_ENDPOINT "
            "(and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or start the local one with "
            "`motioncharacter stack up`"
        )
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise StorageError(f"object store {ep} is configured but AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set")
    return _client(ep, access, secret, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))


def _retry(what: str, fn):
    """Retry connection failures and transient S3 errors with exponential backoff, then fail
    naming the endpoint."""
    import urllib3
    from minio.error import S3Error

    delay = BACKOFF
    for attempt in range(RETRIES):
        try:
            return fn()
        except S3Error as e:
            if e.code not in TRANSIENT_CODES or attempt == RETRIES - 1:
                raise
            time.sleep(delay)
            delay *= 2
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
            if attempt == RETRIES - 1:
                raise StoreUnavailable(f"{what}: object store {endpoint()} unreachable after {RETRIES} tries "
                                   f"({type(e).__name__}: {e})") from e
            time.sleep(delay)
            delay *= 2


def _s3_error(what: str, e: Exception) -> StorageError:
    """A StorageError for an S3/minio failure; refused credentials say so (never their values)."""
    from minio.error import S3Error

    if isinstance(e, S3Error):
        if e.code in AUTH_CODES:
            return StorageError(f"{what}: object store {endpoint()} refused the credentials ({e.code}): check "
                                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return (StoreUnavailable if e.code in TRANSIENT_CODES else StorageError)(f"{what}: {e.code}: {e.message}")
    from minio.error import ServerError

    if isinstance(e, ServerError):  # a 5xx without an S3 error body (a proxy, a restarting server)
        return StoreUnavailable(f"{what}: object store {endpoint()} answered {e}")
    return StorageError(f"{what}: {e}")  # ValueError (bad bucket name, ...)


def _s3_call(what: str, fn):
    from minio.error import MinioException

    try:
        return _retry(what, fn)
    except (MinioException, ValueError) as e:
        raise _s3_error(what, e) from e


def _object(uri: str) -> tuple[str, str]:
    """(bucket, key) of a URI that must name an object, not just a bucket."""
    bucket, key = parse_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"{uri!r} names a bucket or a folder, not an object")
    return bucket, key


def _atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy into a temporary sibling, then rename: a crash never leaves half a file under dst."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_known_buckets: set[tuple[str | None, str]] = set()


def ensure_bucket(bucket: str) -> None:
    if (endpoint(), bucket) in _known_buckets:  # one check per process, not one per write
        return
    c = client()
    if not _s3_call(f"checking bucket {bucket}", lambda: c.bucket_exists(bucket)):
        _s3_call(f"creating bucket {bucket}", lambda: c.make_bucket(bucket))
    _known_buckets.add((endpoint(), bucket))


def _stat(uri: str):
    """The object an s3:// URI names (minio's Object: name, size, ETag), or None."""
    from minio.error import S3Error

    bucket, key = parse_s3(uri)
    if not key or key.endswith("/"):
        return None
    c = client()
    try:
        return _retry(f"stat {uri}", lambda: c.stat_object(bucket, key))
    except S3Error as e:
        if e.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
            return None
        raise _s3_error(f"stat {uri}", e) from e
    except ValueError as e:
        raise _s3_error(f"stat {uri}", e) from e


def _is_object(uri: str) -> bool:
    return _stat(uri) is not None


def _objects(uri: str) -> list:
    """What an s3:// URI names: [the object], or every object under it as a prefix, by name."""
    obj = _stat(uri)
    if obj is not None:
        return [obj]
    bucket, prefix = parse_s3(uri)
    c = client()
    pre = prefix.rstrip("/") + "/" if prefix else ""
    objs = _s3_call(f"listing {uri}", lambda: list(c.list_objects(bucket, prefix=pre, recursive=True)))
    return sorted((o for o in objs if not o.is_dir), key=lambda o: o.object_name)


def exists(uri: str) -> bool:
    """True for an existing file/object, or a folder/prefix holding at least one."""
    if not is_s3(uri):
        return Path(uri).exists()
    from minio.error import S3Error

    if _is_object(uri):
        return True
    bucket, key = parse_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    c = client()

    def any_object():
        try:
            return next(iter(c.list_objects(bucket, prefix=prefix, recursive=True)), None) is not None
        except S3Error as e:
            if e.code == "NoSuchBucket":
                return False
            raise

    return _s3_call(f"listing {uri}", any_object)


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        p = Path(uri)
        if not p.is_file():
            raise StorageError(f"{uri} does not exist")
        return p.read_bytes()
    bucket, key = _object(uri)
    c = client()

    def get():
        r = c.get_object(bucket, key)
        try:
            return r.read()
        finally:
            r.close()
            r.release_conn()

    return _s3_call(f"reading {uri}", get)


def write_bytes(uri: str, data: bytes) -> None:
    if not is_s3(uri):
        p = Path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        # unique temporary sibling, then rename: atomic, and concurrent writers never share it
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    import io

    bucket, key = _object(uri)
    ensure_bucket(bucket)
    c = client()
    _s3_call(f"writing {uri}", lambda: c.put_object(bucket, key, io.BytesIO(data), len(data)))


def remove_tree(uri: str) -> None:
    """Delete a folder (or s3:// prefix) and everything under it."""
    if not is_s3(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    from minio.deleteobjects import DeleteObject

    bucket, _ = parse_s3(uri)
    c = client()
    names = [o.object_name for o in _objects(uri.rstrip("/") + "/")]
    errors = _s3_call(f"deleting {uri}", lambda: list(c.remove_objects(bucket, [DeleteObject(n) for n in names])))
    if errors:
        raise StorageError(f"could not delete {len(errors)} objects under {uri}: {errors[0]}")


def upload_file(local: str | Path, uri: str) -> None:
    if not Path(local).is_file():
        raise StorageError(f"cannot upload {local}: not a file")
    if not is_s3(uri):
        if Path(uri).exists() and Path(uri).samefile(local):
            return
        _atomic_copy(local, uri)
        return
    bucket, key = _object(uri)
    ensure_bucket(bucket)
    c = client()
    _s3_call(f"uploading {local} to {uri}", lambda: c.fput_object(bucket, key, str(local)))


def download_file(uri: str, local: str | Path) -> Path:
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        if not Path(uri).is_file():
            raise StorageError(f"{uri} does not exist")
        if not (local.exists() and local.samefile(uri)):
            _atomic_copy(uri, local)
        return local
    bucket, key = _object(uri)
    c = client()
    # fget_object writes a .part.minio sibling and renames it: atomic too
    _s3_call(f"downloading {uri}", lambda: c.fget_object(bucket, key, str(local)))
    return local


def list_files(uri: str) -> Iterator[str]:
    """Every file under a local folder or an s3:// prefix, as full paths/URIs, sorted."""
    if not is_s3(uri):
        p = Path(uri)
        if p.is_file():
            yield str(p)
            return
        if not p.is_dir():
            raise StorageError(f"{uri} does not exist")
        yield from (str(f) for f in sorted(p.rglob("*")) if f.is_file())
        return
    bucket = parse_s3(uri)[0]
    yield from (f"s3://{bucket}/{o.object_name}" for o in _objects(uri))


def upload_dir(local_dir: str | Path, uri: str) -> int:
    """Mirror a local folder to a URI (files only); returns the number of files copied."""
    local_dir = Path(local_dir)
    n = 0
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            upload_file(f, join(uri, f.relative_to(local_dir).as_posix()))
            n += 1
    return n


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy everything under an s3:// prefix (or local folder) into local_dir."""
    local_dir = Path(local_dir)
    base = uri.rstrip("/")
    for f in list_files(uri):
        rel = f[len(base):].lstrip("/") if is_s3(uri) else Path(f).relative_to(base).as_posix()
        download_file(f, local_dir / (rel if rel not in ("", ".") else Path(f).name))
    return local_dir


def cache_dir() -> Path:
    d = Path(os.environ.get("MOTIONCHARACTER_CACHE", Path.home() / ".cache" / "motioncharacter"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def local_file(uri: str) -> Iterator[Path]:
    """A local path for a file or folder for the duration of a ``with`` block: the path itself,
    or for s3:// a download of the caller's own, removed at the end of the block."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="mc-", dir=cache_dir()) as d:
        yield local_copy(uri, d)


def local_copy(uri: str, workdir: str | Path | None = None) -> Path:
    """A local path for a URI: the path itself, or a download of the object/prefix.

    Into ``workdir`` when given (the caller's to remove; ``local_file`` removes it for you), else
    into the shared download cache, where every process of a node and every restart finds the
    same copy (``_cached``)."""
    if not is_s3(uri):
        p = Path(uri)
        if not p.exists():
            raise StorageError(f"{uri} does not exist")
        return p
    objs = _objects(uri)
    if not objs:
        raise StorageError(f"{uri} holds no objects")
    if workdir:
        bucket, key = parse_s3(uri)
        return _download(uri, objs, Path(workdir) / bucket / key)
    return _cached(uri, objs)


def _download(uri: str, objs: list, target: Path) -> Path:
    """The listed objects of ``uri`` (one object, or a prefix's) under ``target``."""
    bucket, key = parse_s3(uri)
    if len(objs) == 1 and objs[0].object_name == key:
        return download_file(uri, target)
    base = key.rstrip("/") + "/" if key else ""
    for o in objs:
        download_file(f"s3://{bucket}/{o.object_name}", target / o.object_name[len(base):])
    return target


def _cached(uri: str, objs: list) -> Path:
    """``cache_dir()/s3/<digest>/<name>``, keyed by the URI and its objects' names, sizes and
    ETags: changed content gets a new entry, the same content is downloaded once. The first
    process to take the entry's lock downloads into a temporary sibling and renames it into
    place, so an entry is complete or absent (a crash leaves only a .partial, removed by the
    next download); the others wait on the lock and then find it."""
    import fcntl
    import hashlib

    h = hashlib.sha256(uri.encode())
    for o in objs:
        h.update(f"\0{o.object_name}\0{o.size}\0{o.etag}".encode())
    digest = h.hexdigest()[:32]
    root = cache_dir() / "s3"
    root.mkdir(exist_ok=True)
    entry = root / digest
    name = Path(parse_s3(uri)[1].rstrip("/")).name or parse_s3(uri)[0]
    with open(root / f"{digest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not entry.is_dir():
            for stale in root.glob(f".{digest}.partial-*"):  # a crashed download's leftovers
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.partial-", dir=root))
            try:
                _download(uri, objs, tmp / name)
                os.rename(tmp, entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return entry / name
