"""Serving end to end against a real tritonserver (from nvidia-pytriton) that the suite starts and stops.

export (tiny preset) -> load -> generate over HTTP and gRPC, streaming progress and cancellation,
every kind of bad request answered clearly while the server stays ready, parallel clients.
"""
from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from motioncharacter.serving.client import MotionCharacterClient, Progress, RemoteError, Result, generate_remote

from serving_fixtures import PROMPT, TINY, export_tiny, face_image, wait_for_log  # the server: conftest.py

pytestmark = pytest.mark.services


def decode_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def assert_same_video(served: np.ndarray, local: np.ndarray) -> None:
    assert served.shape == local.shape and served.dtype == np.uint8
    # Same seed, same CPU kernels: the served video is the in-process one (float noise at most).
    assert np.abs(served.astype(int) - local.astype(int)).max() <= 2


@pytest.fixture(scope="module")
def expected(tiny_pipe):
    api, pipe = tiny_pipe
    return api.generate(pipe, image=face_image(), prompt=PROMPT, **TINY)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_generate_matches_in_process(triton, expected, protocol):
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with MotionCharacterClient(url, timeout_s=120) as c:
        assert c.ready()
        r = c.generate(face_image(), PROMPT, video=True, **TINY)
    assert r.frames.shape == (TINY["frames"], TINY["height"], TINY["width"], 3)
    assert_same_video(r.frames, expected)
    decoded = decode_mp4(r.video)
    assert decoded.shape == r.frames.shape  # a real mp4 with every frame
    # Lossy (tiny random outputs are noise, H.264's worst case), but each frame's mean colour survives.
    assert np.abs(decoded.mean(axis=(1, 2)) - r.frames.mean(axis=(1, 2))).max() < 4


def test_generate_remote_has_generate_signature(triton, expected):
    steps = []
    frames = generate_remote(triton.grpc_url, image=face_image(), prompt=PROMPT, progress=lambda s, t: steps.append((s, t)),
                             timeout_s=120, **TINY)
    assert_same_video(frames, expected)
    assert steps == [(i, TINY["steps"]) for i in range(1, TINY["steps"] + 1)]
    assert_same_video(generate_remote(triton.http_url, image=face_image(), prompt=PROMPT, **TINY), expected)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_model_advertises_its_native_size(triton, protocol):
    """deploy records the tiny model's own sizes; a request without them gets those, not 512x512x16."""
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with MotionCharacterClient(url, timeout_s=120) as c:
        assert c.defaults() == {"frames": 8, "height": 64, "width": 64, "steps": 4}
    frames = generate_remote(url, image=face_image(), prompt=PROMPT, seed=7, timeout_s=120)
    assert frames.shape == (8, 64, 64, 3)


def test_cli_generate_url_uses_served_sizes(triton, tmp_path, capsys):
    from motioncharacter.cli import main

    img = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(face_image()).save(img)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--url", triton.http_url, "--image", str(img), "--prompt", PROMPT,
                 "--out", str(out)]) == 0
    assert decode_mp4(out.read_bytes()).shape == (8, 64, 64, 3)
    assert "8 frames, 64x64" in capsys.readouterr().out


def test_stream_progress_then_video(triton, expected):
    with MotionCharacterClient(triton.grpc_url, timeout_s=120) as c:
        events = list(c.stream(face_image(), PROMPT, **TINY))
    progress, final = events[:-1], events[-1]
    assert [(p.step, p.total) for p in progress] == [(i, TINY["steps"]) for i in range(1, TINY["steps"] + 1)]
    assert all(isinstance(p, Progress) for p in progress) and isinstance(final, Result)
    assert_same_video(final.frames, expected)
    assert decode_mp4(final.video).shape[0] == TINY["frames"]


def test_stream_cancellation_stops_generation(triton):
    total = 60  # the server's step limit: far more than run before the cancel lands
    with MotionCharacterClient(triton.grpc_url, timeout_s=120) as c:
        events = c.stream(face_image(), PROMPT, **{**TINY, "steps": total, "seed": 11})
        assert next(events) == Progress(1, total)
        events.close()  # cancels the request on the server
        line = wait_for_log(triton.log_file, "request cancelled by the client after step")
        stopped_at = int(line.split("after step ")[1].split(" of ")[0])
        assert 1 <= stopped_at < total
        assert c.ready()
        assert c.generate(face_image(), PROMPT, **TINY).frames.shape[0] == TINY["frames"]


def _raw_infer(url: str, inputs: dict, model: str = "motioncharacter"):
    """A request built by hand (the client would refuse to build some of these)."""
    import tritonclient.http as http

    c = http.InferenceServerClient(url.split("://")[1], connection_timeout=10, network_timeout=60)
    try:
        ins = []
        for name, (arr, dtype) in inputs.items():
            t = http.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(arr)
            ins.append(t)
        return c.infer(model, ins)
    finally:
        c.close()


def _b(*items) -> np.ndarray:
    return np.array([[x] for x in items], dtype=np.object_)


BAD = [
    ("empty image", dict(image=b""), "input 'image' is empty"),
    ("not an image", dict(image=b"\x89PNG broken"), "not a readable image"),
    ("no face", dict(image=np.full((96, 96, 3), 127, np.uint8)), "no face"),
    ("intensity NaN", dict(intensity=math.nan), "'intensity' must be a number in [0, 20], got nan"),
    ("intensity high", dict(intensity=21.0), "'intensity' must be a number in [0, 20], got 21.0"),
    ("intensity negative", dict(intensity=-0.5), "'intensity' must be a number in [0, 20]"),
    ("long prompt", dict(prompt="a" * 201), "'prompt' is 201 characters long, over this server's limit of 200"),
    ("too many frames", dict(frames=9), "'frames' is 9, over this server's limit of 8"),
    ("too tall", dict(height=256), "'height' is 256, over this server's limit of 128"),
    ("too wide", dict(width=1024), "'width' is 1024, over this server's limit of 128"),
    ("too many steps", dict(steps=61), "'steps' is 61, over this server's limit of 60"),
]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_clear_errors_and_server_stays_ready(triton, protocol):
    url = triton.http_url if protocol == "http" else triton.grpc_url
    with MotionCharacterClient(url, timeout_s=120, retries=0) as c:
        for label, change, message in BAD:
            kw = {**TINY, "image": face_image(), "prompt": PROMPT, **change}
            with pytest.raises(RemoteError) as e:
                c.generate(kw.pop("image"), kw.pop("prompt"), **kw)
            assert message in str(e.value), label
            assert c.ready(), f"server not ready after {label}"
        # The same checks guard the streaming model.
        if protocol == "grpc":
            with pytest.raises(RemoteError, match="over this server's limit of 8"):
                list(c.stream(face_image(), PROMPT, **{**TINY, "frames": 9}))
        assert c.generate(face_image(), PROMPT, **TINY).frames.shape[0] == TINY["frames"]


def test_hostile_requests_are_refused_cheaply_and_server_stays_ready(triton, tmp_path):
    """Decompression bombs, file paths, unwanted codecs and oversized inputs: refused by name."""
    import av
    from PIL import Image
    from tritonclient.utils import InferenceServerException

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")  # ~10 KB that decodes to 243 MB
    mkv = tmp_path / "pose.mkv"
    with av.open(str(mkv), "w") as out:
        s = out.add_stream("ffv1", rate=8)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        for _ in range(8):
            for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with MotionCharacterClient(triton.http_url, timeout_s=120, retries=0) as c:
        with pytest.raises(RemoteError, match=r"input 'image' .*over the 40,000,000-pixel limit"):
            c.generate(buf.getvalue(), PROMPT, **TINY)
        probes = []
        for path in ("/etc/hostname", "/no/such/file"):
            with pytest.raises(RemoteError) as e:
                c.generate(face_image(), PROMPT, pose_keypoints=path, **TINY)
            probes.append(str(e.value))
        assert probes[0] == probes[1] and "input 'pose_keypoints' must be OpenPose-style JSON text" in probes[0]
        with pytest.raises(RemoteError, match="input 'pose_video' is ffv1 video; accepted codecs: h264"):
            c.generate(face_image(), PROMPT, pose_video=mkv.read_bytes(), **TINY)
        huge = b"\0" * 20_000_001
        with pytest.raises(ValueError, match=r"input 'pose_video' is 20,000,001 bytes, over this server's limit of "
                                             r"20,000,000 \(max_video_bytes\)") as e:
            c.generate(face_image(), PROMPT, pose_video=huge, **TINY)
        assert not isinstance(e.value, RemoteError)  # the client refused it: nothing was sent
        assert c.ready()
    import cv2

    good = _b(cv2.imencode(".png", face_image()[..., ::-1])[1].tobytes())
    with pytest.raises(InferenceServerException, match=r"input 'pose_video' is 20,000,001 bytes.*max_video_bytes"):
        _raw_infer(triton.http_url, {"image": (good, "BYTES"), "prompt": (_b(b"p"), "BYTES"),
                                     "pose_video": (_b(huge), "BYTES")})  # straight to the server
    with MotionCharacterClient(triton.http_url, timeout_s=120) as c:
        assert c.ready()


def test_wrong_dtype_shape_and_missing_inputs_are_refused_by_triton(triton):
    from tritonclient.utils import InferenceServerException

    img = face_image()
    import cv2

    good = _b(cv2.imencode(".png", img[..., ::-1])[1].tobytes())
    cases = [
        ({"prompt": (_b(b"p"), "BYTES")}, "image"),                                       # missing image
        ({"image": (good, "BYTES"), "prompt": (_b(b"p"), "BYTES"),
          "intensity": (np.array([[5.0]], np.float64), "FP64")}, "FP64"),                 # wrong dtype
        ({"image": (np.concatenate([good, good], axis=1), "BYTES"),
          "prompt": (_b(b"p"), "BYTES")}, "shape"),                                     # wrong shape [1, 2]
        ({"image": (np.array([[1, 2, 3]], np.uint8), "UINT8"),
          "prompt": (_b(b"p"), "BYTES")}, "UINT8"),                                      # raw pixels, not bytes
    ]
    for inputs, needle in cases:
        with pytest.raises(InferenceServerException) as e:
            _raw_infer(triton.http_url, inputs)
        assert needle in str(e.value)
    with MotionCharacterClient(triton.http_url, timeout_s=60) as c:
        assert c.ready()


def test_parallel_clients_each_get_their_own_video(triton, tiny_pipe):
    api, pipe = tiny_pipe
    seeds = [21, 22, 23, 24]
    local = {s: api.generate(pipe, image=face_image(), prompt=PROMPT, **{**TINY, "seed": s}) for s in seeds}

    def one(i_seed):
        i, seed = i_seed
        url = triton.grpc_url if i % 2 else triton.http_url  # one client per thread, both protocols
        with MotionCharacterClient(url, timeout_s=300) as c:
            return seed, c.generate(face_image(), PROMPT, **{**TINY, "seed": seed}).frames

    # max_batch_size=2: the dynamic batcher hands the backend two queued requests at once.
    with ThreadPoolExecutor(len(seeds)) as ex:
        results = dict(ex.map(one, enumerate(seeds)))
    for s in seeds:
        assert_same_video(results[s], local[s])
    assert not np.array_equal(results[21], results[22])


def test_server_side_time_limit(tmp_path):
    """A generation over the deployment's request timeout is stopped between steps with a clear error."""
    from motioncharacter.serving.server import TritonServer

    # no warm-up: under this limit the warm-up request itself would fail and (rightly) keep the version out
    repo = export_tiny(tmp_path / "repo", request_timeout_s=1e-6, warmup=False)
    with TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None,
                      log_file=tmp_path / "triton.log") as server:
        with MotionCharacterClient(server.http_url, timeout_s=120, retries=0) as c:
            with pytest.raises(RemoteError, match="exceeded this server's time limit"):
                c.generate(face_image(), PROMPT, **TINY)
            assert c.ready()


def test_deploy_to_s3_and_triton_reads_it_directly(s3_only_stack, tmp_path, monkeypatch, expected):
    """`motioncharacter deploy` writes the repository to the object store; Triton loads it from s3://."""
    from motioncharacter import storage
    from motioncharacter.cli import main
    from motioncharacter.serving.server import TritonServer

    for k, v in s3_only_stack.env().items():
        monkeypatch.setenv(k, v)
    uri = "s3://models/triton/tiny"
    assert main(["deploy", "--preset", "tiny", "--model-repository", uri, "--max-frames", "8",
                 "--max-resolution", "128"]) == 0
    keys = {f[len(uri) + 1:] for f in storage.list_files(uri)}
    assert {k for k in keys if "/warmup/" not in k} == {  # warmup inputs: tests/test_rollout.py
        "motioncharacter/config.pbtxt", "motioncharacter/1/model.py", "motioncharacter/1/deployed.pbtxt",
        "motioncharacter_stream/config.pbtxt", "motioncharacter_stream/1/model.py",
        "motioncharacter_stream/1/deployed.pbtxt"}
    with TritonServer(uri, http_port=None, grpc_port=None, metrics_port=None, log_file=tmp_path / "triton.log") as server:
        assert "--model-repository=s3://127.0.0.1:" in " ".join(server.command())  # Triton's host:port spelling
        with MotionCharacterClient(server.http_url, timeout_s=120) as c:
            assert_same_video(c.generate(face_image(), PROMPT, **TINY).frames, expected)


def test_generate_cli_url_goes_through_triton(triton, tmp_path, expected):
    """`motioncharacter generate --url` writes the same video as the in-process call."""
    from PIL import Image

    from motioncharacter.cli import main
    from motioncharacter.video import open_video, read_frames, write_video

    face = tmp_path / "face.png"
    Image.fromarray(face_image()).save(face)
    out = tmp_path / "remote.mp4"
    args = ["generate", "--url", triton.http_url, "--image", str(face), "--prompt", PROMPT, "--out", str(out),
            "--steps", "3", "--frames", "8", "--height", "64", "--width", "64", "--seed", "7",
            "--intensity", "8", "--action", "smiles"]
    assert main(args) == 0
    ref = tmp_path / "in_process.mp4"
    write_video(expected, ref, fps=8.0)  # the same encoder, so equal frames decode equal
    a, b = open_video(out), open_video(ref)
    assert len(a) == len(b) == expected.shape[0]
    idx = list(range(len(a)))
    assert abs(read_frames(a, idx).astype(int) - read_frames(b, idx).astype(int)).mean() < 1.0
    assert main(args + ["--base-checkpoint", str(face)]) == 1  # a deploy-time option
    # ID-Animator mode goes to the server too (no action: that mode has no motion control)
    assert main(args[:-2] + ["--mode", "id-animator", "--out", str(tmp_path / "ida.mp4")]) == 0
    assert len(open_video(tmp_path / "ida.mp4")) == 8


def test_pipeline_smoke_step_with_feature_modes(triton, tmp_path):
    """The pipeline's last step calls the endpoint, with ID-Animator / DreaMoving options too."""
    from motioncharacter.pipelines.steps import smoke_step
    from motioncharacter.video import open_video

    for name, options in (("plain", {}), ("id-animator", {"mode": "id-animator"}),
                          ("dreamoving", {"mode": "dreamoving", "face_weight": 0.5})):
        out = smoke_step("", triton.http_url, str(tmp_path / name), PROMPT, "smiles", 8.0, options)
        assert len(open_video(out)) == 8


def test_sparsectrl_keyframes_on_a_community_base_through_triton(tmp_path):
    """Deploy-time community base (single-file .safetensors) and request-time SparseCtrl keyframes:
    Triton returns what the in-process feature pipeline makes from the same inputs."""
    import os
    import sys

    from safetensors.torch import save_file

    from motioncharacter.model import inference
    from motioncharacter.model.presets import build_tiny
    from motioncharacter.serving.server import TritonServer

    sys.path.insert(0, os.path.dirname(__file__))
    from features_ldm import text_to_ldm, unet_to_ldm

    other = build_tiny(seed=5)
    ckpt = tmp_path / "community.safetensors"
    save_file({k: v.contiguous() for k, v in (unet_to_ldm(other["unet"].state_dict(), layers_per_block=1)
                                              | text_to_ldm(other["text_encoder"].state_dict())).items()}, str(ckpt))
    repo = export_tiny(tmp_path / "repo", base_checkpoint=str(ckpt))
    assert f'string_value: "{ckpt}"' in (repo / "motioncharacter" / "config.pbtxt").read_text()
    assert 'name: "sparse_images" data_type: TYPE_STRING dims: [ -1 ]' in (
        repo / "motioncharacter" / "config.pbtxt").read_text()
    key = face_image()
    req = dict(TINY, sparse_images=[key, key[:, ::-1]], sparse_frames=[0, 7], sparse_scale=0.8)
    pipe = inference.load_pipeline(preset="tiny", base_checkpoint=str(ckpt))
    expected = inference.generate(pipe, image=face_image(), prompt=PROMPT, **req)
    with TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None,
                      log_file=tmp_path / "triton.log") as server:
        with MotionCharacterClient(server.http_url, timeout_s=300) as c:
            got = c.generate(face_image(), PROMPT, **req).frames
            # the keyframes reach the served model: the same request on other frames is another video
            moved = c.generate(face_image(), PROMPT, **dict(req, sparse_frames=[0, 3])).frames
            with pytest.raises(RemoteError, match="one frame index per keyframe"):
                c.generate(face_image(), PROMPT, **dict(req, sparse_frames=[0]))
            assert c.ready()
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(got, moved), "keyframes ignored by the served model"
