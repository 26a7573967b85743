"""Half precision end to end (model/precision.py): bf16 on this CPU through generate's Python API, the
CLI and a served Triton model, fp16 refused on a CPU, the dtype recorded by deploy and loaded by the
backend, and the trainer's bf16 mode against fp32.

Tolerances, measured on the tiny preset (random weights: its frames are coloured noise, a hard case
for a lossy precision) and stated once here: bf16 frames differ from fp32's by at most MAX_MEAN_DIFF
grey levels on average (uint8), and are never identical to them (that would mean fp32 ran)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from serving_fixtures import PROMPT, TINY, face_image, wait_for_log

MAX_MEAN_DIFF = 3.0  # mean |bf16 - fp32| over all pixels of the video, grey levels (measured: 1.07, max 10)


def _video(pipe, **kw):
    from motioncharacter.model.inference import generate

    return generate(pipe, image=face_image(), prompt=PROMPT, **{**TINY, **kw})


@pytest.fixture(scope="module")
def pipes():
    from motioncharacter.model.inference import load_pipeline

    return {d: load_pipeline(preset="tiny", dtype=d) for d in ("fp32", "bf16")}


@pytest.fixture(scope="module")
def videos(pipes):
    return {d: _video(p) for d, p in pipes.items()}


def _differs_but_close(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int)).mean()
    assert 0 < diff <= MAX_MEAN_DIFF, diff  # 0: the same precision ran
    return diff


# ---- the choice ------------------------------------------------------------------------------
def test_resolve_auto_per_device_and_refuse_fp16_on_cpu():
    from motioncharacter.model import precision

    assert precision.resolve("auto", "cpu") == torch.float32
    assert precision.resolve(None, "cpu") == torch.float32
    assert precision.resolve("auto", "cuda:0") == torch.float16
    assert precision.resolve("bf16", "cpu") == torch.bfloat16
    assert precision.resolve("fp16", "cuda") == torch.float16
    with pytest.raises(ValueError, match="fp16 needs an accelerator.*bf16"):
        precision.resolve("fp16", "cpu")
    with pytest.raises(ValueError, match="auto, fp32, fp16, bf16.*'half'"):
        precision.resolve("half", "cpu")


def test_fp16_on_cpu_is_refused_by_load_generate_and_deploy(tmp_path, capsys):
    from motioncharacter.cli import main
    from motioncharacter.model.inference import load_pipeline

    with pytest.raises(ValueError, match="fp16 needs an accelerator"):
        load_pipeline(preset="tiny", dtype="fp16")
    out = tmp_path / "v.mp4"
    assert main(["generate", "--preset", "tiny", "--dtype", "fp16", "--image", _face_file(tmp_path),
                 "--prompt", PROMPT, "--out", str(out)]) == 1
    assert "--dtype fp16: dtype fp16 needs an accelerator" in capsys.readouterr().err and not out.exists()
    repo = tmp_path / "repo"
    assert main(["deploy", "--preset", "tiny", "--dtype", "fp16", "--model-repository", str(repo)]) == 1
    assert "--dtype fp16 needs GPU instances (--kind gpu)" in capsys.readouterr().err
    assert not (repo / "motioncharacter" / "config.pbtxt").exists()


def _face_file(tmp_path) -> str:
    from PIL import Image

    p = tmp_path / "face.png"
    Image.fromarray(face_image()).save(p)
    return str(p)


# ---- where each part runs ----------------------------------------------------------------------
def test_bf16_pipeline_runs_in_bf16_with_fp32_scheduler_and_face_embeddings(pipes, videos):
    from motioncharacter.model import precision

    pipe, ref = pipes["bf16"], pipes["fp32"]
    assert precision.running(pipe) == "bf16" and precision.running(ref) == "fp32"
    for name in ("unet", "adapter", "text_encoder", "image_encoder", "vae"):  # bf16 has fp32's range: no upcast
        assert getattr(pipe, name).dtype == torch.bfloat16, name
    seen = {"unet": set(), "step": set()}
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen["unet"].add(kw["sample"].dtype if "sample" in kw
                                                                                  else a[0].dtype), with_kwargs=True)
    step = pipe.scheduler.step

    def recording_step(model_output, t, sample, **kw):
        seen["step"].update({model_output.dtype, sample.dtype})
        return step(model_output, t, sample, **kw)

    pipe.scheduler.step = recording_step
    try:
        latents = pipe(
            image=face_image(), prompt=PROMPT, num_inference_steps=TINY["steps"], num_frames=TINY["frames"],
            height=TINY["height"], width=TINY["width"], seed=TINY["seed"], output_type="latent", return_dict=False)
    finally:
        hook.remove()
        del pipe.scheduler.step
    assert seen == {"unet": {torch.bfloat16}, "step": {torch.float32}}
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    # the face embedder works on uint8 pixels in fp32 whatever the pipeline runs in
    emb = pipe.reference(face_image()).face_embedding
    assert emb.dtype == np.float32 and np.array_equal(emb, ref.reference(face_image()).face_embedding)


def test_bf16_video_through_generate_is_close_to_fp32(videos):
    assert videos["bf16"].shape == (TINY["frames"], TINY["height"], TINY["width"], 3)
    _differs_but_close(videos["bf16"], videos["fp32"])


def test_vae_upcast_is_on_for_fp16_only():
    """fp16's range ends at 65504, which the SD VAE decoder's activations pass: it decodes in fp32."""
    from motioncharacter.model import precision
    from motioncharacter.model.inference import load_pipeline

    pipe = load_pipeline(preset="tiny")
    precision.apply(pipe, torch.float16)  # the casting alone (fp16 generation itself needs a GPU)
    assert pipe.unet.dtype == torch.float16 and pipe.adapter.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32 and pipe.vae_upcast
    latents = torch.randn(1, 4, 2, 8, 8, dtype=torch.float16)
    assert pipe.decode_latents(latents).dtype == torch.float32
    precision.apply(pipe, torch.float16, vae_upcast=False)
    assert pipe.vae.dtype == torch.float16 and not pipe.vae_upcast
    precision.apply(pipe, torch.bfloat16)
    assert pipe.vae.dtype == torch.bfloat16 and not pipe.vae_upcast


def test_features_loaded_later_follow_the_pipeline_dtype(pipes):
    """The face adapter (ID-Animator) and the Content Guider (DreaMoving) load on first use, in the
    pipeline's dtype (ControlNets share that loader: model/features.py)."""
    pipe = pipes["bf16"]
    for mode, part in (("id-animator", "face_adapter"), ("dreamoving", "content_guider")):
        frames = _video(pipe, mode=mode, steps=2, action="")
        assert frames.shape[0] == TINY["frames"] and frames.std() > 0, mode
        assert pipe.feature_parts[part].dtype == torch.bfloat16, mode


# ---- the CLI -----------------------------------------------------------------------------------
def test_cli_generate_dtype_bf16(videos, tmp_path, capsys):
    from motioncharacter.cli import main
    from motioncharacter.video import open_video, read_frames

    out = tmp_path / "v.mp4"
    args = ["generate", "--preset", "tiny", "--image", _face_file(tmp_path), "--prompt", PROMPT, "--out", str(out),
            "--action", TINY["action"], "--intensity", str(TINY["intensity"]), "--seed", str(TINY["seed"]),
            "--steps", str(TINY["steps"]), "--frames", str(TINY["frames"]), "--guidance", "8"]
    assert main([*args, "--dtype", "bf16"]) == 0
    assert "face embedder: sface, bf16)" in capsys.readouterr().out  # what the CLI's pipeline ran in
    vr = open_video(str(out))
    frames = read_frames(vr, list(range(len(vr))))
    assert frames.shape == videos["bf16"].shape
    # mp4 is lossy on noise-like frames: each frame's mean colour is the in-process bf16 video's
    mean = lambda v: v.astype(float).mean(axis=(1, 2))  # noqa: E731
    assert np.abs(mean(frames) - mean(videos["bf16"])).max() < 4


# ---- evaluation --------------------------------------------------------------------------------
def test_evaluate_set_generation_dtype(tmp_path, capsys):
    import json

    from PIL import Image

    from motioncharacter.cli import main

    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(face_image()).save(faces / "astronaut.png")
    args = ["evaluate", "--preset", "tiny", "--eval-set", str(faces), "--limit", "1", "--no-track", "--no-progress",
            "--set", "generation.frames=4", "--set", "generation.steps=1", "--set", "generation.guidance=1.0"]
    assert main([*args, "--output", str(tmp_path / "bad"), "--set", "generation.dtype=half"]) == 1
    assert "generation.dtype must be one of auto, fp32, fp16, bf16, got 'half'" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "out"), "--set", "generation.dtype=bf16"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dtype"] == "bf16" and summary["videos"] == 1


# ---- a served model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory):
    """One tritonserver for this module, serving the repository `deploy --dtype bf16` writes (the suite's
    shared server serves fp32, which the other serving tests compare against)."""
    from motioncharacter.cli import main
    from motioncharacter.serving.server import TritonServer

    root = tmp_path_factory.mktemp("triton-bf16")
    repo = root / "repo"
    assert main(["deploy", "--preset", "tiny", "--dtype", "bf16", "--model-repository", str(repo),
                 "--max-resolution", "128"]) == 0
    server = TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None, log_file=root / "triton.log")
    server.start(timeout_s=600)  # two Python stubs import torch and build the pipeline: minutes on a busy CPU
    yield repo, server
    server.stop()  # a clean exit is the suite's shared server's test (tests/serving_fixtures.py)


@pytest.mark.services
def test_deploy_dtype_is_in_the_config_and_the_backend_runs_it(bf16_server):
    repo, server = bf16_server
    for model in ("motioncharacter", "motioncharacter_stream"):
        assert 'parameters: { key: "dtype" value: { string_value: "bf16" } }' in \
            (repo / model / "config.pbtxt").read_text()
        line = wait_for_log(server.log_file, f"{model}: pipeline loaded on cpu in ")
        assert f"{model}: pipeline loaded on cpu in bf16 " in line, line


@pytest.mark.services
def test_served_bf16_video_is_the_in_process_bf16_video(bf16_server, videos):
    from motioncharacter.serving.client import MotionCharacterClient

    _, server = bf16_server
    with MotionCharacterClient(server.http_url, timeout_s=120) as c:
        frames = c.generate(face_image(), PROMPT, **TINY).frames
    assert np.abs(frames.astype(int) - videos["bf16"].astype(int)).max() <= 2  # the same bf16 computation
    _differs_but_close(frames, videos["fp32"])


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_bf16_steps_follow_fp32_steps(tmp_path_factory):
    """A few bf16 steps (DeepSpeed bf16.enabled) against fp32 ones from the same seed and data: every
    step's loss within 2 % (relative) of fp32's, and not bit-equal to it (that would be fp32 again)."""
    from train_fixtures import losses, prepared, run_train, train_cmd, train_env

    prep = prepared(tmp_path_factory)
    got = {}
    for precision in ("fp32", "bf16"):
        tmp = tmp_path_factory.mktemp(f"train-{precision}")
        rc, log = run_train(train_cmd(prep / "manifest.jsonl", tmp / "out", 3, "--set", f"train.precision={precision}"),
                            train_env(tmp), timeout=1200)
        assert rc == 0, log[-3000:]
        got[precision] = losses(tmp / "out")
    assert sorted(got["bf16"]) == sorted(got["fp32"]) == [1, 2, 3]
    for step, loss in got["fp32"].items():
        assert np.isfinite(got["bf16"][step])
        assert got["bf16"][step] == pytest.approx(loss, rel=0.02), (step, got)
    assert got["bf16"] != got["fp32"]
