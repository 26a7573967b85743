"""Call a MotionCharacter Triton endpoint over HTTP or gRPC, with timeouts and retries.

    with MotionCharacterClient("grpc://127.0.0.1:8001") as c:
        result = c.generate(image="face.png", prompt="a woman smiling", steps=30)
        for event in c.stream(image=img, prompt="..."):   # gRPC only
            ...  # Progress(step, total) per denoising step, then a Result

A client object is not thread-safe (tritonclient's HTTP client is gevent-based): make one per thread.
Only failures before the server took the request (connection refused/reset, UNAVAILABLE, queue full)
are retried; a timeout is not (the server may be generating still: a retry would start over). An
invalid request raises ``RemoteError`` (a ValueError) with the server's message at once; inputs over
the server's byte limits (its ``limit_*`` parameters) are refused before sending.
"""
from __future__ import annotations

import io
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..cli import UserError
from .repository import MODEL, STREAM_MODEL
from .request_args import INPUTS, LIST_INPUTS, Limits, check_sizes, model_defaults


class RemoteError(ValueError):
    """The server rejected the request (bad input, no face, ...): fix the request, don't retry."""


class ServerUnavailable(UserError):
    """The server could not be reached or stayed unavailable after the retries (check the URL / server)."""


class VersionMismatch(UserError):
    """The server does not serve the model version expected (a deploy it has not loaded, or a rollback)."""


@dataclass
class Progress:
    step: int
    total: int


@dataclass
class Result:
    frames: np.ndarray          # (F, H, W, 3) uint8 RGB
    video: bytes | None = None  # mp4, when requested
    version: str = ""           # the model version that answered (Triton's response says)


def _answered_version(result) -> str:
    """The model_version of an inference response (HTTP: a dict; gRPC: a protobuf message)."""
    response = result.get_response()
    return str(response.get("model_version", "") if isinstance(response, dict) else response.model_version)


# Failures before the server accepted the request: retrying is safe and may succeed.
_TRANSIENT = ("UNAVAILABLE", "503", "502", "Connection refused", "Connection reset", "failed to connect",
              "Socket closed", "connection attempt timed out", "Exceeds maximum queue size")
# gRPC's client-side deadline (timeout_s) passed: the server may be generating still.
_DEADLINE = ("DEADLINE_EXCEEDED", "Deadline Exceeded")


def _is_timeout(e: Exception) -> bool:
    """No answer within timeout_s: a socket timeout (HTTP) or an exceeded deadline (gRPC)."""
    return isinstance(e, TimeoutError) or any(t.lower() in f"{_status(e)} {e}".lower() for t in _DEADLINE)


def _status(e: Exception) -> str:
    status = getattr(e, "status", None)
    return str(status() if callable(status) else status or "")


def _is_transient(e: Exception) -> bool:
    """Worth retrying. Not a timeout: a retry would run the whole generation again (4 x 600 s)."""
    if _is_timeout(e):
        return False
    if isinstance(e, OSError):  # refused, reset, unreachable: the request never got in
        return True
    text = f"{_status(e)} {e}"
    if "time limit" in text:  # the server stopped a too-long generation: retrying would only repeat it
        return False
    return any(t.lower() in text.lower() for t in _TRANSIENT)


def _image_bytes(image) -> bytes:
    """Encoded image bytes from an RGB array, raw bytes, or a local path / s3:// URI."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        import cv2

        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an RGB uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
        ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise ValueError("could not PNG-encode the image")
        return buf.tobytes()
    if isinstance(image, (str, Path)):
        from .. import storage

        return storage.read_bytes(str(image))
    raise ValueError(f"image must be an RGB array, bytes or a path/URI, got {type(image).__name__}")


def parse_url(url: str) -> tuple[str, str]:
    """('http'|'grpc', 'host:port'); no scheme means HTTP."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "http", url.rstrip("/")
    if scheme in ("http", "grpc"):
        return scheme, rest.rstrip("/")
    raise ValueError(f"url {url!r}: use http://HOST:PORT or grpc://HOST:PORT")


class MotionCharacterClient:
    def __init__(self, url: str, *, model: str = MODEL, stream_model: str = STREAM_MODEL, timeout_s: float = 600.0,
                 connect_timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5, version: int = 0):
        self.protocol, self.address = parse_url(url)
        self.model, self.stream_model = model, stream_model
        # 0: whichever version the server serves; N: only version N (Triton refuses if it is not loaded)
        self.version = str(version) if version else ""
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self.retries, self.backoff_s = retries, backoff_s
        self._client = None
        self._batched: dict[str, bool] = {}
        self._limits: dict[str, Limits] = {}

    # -- plumbing ----------------------------------------------------------------------------------
    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as m
        else:
            import tritonclient.http as m
        return m

    def _new_client(self):
        m = self._module()
        if self.protocol == "grpc":
            return m.InferenceServerClient(self.address)
        return m.InferenceServerClient(self.address, connection_timeout=self.connect_timeout_s,
                                       network_timeout=self.timeout_s)

    @property
    def client(self):
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _retry(self, what: str, fn):
        from tritonclient.utils import InferenceServerException

        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (InferenceServerException, OSError) as e:  # ConnectionError, TimeoutError are OSErrors
                if _is_timeout(e):
                    raise ServerUnavailable(f"{what}: no answer from {self.protocol}://{self.address} within "
                                            f"{self.timeout_s:g} s (timeout_s); not retried, as the server may "
                                            "still be working on it") from None
                if not _is_transient(e):
                    raise RemoteError(f"{what}: {e.message() or e}") from None
                err = e
            if attempt < self.retries:
                time.sleep(delay)
                delay *= 2
        raise ServerUnavailable(f"{what}: server at {self.protocol}://{self.address} unavailable after "
                                f"{self.retries + 1} tries ({err})")

    def _kw(self) -> dict:
        # gRPC takes a client-side deadline per call; the HTTP client has its network_timeout.
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def ready(self) -> bool:
        """Whether the server can answer both models. Not Triton's server readiness: a version whose
        load failed stays on its record as UNAVAILABLE (and the server unready) while the previous
        version goes on serving, which is what a rollout that failed leaves behind."""
        try:
            return all(self.client.is_model_ready(m, **self._kw()) for m in (self.model, self.stream_model))
        except Exception:  # noqa: BLE001 - not ready is the answer to any failure here
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"server at {self.protocol}://{self.address} not ready after {timeout_s:g} s")
            time.sleep(0.5)

    def _is_batched(self, model: str) -> bool:
        if model not in self._batched:
            self._batched[model] = int(self._config(model).get("max_batch_size", 0)) > 0
        return self._batched[model]

    def _config(self, model: str) -> dict:
        cfg = self._retry(f"reading {model}'s config", lambda: self.client.get_model_config(
            model, self.version, **self._kw()))
        if hasattr(cfg, "config"):  # gRPC wraps a protobuf message
            from google.protobuf.json_format import MessageToDict

            return MessageToDict(cfg.config, preserving_proto_field_name=True)
        return cfg

    def _params(self, model: str) -> dict[str, str]:
        return {k: v.get("string_value", "") for k, v in self._config(model).get("parameters", {}).items()}

    def defaults(self, model: str | None = None) -> dict[str, int]:
        """The served model's native frames/height/width/steps (what a request without them gets)."""
        return model_defaults(self._params(model or self.model))

    def limits(self, model: str | None = None) -> Limits:
        """The served model's request limits (its ``limit_*`` parameters)."""
        model = model or self.model
        if model not in self._limits:
            self._limits[model] = Limits.from_parameters(self._params(model))
        return self._limits[model]

    def _inputs(self, model: str, image, prompt: str, params: dict) -> list:
        m = self._module()
        values = {"image": _image_bytes(image), "prompt": prompt,
                  **{k: v for k, v in params.items() if v is not None and not (k in LIST_INPUTS and not len(v))}}
        unknown = set(values) - set(INPUTS)
        if unknown:
            raise ValueError(f"unknown generation argument(s): {', '.join(sorted(unknown))}")
        arrays = {}
        for name, v in values.items():
            _, dtype, _, _ = INPUTS[name]
            if name in ("mix_image", "cloth_image", "pose_video", "depth_video") and not isinstance(v, bytes):
                v = _image_bytes(v) if not isinstance(v, str) or v else b""  # arrays, paths, s3:// URIs
            if name == "sparse_images":
                arrays[name] = np.array([x if isinstance(x, bytes) else _image_bytes(x) for x in v], dtype=dtype)
            elif name == "sparse_frames":
                arrays[name] = np.array([int(x) for x in v], dtype=dtype)
            else:
                arrays[name] = np.array([v.encode() if isinstance(v, str) else v], dtype=dtype)
        # The server's byte limits, checked here: an oversized request is not worth sending.
        check_sizes({k: list(a) if k in LIST_INPUTS else a[0] for k, a in arrays.items()}, self.limits(model))
        batched = self._is_batched(model)
        out = []
        for name, arr in arrays.items():
            _, dtype, _, _ = INPUTS[name]
            if batched:
                arr = arr[None]
            t = m.InferInput(name, list(arr.shape), "BYTES" if dtype is np.object_ else
                             {np.float32: "FP32", np.int32: "INT32", np.int64: "INT64"}[dtype])
            t.set_data_from_numpy(arr)
            out.append(t)
        return out

    def _outputs(self, names: list[str]) -> list:
        m = self._module()
        return [m.InferRequestedOutput(n) for n in names]

    @staticmethod
    def _unbatch(result, name: str, batched: bool):
        a = result.as_numpy(name)
        return a[0] if (a is not None and batched) else a

    # -- API ---------------------------------------------------------------------------------------
    def generate(self, image, prompt: str, *, video: bool = False, **params) -> Result:
        """One request, one response: frames (and mp4 bytes when ``video``)."""
        inputs = self._inputs(self.model, image, prompt, params)
        outputs = self._outputs(["frames", "video"] if video else ["frames"])
        res = self._retry(f"generating on {self.model}", lambda: self.client.infer(
            self.model, inputs, model_version=self.version, outputs=outputs, **self._kw()))
        batched = self._is_batched(self.model)
        vid = self._unbatch(res, "video", batched) if video else None
        return Result(frames=self._unbatch(res, "frames", batched), video=bytes(vid[0]) if vid is not None else None,
                      version=_answered_version(res))

    def stream(self, image, prompt: str, *, video: bool = True, **params) -> Iterator[Progress | Result]:
        """Yield Progress(step, total) per denoising step, then the Result (gRPC only).

        Closing the generator early (``break``) cancels the request on the server.
        """
        if self.protocol != "grpc":
            raise ValueError("streaming needs gRPC: use a grpc://HOST:PORT url")
        inputs = self._inputs(self.stream_model, image, prompt, params)
        outputs = self._outputs(["frames", "video", "step", "total"] if video else ["frames", "step", "total"])
        batched = self._is_batched(self.stream_model)
        events: queue.Queue = queue.Queue()
        c = self._new_client()  # one stream per connection
        finished = False
        try:
            self._retry("opening a stream", lambda: c.start_stream(
                callback=lambda result, error: events.put((result, error)), stream_timeout=self.timeout_s))
            c.async_stream_infer(self.stream_model, inputs, model_version=self.version, outputs=outputs,
                                 enable_empty_final_response=False)
            deadline = time.monotonic() + self.timeout_s
            while True:
                try:
                    result, error = events.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    raise ServerUnavailable(f"no response from {self.stream_model} within {self.timeout_s:g} s") from None
                if error is not None:
                    if _is_transient(error):
                        raise ServerUnavailable(f"streaming on {self.stream_model}: {error}")
                    raise RemoteError(f"streaming on {self.stream_model}: {error.message() or error}")
                frames = self._unbatch(result, "frames", batched)
                step = int(self._unbatch(result, "step", batched)[0])
                total = int(self._unbatch(result, "total", batched)[0])
                if frames is None:
                    yield Progress(step, total)
                    continue
                vid = self._unbatch(result, "video", batched) if video else None
                finished = True
                yield Result(frames=frames, video=bytes(vid[0]) if vid is not None else None,
                             version=_answered_version(result))
                return
        finally:
            # Closing the stream before the server stops keeps its shutdown from hanging; an
            # unfinished request is cancelled so the server stops generating between steps.
            c.stop_stream(cancel_requests=not finished)
            c.close()

    # -- versions (rollouts, see serving/repository.py) ----------------------------------------------
    def served_versions(self, model: str | None = None) -> list[int]:
        """The versions of ``model`` the server has loaded, from its model metadata."""
        model = model or self.model
        meta = self._retry(f"reading {model}'s metadata", lambda: self.client.get_model_metadata(model, **self._kw()))
        return sorted(int(v) for v in (meta["versions"] if isinstance(meta, dict) else meta.versions))

    def version_ready(self, version: int, model: str | None = None) -> bool:
        try:
            return bool(self.client.is_model_ready(model or self.model, str(version), **self._kw()))
        except Exception:  # noqa: BLE001 - not ready is the answer to any failure here
            return False

    def check_version(self, version: int, models: tuple[str, ...] = (MODEL, STREAM_MODEL)) -> None:
        """Raise VersionMismatch unless every model serves exactly ``version``, and it is ready."""
        served = {m: self.served_versions(m) for m in models}
        wrong = {m: v for m, v in served.items() if v != [version] or not self.version_ready(version, m)}
        if wrong:
            raise VersionMismatch(f"{self.protocol}://{self.address} serves " + ", ".join(
                f"{m} version(s) {', '.join(map(str, v)) or 'none ready'}" for m, v in wrong.items())
                + f"; expected version {version} only")

    def wait_for_version(self, version: int, models: tuple[str, ...] = (MODEL, STREAM_MODEL),
                         timeout_s: float = 300.0) -> None:
        """Until every model serves exactly ``version`` (a polling server picks a deploy up by itself)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.check_version(version, models)
            except (VersionMismatch, RemoteError, ServerUnavailable) as e:
                if time.monotonic() > deadline:
                    raise VersionMismatch(f"after {timeout_s:g} s: {e}") from None
            time.sleep(0.5)

    def switch_to(self, version: int, models: tuple[str, ...] = (MODEL, STREAM_MODEL), timeout_s: float = 600.0,
                  admin_key: str | None = None) -> None:
        """Make the server serve ``version`` of ``models``, the version their config.pbtxt now names:
        reload them under explicit model control; a polling server reloads by itself, so only wait."""
        try:
            self.load(models, admin_key)
        except RemoteError as e:
            if "polling is enabled" not in str(e):
                raise
        self.wait_for_version(version, models, timeout_s)

    def load(self, models: tuple[str, ...] = (MODEL, STREAM_MODEL), admin_key: str | None = None) -> None:
        """Have a server under explicit model control reload ``models`` from its repository: Triton
        loads and warms up the version config.pbtxt names while the old one keeps serving, then
        unloads the old one; a load that fails leaves the old one serving. Needs the admin key."""
        import os

        from .server import ADMIN_HEADER, ADMIN_KEY_ENV

        key = admin_key or os.environ.get(ADMIN_KEY_ENV)
        if not key:
            raise UserError(f"reloading models through the server needs its admin key: set {ADMIN_KEY_ENV} "
                            "to the key the server was started with")
        from tritonclient.utils import InferenceServerException

        for m in models:
            try:  # not retried: a failed load is an answer ("version 2 is at UNAVAILABLE state: ..."), not a glitch
                self.client.load_model(m, headers={ADMIN_HEADER: key}, **self._kw())
            except InferenceServerException as e:
                raise RemoteError(f"loading {m}: {e.message() or e}") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "MotionCharacterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_remote(url: str, *, image, prompt: str, negative_prompt: str = "", action: str = "",
                    intensity: float = 10.0, id_scale: float = 1.0, motion_scale: float = 1.0,
                    steps: int | None = None, guidance: float = 8.0, frames: int | None = None,
                    height: int | None = None, width: int | None = None, seed: int = 0,
                    face_index: int | None = None, progress: Callable[[int, int], None] | None = None,
                    timeout_s: float = 600.0, retries: int = 3) -> np.ndarray:
    """Same arguments and result as ``motioncharacter.model.inference.generate``, run on a Triton server.

    Over gRPC with ``progress`` the streaming model reports each step; otherwise one plain request.
    Sizes and steps left as None are the served model's own (its native size, see ``defaults``).
    """
    params = dict(negative_prompt=negative_prompt, action=action, intensity=intensity, id_scale=id_scale,
                  motion_scale=motion_scale, steps=steps, guidance=guidance, frames=frames, height=height,
                  width=width, seed=seed, face_index=-1 if face_index is None else face_index)
    with MotionCharacterClient(url, timeout_s=timeout_s, retries=retries) as c:
        if progress is not None and c.protocol == "grpc":
            for event in c.stream(image, prompt, video=False, **params):
                if isinstance(event, Progress):
                    progress(event.step, event.total)
                else:
                    return event.frames
        return c.generate(image, prompt, **params).frames
