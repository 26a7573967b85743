"""``motioncharacter generate``: one video from a reference face, a prompt, an action and an intensity."""
from __future__ import annotations

import argparse
from pathlib import Path

def add_commands(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate a video of the person in a reference image",
        description="Generate an identity-preserving video with MotionCharacter: the person in --image, "
                    "doing --action with motion --intensity, described by --prompt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="DIR_OR_URI",
                     help="weights folder or s3:// URI in the diffusers layout (unet/, motion_adapter/, vae/, "
                          "text_encoder/, tokenizer/, image_encoder/, optional adapter/)")
    src.add_argument("--preset", choices=["tiny", "mini"],
                     help="tiny: small random models for a CPU smoke run; mini: the small model trained here by `demo --learn`")
    src.add_argument("--url", metavar="URL",
                     help="generate on a Triton server instead (http://HOST:8000 or grpc://HOST:8001, see "
                          "`motioncharacter serve`); ID-Animator/DreaMoving options are sent along, "
                          "--base-checkpoint and ControlNet folders are chosen at deploy time")
    p.add_argument("--image", required=True, metavar="FACE", help="reference portrait (jpg/png) with one face")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="overall description of the video")
    p.add_argument("--action", default="", metavar="PHRASE", help="action phrase, e.g. 'talking' ('' for none)")
    p.add_argument("--intensity", type=float, default=10.0, metavar="N",
                   help="motion intensity in [0, 20] (mean foreground optical flow; 0 = still)")
    p.add_argument("--out", required=True, metavar="FILE", help="output video, .mp4 or .gif")
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to keep out of the video")
    p.add_argument("--frames", type=int, help="number of frames (default: the model's own, from its weights or the server: 16 for SD1.5, 8 for tiny/mini)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's own: 30 for SD1.5 as in the paper, 4 for tiny)")
    p.add_argument("--guidance", type=float, default=8.0, help="classifier-free guidance scale (> 1 enables it)")
    p.add_argument("--height", type=int, help="frame height in pixels (default: the model's native size, 512 for SD1.5, 64 for tiny)")
    p.add_argument("--width", type=int, help="frame width in pixels (default: the model's native size, 512 for SD1.5, 64 for tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same inputs and seed give the same video")
    p.add_argument("--id-scale", type=float, default=1.0, help="lambda: weight of the identity tokens (eq. 3)")
    p.add_argument("--motion-scale", type=float, default=1.0, help="alpha: weight of the motion attention (eq. 8)")
    p.add_argument("--face-index", type=int, help="which face to use when the image has several (0 = largest)")
    p.add_argument("--arcface-pack", metavar="DIR_OR_URI",
                   help="insightface model pack for ArcFace embeddings (default: the offline SFace model)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    from .precision import DTYPES

    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="precision of the models: auto = fp16 on CUDA, fp32 on a CPU; bf16 runs on CPUs with "
                        "AVX-512 BF16/AMX; fp16 needs a GPU (the VAE then decodes in fp32). With --url, chosen at deploy")
    p.add_argument("--fps", type=float, default=8.0, help="frame rate of the written video")
    from .schedulers import SCHEDULERS

    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="sampler: ddim (the weights' own, default), dpm++ (DPM-Solver++: similar output in about "
                        "half the steps, see README), lcm (AnimateLCM-type weights); with --url, chosen at deploy")
    from .feature_cli import add_arguments

    add_arguments(p)  # --mode, identity mixing, Content Guider, ControlNets, long videos, base checkpoint
    from .acceleration import add_arguments as speed_arguments

    speed_arguments(p)  # --cache-interval, --vae-slicing, ...
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from tqdm import tqdm

    from motioncharacter import faces
    from motioncharacter.cli import UserError

    from . import feature_cli, precision
    from .inference import generate, load_pipeline
    from .pipeline import load_reference_image

    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise UserError(f"--out must end in .mp4 or .gif, got {out.name}")
    # Cheap checks first: a bad image, face or dtype fails before minutes of model loading.
    if not args.url:
        try:
            precision.resolve(args.dtype, args.device)
        except ValueError as e:
            raise UserError(f"--dtype {args.dtype}: {e}") from None
    try:
        rgb = load_reference_image(args.image)
    except FileNotFoundError:
        raise UserError(f"--image {args.image}: no such file") from None
    except ValueError as e:
        raise UserError(f"--image: {e}") from None
    try:
        faces.detector().one(rgb, f"--image {args.image}", args.face_index)
    except faces.FaceError as e:
        raise UserError(str(e)) from None

    try:
        feature_cli.precheck(args, args.frames)
        load = feature_cli.load_kwargs(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    features = feature_cli.feature_kwargs(args)
    if args.pose_keypoints:  # the user's own file, read here: generate() and the server take JSON text only
        try:
            features["pose_keypoints"] = Path(args.pose_keypoints).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--pose-keypoints {args.pose_keypoints}: {e}") from None
    if args.url:  # the server holds the weights, and advertises the sizes that suit them
        from motioncharacter.serving.client import MotionCharacterClient

        deploy_time = [k for k, v in load.items() if v] + (["--dtype"] if args.dtype != "auto" else [])
        if deploy_time:
            raise UserError(f"--url: {', '.join(deploy_time)} are chosen when the server is deployed "
                            "(`motioncharacter deploy --base-checkpoint/--scheduler/--dtype/--cache-interval...`, ControlNets in the "
                            "weights folder)")
        with MotionCharacterClient(args.url) as client:
            pipe, d = None, {"steps": 30, "frames": 16, "height": 512, "width": 512, **client.defaults()}
        generate = _remote_generate(args.url)
    else:
        pipe = load_pipeline(weights=args.weights, preset=args.preset, device=args.device,
                             arcface_pack=args.arcface_pack, dtype=args.dtype, **load)
        d = pipe.defaults  # sizes that suit the loaded weights
    steps = args.steps or d["steps"]
    with tqdm(total=steps, desc="denoising", unit="step") as bar:
        video = generate(
            pipe, image=rgb, prompt=args.prompt, negative_prompt=args.negative_prompt, action=args.action,
            intensity=args.intensity, id_scale=args.id_scale, motion_scale=args.motion_scale, steps=steps,
            guidance=args.guidance, frames=args.frames or d["frames"], height=args.height or d["height"],
            width=args.width or d["width"], seed=args.seed, face_index=args.face_index,
            progress=lambda i, n: bar.update(i - bar.n), **features)
    from motioncharacter.video import write_video

    write_video(video, out, fps=args.fps)
    print(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}, "
          f"face embedder: {pipe.face_embedder.name if pipe else 'on the server'}"
          + (f", {precision.running(pipe)})" if pipe else ")"))
    return 0


def _remote_generate(url: str):
    """``generate`` with the same keywords, run on a Triton server: MotionCharacter requests through
    ``generate_remote`` (streamed progress over gRPC), feature requests through the client."""
    from motioncharacter.serving.client import MotionCharacterClient, generate_remote

    def run(_pipe, *, mode="motioncharacter", progress=None, **kw):
        base = {k: kw.pop(k) for k in list(kw) if k in _BASE_ARGS}
        features = {k: v for k, v in kw.items() if v not in (None, [], ())}
        if mode == "motioncharacter" and not any(k in features for k in _REQUEST_FEATURES):
            return generate_remote(url, progress=progress, **base)
        image, prompt = base.pop("image"), base.pop("prompt")
        if base.get("face_index") is None:
            base.pop("face_index", None)
        with MotionCharacterClient(url, timeout_s=600) as client:
            return client.generate(image, prompt, mode=mode, **base, **features).frames

    return run


_BASE_ARGS = ("image", "prompt", "negative_prompt", "action", "intensity", "id_scale", "motion_scale", "steps",
              "guidance", "frames", "height", "width", "seed", "face_index")
# feature inputs that change a MotionCharacter-mode request (the rest are defaults or scales)
_REQUEST_FEATURES = ("mix_image", "mix_ratio", "cloth_image", "pose_video", "pose_keypoints", "depth_video",
                     "sparse_images", "context_length")
