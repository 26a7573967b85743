"""The Triton Python-backend model behind both exported models.

Runs inside Triton's Python stub process (``triton_python_backend_utils`` only exists there).
The pipeline loads once per model instance in ``initialize``; each request is validated up front
(request_args.parse) and a bad one gets an INVALID_ARG error while the model stays ready.
The decoupled variant sends one response per denoising step (``step``/``total``), then the final
video, and stops between steps when the client cancels or the server time limit is reached.
"""
from __future__ import annotations

import json
import os
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..model.acceleration import Acceleration
from ..model import inference, precision
from .repository import resolve_weights
from .request_args import Limits, model_defaults, parse, scrub


class _Stop(Exception):
    """Generation stopped between steps: cancelled by the client or over the time limit."""

    def __init__(self, message: str, code):
        super().__init__(message)
        self.code = code


def _error(message: str, code) -> "pb_utils.TritonError":
    return pb_utils.TritonError(message, code)


def _exit_with_server(server_pid: int, every_s: float = 1.0) -> None:
    """End this stub when tritonserver (its parent) is gone, e.g. killed: nobody will read a result,
    and an orphan would hold the CPU for minutes, or spin forever sending progress to a dead
    parent. A thread, because the generation may be blocked in exactly such a send."""
    while os.getppid() == server_pid:
        time.sleep(every_s)
    os._exit(1)


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        threading.Thread(target=_exit_with_server, args=(os.getppid(),), daemon=True, name="server-watch").start()
        self.name = self.config["name"]
        params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        self.batched = self.config.get("max_batch_size", 0) > 0
        self.limits = Limits.from_parameters(params)
        from PIL import Image

        # Pillow's own bomb guard, in case any path opens an image unchecked (2x this: an error)
        Image.MAX_IMAGE_PIXELS = self.limits.max_image_pixels
        self.defaults = model_defaults(params)
        self.fps = float(params.get("fps", "8"))
        self.time_limit = float(params.get("request_timeout_s", "600"))
        # args["model_repository"] is this model's folder; relative weights live beside it.
        root = Path(args["model_repository"]).parent
        weights = resolve_weights(params.get("weights", ""), root)
        if weights and weights.startswith("s3://"):
            from motioncharacter.storage import local_copy

            weights = str(local_copy(weights))
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu"
        self.api = inference
        base = params.get("base_checkpoint") or None
        if base and base.startswith("s3://"):
            from motioncharacter.storage import local_copy

            base = str(local_copy(base))
        self.pipe = self.api.load_pipeline(weights=weights, preset=params.get("preset") or None, device=device,
                                           arcface_pack=params.get("arcface_pack") or None, base_checkpoint=base,
                                           scheduler=params.get("scheduler") or None,
                                           acceleration=Acceleration.from_params(params),
                                           dtype=params.get("dtype") or "auto")
        self.dtype = precision.running(self.pipe)  # what the UNet runs in, not what was asked
        self.defaults = {**self.pipe.defaults, **self.defaults}  # a repository written before deploy recorded them
        pb_utils.Logger.log_info(f"{self.name}: pipeline loaded on {device} in {self.dtype} "
                                 f"(weights={weights or '-'}, preset={params.get('preset') or '-'})")

    # -- helpers -------------------------------------------------------------------------------
    def _tensor(self, name: str, value: np.ndarray):
        return pb_utils.Tensor(name, value[None] if self.batched else value)

    def _outputs(self, request, frames: np.ndarray, steps: int) -> list:
        wanted = set(request.requested_output_names())
        out = [self._tensor("frames", np.ascontiguousarray(frames, dtype=np.uint8))]
        if "video" in wanted:  # encoding costs time: only when the client asked for it
            from motioncharacter.video import encode_video

            out.append(self._tensor("video", np.array([encode_video(frames, "mp4", self.fps)], dtype=np.object_)))
        if self.decoupled:
            out += self._progress_tensors(steps, steps)
        return out

    def _progress_tensors(self, step: int, total: int) -> list:
        return [self._tensor("step", np.array([step], np.int32)), self._tensor("total", np.array([total], np.int32))]

    def _run(self, request, on_step=None) -> tuple[np.ndarray, int]:
        def get(name):
            t = pb_utils.get_input_tensor_by_name(request, name)
            return None if t is None else t.as_numpy()

        kw = parse(get, self.limits, self.defaults)
        t0 = time.monotonic()

        def progress(step: int, total: int) -> None:
            if request.is_cancelled():
                raise _Stop(f"request cancelled by the client after step {step} of {total}",
                            pb_utils.TritonError.CANCELLED)
            if time.monotonic() - t0 > self.time_limit:
                raise _Stop(f"request exceeded this server's time limit of {self.time_limit:g} s "
                            f"(stopped after step {step} of {total})", pb_utils.TritonError.UNAVAILABLE)
            if on_step:
                on_step(step, total)

        frames = self.api.generate(self.pipe, progress=progress, **kw)
        return frames, kw["steps"]

    def _failure(self, e: Exception):
        if isinstance(e, _Stop):
            pb_utils.Logger.log_warn(f"{self.name}: {e}")
            return _error(str(e), e.code)
        if isinstance(e, ValueError):  # bad request, including FaceError: the client can fix it
            return _error(scrub(str(e)), pb_utils.TritonError.INVALID_ARG)
        # The text may hold s3:// URIs and local paths: only the log gets it, under an id to quote.
        error_id = uuid.uuid4().hex[:8]
        pb_utils.Logger.log_error(f"{self.name}: generation failed (error id {error_id}):\n{traceback.format_exc()}")
        return _error(f"internal error during generation (error id {error_id}: see the server log)",
                      pb_utils.TritonError.INTERNAL)

    # -- Triton entry points ---------------------------------------------------------------------
    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = []
        for request in requests:  # a dynamic batch is generated one request at a time
            try:
                frames, steps = self._run(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(request, frames, steps)))
            except Exception as e:  # noqa: BLE001 - every failure becomes this request's error
                responses.append(pb_utils.InferenceResponse(error=self._failure(e)))
        return responses

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def on_step(step: int, total: int) -> None:
            sender.send(pb_utils.InferenceResponse(output_tensors=self._progress_tensors(step, total)))

        try:
            frames, steps = self._run(request, on_step)
            sender.send(pb_utils.InferenceResponse(output_tensors=self._outputs(request, frames, steps)), flags=final)
        except Exception as e:  # noqa: BLE001
            sender.send(pb_utils.InferenceResponse(error=self._failure(e)), flags=final)

    def finalize(self):
        self.pipe = None
