"""A hostile client cannot make the server read its files, exhaust its memory or learn its paths.

Request parsing, the header checks, the backend's error replies and the client's retry and size
rules, all without a server (tests/test_serving.py sends some of these to a real one).
"""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import tracemalloc
import types

import cv2
import numpy as np
import pytest
from PIL import Image

from serving_fixtures import request  # the serving tests' one request getter

from motioncharacter.serving.request_args import Limits, check_sizes, decode_image, parse, scrub
from motioncharacter.video import VideoError, check_image_header, check_video_header, load_image

LIMITS = Limits(max_frames=8, max_resolution=128, max_steps=10)
IMAGE = cv2.imencode(".png", np.full((16, 24, 3), 90, np.uint8))[1].tobytes()




def base(**values):
    return request(image=IMAGE, prompt="a person", frames=8, height=64, width=64, steps=2, **values)


def refusal(get, limits=LIMITS) -> str:
    with pytest.raises(ValueError) as e:
        parse(get, limits)
    return str(e.value)


def video(path, frames=8, size=(64, 48), codec="libx264", fps=8, pix="yuv420p", streams=1) -> bytes:
    """A small real video written with PyAV; the bytes."""
    import av

    w, h = size
    with av.open(str(path), "w") as out:
        ss = []
        for _ in range(streams):
            s = out.add_stream(codec, rate=fps)
            s.width, s.height, s.pix_fmt = w, h, pix
            ss.append(s)
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 10 + 20 * i, np.uint8), format="rgb24")
            for s in ss:
                for p in s.encode(f):
                    out.mux(p)
        for s in ss:
            for p in s.encode():
                out.mux(p)
    return path.read_bytes()


# ---- 1. decompression bombs ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 9000x9000 black PNG: about 10 KB on the wire, 243 MB once decoded to RGB."""
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")
    return buf.getvalue()


def peak_mb(fn) -> tuple[float, Exception]:
    """Peak traced memory (MB) while ``fn`` runs, and the exception it raised."""
    tracemalloc.start()
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        err = e
    else:
        raise AssertionError("not refused")
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return peak, err


@pytest.mark.parametrize("name", ["image", "mix_image", "cloth_image"])
def test_image_bomb_is_refused_from_its_header(bomb, name):
    assert len(bomb) < 20_000
    get = base(**{name: bomb}) if name != "image" else request(image=bomb, prompt="a")
    peak, err = peak_mb(lambda: parse(get, LIMITS))
    assert isinstance(err, ValueError)
    assert f"input '{name}' is 9000x9000 (PNG), over the 40,000,000-pixel limit" in str(err)
    assert peak < 20, f"{peak:.0f} MB allocated to refuse it"


def test_local_image_bomb_is_refused_from_its_header(bomb, tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(bomb)
    peak, err = peak_mb(lambda: load_image(p))
    assert f"image {p} is 9000x9000 (PNG), over the 40,000,000-pixel limit" in str(err)
    assert peak < 20, f"{peak:.0f} MB allocated to refuse it"


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` grey pixels with almost no pixel data (crafted, 60 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_pillow_guard_and_formats():
    # beyond Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS) the message still names input and limit
    with pytest.raises(ValueError, match=r"input 'image' declares over [\d,]+ pixels, over the 1,000-pixel limit"):
        check_image_header(png_header(60_000, 60_000), "input 'image'", 1000)
    assert check_image_header(png_header(40, 25), "x", 1000) == (40, 25)
    for fmt in ("GIF", "TIFF", "PPM"):  # decodable by Pillow, but not an accepted format
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, fmt)
        with pytest.raises(ValueError, match=r"input 'cloth_image' is not a readable image \(expected PNG, JPEG"):
            decode_image(buf.getvalue(), 10_000, 10_000, "cloth_image")
    for fmt in ("PNG", "JPEG", "WEBP", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, fmt)
        assert decode_image(buf.getvalue(), 10_000, 10_000).shape == (8, 8, 3)


def test_keyframe_images_are_checked_each_and_named(bomb):
    msg = refusal(base(sparse_images=[IMAGE, bomb], sparse_frames=[0, 7]))
    assert "input 'sparse_images[1]' is 9000x9000 (PNG), over the 40,000,000-pixel limit" in msg


# ---- 2. no server-side file reads ---------------------------------------------------------------
def test_pose_keypoints_never_name_a_path(tmp_path):
    from motioncharacter.model import control as ctl

    good = tmp_path / "pose.json"
    good.write_text(json.dumps([[[[0.5, 0.5]] * 18]] * 8))  # valid keypoints: reading it would succeed
    messages = {refusal(base(pose_keypoints=p)) for p in ("/etc/hostname", "/no/such/file", str(good), "x")}
    assert messages == {"input 'pose_keypoints' must be OpenPose-style JSON text"}
    # the model code reads no path either unless told to (the CLI, for the user's own file)
    errors = set()
    for p in ("/etc/hostname", "/no/such/file", str(good)):
        with pytest.raises(ValueError) as e:
            ctl.parse_keypoints(p)
        errors.add(str(e.value))
    assert len(errors) == 1 and "not valid JSON" in errors.pop()
    assert len(ctl.parse_keypoints(str(good), allow_path=True)) == 8
    with pytest.raises(ValueError, match="nested too deeply"):
        ctl.parse_keypoints("[" * 100_000)
    assert parse(base(pose_keypoints=good.read_text()), LIMITS)["pose_keypoints"] == good.read_text()


# ---- 3. untrusted video -------------------------------------------------------------------------
def test_control_videos_are_checked_from_their_header(tmp_path):
    small = Limits(max_frames=8, max_resolution=128, max_steps=10, max_image_pixels=64 * 48, max_video_seconds=3)
    ok = video(tmp_path / "ok.mp4")
    assert parse(base(pose_video=ok), small)["pose_video"] == ok
    cases = [
        (video(tmp_path / "big.mp4", size=(66, 48)), "input 'pose_video' is 66x48 per frame, over the 3,072-pixel limit"),
        (video(tmp_path / "long.mp4", frames=33), "input 'pose_video' has 33 frames, over the limit of 32"),
        (video(tmp_path / "slow.mp4", frames=8, fps=2), "input 'pose_video' lasts 4.0 s, over the limit of 3 s"),
        (video(tmp_path / "a.mkv", codec="ffv1"), "input 'pose_video' is ffv1 video; accepted codecs: h264, hevc"),
        (video(tmp_path / "b.avi", codec="rawvideo", pix="rgb24"), "input 'pose_video' is rawvideo video"),
        (video(tmp_path / "two.mkv", streams=2), "input 'pose_video' has 2 video streams; send exactly one"),
        (b"\x00\x00\x00\x18ftypmp42 not really a video", "input 'pose_video' is not a decodable video"),
    ]
    for data, message in cases:
        assert message in refusal(base(pose_video=data), small)
        assert message.replace("pose_video", "depth_video") in refusal(base(depth_video=data), small)


def test_webm_length_comes_from_its_duration(tmp_path):
    data = video(tmp_path / "a.webm", frames=40, codec="libvpx-vp9")  # WebM headers hold no frame count
    with pytest.raises(VideoError, match="pose video has 40 frames, over the limit of 32"):
        check_video_header(data, "pose video", max_frames=32)


def test_header_check_decodes_no_frame(tmp_path):
    """ffmpeg's stream probe decodes frames unless told not to: a 4096x4096 video would cost ~40 MB
    (an 8192x8192 one 160 MB) before its size is even read. Measured in a fresh process."""
    path = tmp_path / "big.mp4"
    video(path, frames=2, size=(4096, 4096), codec="libx264")
    # VmHWM, the peak RSS of this process image (ru_maxrss would carry the forking parent's peak)
    code = ("import sys, av\nfrom motioncharacter.video import check_video_header, VideoError\n"
            "def peak():\n    s = open('/proc/self/status').read()\n"
            "    return int(s.split('VmHWM:')[1].split()[0]) / 1024\n"
            "before = peak()\n"
            "try:\n    check_video_header(sys.argv[1], 'v', max_frames=8, max_pixels=1000)\n"
            "except VideoError as e:\n    print(e)\n"
            "print(peak() - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    message, grew = out.strip().splitlines()
    assert message == "v is 4096x4096 per frame, over the 1,000-pixel limit"
    assert float(grew) < 20, f"peak memory grew {grew} MB"


def test_control_video_is_decoded_at_the_output_size(tmp_path):
    from motioncharacter.model import control as ctl

    data = video(tmp_path / "pose.mp4", frames=8, size=(96, 64))
    maps = ctl.load_maps(data, 8, 32, 48, "pose video")
    assert maps.shape == (8, 32, 48, 3) and maps.dtype == np.uint8
    assert abs(float(maps[3].mean()) - 70) < 6  # frame 3 is grey 70
    with pytest.raises(ValueError, match="pose video has 8 frames but 9 frames are requested"):
        ctl.load_maps(data, 9, 32, 48, "pose video")
    with pytest.raises(ValueError, match="pose video has more than 4 frames but 4 frames are requested"):
        ctl.load_maps(data, 4, 32, 48, "pose video")
    with pytest.raises(ValueError, match="pose video has 8 frames, over the limit of 4"):
        ctl.load_maps(data, 1, 32, 48, "pose video")  # refused from the header: nothing decoded
    path = tmp_path / "pose.mkv"
    video(path, frames=8, codec="ffv1")
    with pytest.raises(ValueError, match="pose video is ffv1 video"):
        ctl.load_maps(str(path), 8, 32, 48, "pose video")


# ---- 4. request byte caps -----------------------------------------------------------------------
def test_byte_caps_per_input_and_in_total():
    small = Limits(max_image_bytes=1000, max_video_bytes=2000, max_request_bytes=3000)
    assert ("input 'image' is 1,001 bytes, over this server's limit of 1,000 (max_image_bytes)"
            in refusal(request(image=b"x" * 1001, prompt="a"), small))
    assert ("input 'depth_video' is 2,001 bytes, over this server's limit of 2,000 (max_video_bytes)"
            in refusal(base(depth_video=b"x" * 2001), small))
    assert ("input 'pose_keypoints' is 2,001 bytes" in refusal(base(pose_keypoints="[" + " " * 2000), small))
    assert "input 'sparse_images[1]' is 1,001 bytes" in refusal(
        base(sparse_images=[IMAGE, b"x" * 1001], sparse_frames=[0, 1]), small)
    # each under its own cap, together over the request's: refused before anything is decoded
    msg = refusal(request(image=b"not an image", prompt="a", pose_video=b"x" * 1999, depth_video=b"x" * 1999), small)
    assert "the request's inputs are" in msg and "over this server's limit of 3,000 (max_request_bytes)" in msg
    check_sizes({"image": b"x" * 1000, "prompt": "a", "steps": 2}, small)  # at the limits: fine


def test_new_limits_reach_config_pbtxt_and_the_client(tmp_path):
    from motioncharacter.serving.client import MotionCharacterClient
    from motioncharacter.serving.repository import DeployOptions, export_repository

    limits = Limits(max_video_bytes=1234, max_request_bytes=5678, max_video_seconds=9)
    export_repository(str(tmp_path / "repo"), DeployOptions(preset="tiny", limits=limits))
    cfg = (tmp_path / "repo" / "motioncharacter" / "config.pbtxt").read_text()
    for key, value in (("limit_max_video_bytes", 1234), ("limit_max_request_bytes", 5678),
                       ("limit_max_video_seconds", 9)):
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in cfg
    c = MotionCharacterClient("http://127.0.0.1:1")
    c._config = lambda model: {"parameters": {k: {"string_value": v} for k, v in limits.as_parameters().items()}}
    assert c.limits() == limits


def test_client_refuses_oversized_inputs_before_sending():
    from motioncharacter.serving.client import MotionCharacterClient

    sent = []
    c = MotionCharacterClient("http://127.0.0.1:1", retries=0)
    c._limits[c.model] = Limits(max_video_bytes=100, max_request_bytes=1000)
    c._batched[c.model] = True
    c._client = types.SimpleNamespace(infer=lambda *a, **k: sent.append(a))
    with pytest.raises(ValueError, match=r"input 'pose_video' is 101 bytes, over this server's limit of 100 "
                                         r"\(max_video_bytes\)"):
        c.generate(IMAGE, "a", pose_video=b"x" * 101)
    c._limits[c.model] = Limits(max_video_bytes=100, max_request_bytes=250)
    with pytest.raises(ValueError, match=r"the request's inputs are [\d,]+ bytes together, over this server's "
                                         r"limit of 250 \(max_request_bytes\)"):
        c.generate(IMAGE, "a", pose_video=b"x" * 100, depth_video=b"x" * 100)
    assert not sent


# ---- 5. no internal paths or URIs in replies ----------------------------------------------------
@pytest.mark.parametrize("message, expected", [
    ("no such file: /srv/models/unet/diffusion_pytorch_model.safetensors",
     "no such file: <path>"),
    ("cannot read s3://models/base/unet/config.json (403)", "cannot read <uri> (403)"),
    ("'/home/ops/.cache/x.bin' and ~/weights/a and file:///etc/passwd", "'<path>' and <path> and <uri>"),
    ("input 'image' is not a readable image (expected PNG, JPEG, WebP or BMP)",
     "input 'image' is not a readable image (expected PNG, JPEG, WebP or BMP)"),
    ("time base 1/16384, shape (F, H, W, 3), intensity in [0, 20], jpg/png",
     "time base 1/16384, shape (F, H, W, 3), intensity in [0, 20], jpg/png"),
])
def test_scrub_removes_paths_and_uris(message, expected):
    assert scrub(message) == expected


@pytest.fixture
def backend(monkeypatch):
    """serving.backend imported against a stand-in for Triton's triton_python_backend_utils."""
    logged = []

    class TritonError:
        INVALID_ARG, INTERNAL, CANCELLED, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "CANCELLED", "UNAVAILABLE"

        def __init__(self, message, code):
            self.message, self.code = message, code

    pb = types.SimpleNamespace(TritonError=TritonError, Logger=types.SimpleNamespace(
        log_error=logged.append, log_warn=logged.append, log_info=logged.append))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    monkeypatch.delitem(sys.modules, "motioncharacter.serving.backend", raising=False)
    from motioncharacter.serving import backend as module

    model = module.TritonPythonModel()
    model.name = "motioncharacter"
    yield model, logged
    sys.modules.pop("motioncharacter.serving.backend", None)


def test_internal_errors_reach_the_client_as_an_id_only(backend):
    model, logged = backend
    try:
        raise OSError("could not copy s3://models/base/unet to /var/cache/mc/unet: disk full")
    except OSError as e:
        err = model._failure(e)
    assert err.code == "INTERNAL"
    assert "s3://" not in err.message and "/var/cache" not in err.message and "disk full" not in err.message
    error_id = err.message.split("error id ")[1][:8]
    assert len(error_id) == 8 and int(error_id, 16) >= 0
    assert f"error id {error_id}" in logged[-1] and "s3://models/base/unet" in logged[-1]  # the log has it all
    assert "Traceback" in logged[-1]
    bad = model._failure(ValueError("input 'image': cannot open /tmp/triton_xyz/in.png"))
    assert bad.code == "INVALID_ARG" and bad.message == "input 'image': cannot open <path>"


# ---- 6. client retries --------------------------------------------------------------------------
def test_only_failures_before_acceptance_are_transient():
    from tritonclient.utils import InferenceServerException as E

    from motioncharacter.serving.client import _is_transient

    retried = [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        E("failed to connect to all addresses; last error: Connection refused", status="StatusCode.UNAVAILABLE"),
        E("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE"),
        E("Service Unavailable", status="503"),
    ]
    not_retried = [
        socket.timeout("timed out"),                                   # HTTP: no answer within timeout_s
        TimeoutError("timed out"),
        E("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"),  # gRPC client-side deadline
        E("Gateway Timeout", status="504"),                             # a proxy gave up waiting
        E("request exceeded this server's time limit of 600 s", status="StatusCode.UNAVAILABLE"),
        E("input 'frames' is 9, over this server's limit of 8", status="StatusCode.INVALID_ARGUMENT"),
        E("internal error during generation (error id 1a2b3c4d: see the server log)", status="StatusCode.INTERNAL"),
    ]
    assert [_is_transient(e) for e in retried] == [True] * len(retried)
    assert [_is_transient(e) for e in not_retried] == [False] * len(not_retried)


def test_a_timed_out_call_is_not_repeated():
    """A server that takes the connection and never answers: one attempt, not retries + 1."""
    from motioncharacter.serving.client import MotionCharacterClient, ServerUnavailable

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        with MotionCharacterClient(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=1, retries=3,
                                   backoff_s=0.01) as c:
            c._limits[c.model], c._batched[c.model] = Limits(), True  # straight to the generation call
            with pytest.raises(ServerUnavailable, match="within 1 s .*not retried"):
                c.generate(IMAGE, "a")
        assert len(accepted) == 1
    finally:
        srv.close()
        for conn in accepted:
            conn.close()


@pytest.mark.parametrize("bad", ["[5]", '[["a"]]', '[{"people": 3}]'])
def test_malformed_keypoint_structures_are_bad_requests(bad):
    from motioncharacter.model.control import parse_keypoints

    with pytest.raises(ValueError, match="pose keypoints frame 0"):
        parse_keypoints(bad)
