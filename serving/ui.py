"""``motioncharacter ui``: a web page to try a served model (Gradio), over a running Triton endpoint.

Upload or take a face photo, type a prompt and an action, slide the motion intensity, generate; or
run the same request at intensities 0, 5, 10, 15 and 20 side by side. The page is a client of the
server (serving/ui_actions.py): it never loads the model. Safe by default: loopback only, optional
login from MOTIONCHARACTER_UI_AUTH, uploads capped, a bounded queue.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

AUTH_ENV = "MOTIONCHARACTER_UI_AUTH"  # "user:password" (several: "u1:p1,u2:p2")
DEFAULT_URL = "grpc://127.0.0.1:8001"  # `motioncharacter serve`'s gRPC port: streamed progress
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "ui", help="a web page to try a served model: upload a face, prompt, intensity slider, video",
        description="Serve a web page (Gradio) that generates videos on a running Triton endpoint (see "
        "`motioncharacter serve`) through the project's client; the model is not loaded here. Binds to "
        f"loopback unless --host says otherwise. Set {AUTH_ENV}=user:password to require a login.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL,
                   help="the Triton endpoint: grpc://HOST:PORT streams per-step progress, http://HOST:PORT does not")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; anything but loopback lets others use the page (and the server behind "
                        f"it): set {AUTH_ENV} then")
    p.add_argument("--port", type=int, default=7860, help="port of the page")
    p.add_argument("--max-upload-mb", type=float, default=10.0,
                   help="largest photo accepted (the server's own image limit applies too, whichever is smaller)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="generations run at once from this page; the rest wait in the queue")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests waiting beyond this are turned away with a 'busy' message")
    p.set_defaults(func=_run)


def _auth() -> list[tuple[str, str]] | None:
    """Logins from MOTIONCHARACTER_UI_AUTH ("user:password[,user2:password2]"), or None."""
    value = os.environ.get(AUTH_ENV, "").strip()
    if not value:
        return None
    pairs = [item.split(":", 1) for item in value.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1] for p in pairs):
        from ..cli import UserError

        raise UserError(f"{AUTH_ENV} must be user:password (several separated by commas)")  # never echo it
    return [(u.strip(), pw) for u, pw in pairs]


def _run(args: argparse.Namespace) -> int:
    from ..cli import UserError

    if args.concurrency < 1 or args.queue_size < 1 or args.max_upload_mb <= 0:
        raise UserError("--concurrency, --queue-size and --max-upload-mb must be positive")
    auth = _auth()
    warning = host_warning(args.host, args.url, bool(auth))
    if warning:
        log.warning("%s", warning)
    # Uploads and results in a folder of this process's own; Gradio sends no telemetry.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    upload_dir = tempfile.mkdtemp(prefix="motioncharacter-ui-")
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    demo = build(args.url, upload_dir, max_upload_bytes=int(args.max_upload_mb * 1e6))
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    print(f"page for {args.url} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a pod's stop: clean up like Ctrl-C
    try:
        demo.launch(server_name=args.host, server_port=args.port, auth=auth,
                    max_file_size=int(args.max_upload_mb * 1e6), share=False, show_error=False, ssr_mode=False,
                    quiet=True, footer_links=[])
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)  # uploaded photos and videos go with the page
    return 0


def host_warning(host: str, url: str, auth: bool) -> str | None:
    """What to tell the person starting the page on a non-loopback address (None on loopback)."""
    if host in LOOPBACK:
        return None
    return (f"serving the page on {host}: anyone who can reach it can generate on {url}"
            + ("" if auth else f" without logging in (set {AUTH_ENV}=user:password)"))


def build(url: str, upload_dir: str, max_upload_bytes: int = 10_000_000):
    """The page (a gr.Blocks) for the endpoint at ``url``; uploads must land in ``upload_dir``."""
    import gradio as gr

    from ..video import encode_video
    from . import ui_actions as act

    def info(s: "act.Served") -> str:
        versions = ", ".join(map(str, s.versions)) or "none ready"
        return f"`{s.model}` at {url}: version(s) {versions}"

    def load():
        try:
            s = act.served(url)
        except act.PageError as e:
            return (gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), f"⚠️ {e}", "")
        lim, d = s.limits, s.defaults
        choices = ["served"] + [str(v) for v in s.versions]
        return (gr.update(choices=choices, value="served"),
                gr.update(value=d["steps"], maximum=lim.max_steps),
                gr.update(value=min(d["frames"], lim.max_frames), maximum=lim.max_frames),
                gr.update(value=d["height"], maximum=lim.max_resolution),
                gr.update(value=d["width"], maximum=lim.max_resolution),
                "", info(s))

    def request(photo, prompt, action, intensity, steps, guidance, seed, frames, height, width, id_scale,
                motion_scale, negative, face_index, version):
        """(served, image bytes, prompt, params, version) after every check the page can make itself."""
        s = act.served(url)
        limits = s.limits
        data, rgb = act.read_photo(photo, upload_dir, min(max_upload_bytes, limits.max_image_bytes),
                                   limits.max_image_pixels)
        act.check_face(rgb, int(face_index))
        seed = int(seed) if seed is not None and int(seed) >= 0 else random.randrange(2**31)
        params = dict(action=action or "", intensity=float(intensity), steps=int(steps), guidance=float(guidance),
                      seed=seed, frames=int(frames), height=int(height), width=int(width), id_scale=float(id_scale),
                      motion_scale=float(motion_scale), negative_prompt=negative or "", face_index=int(face_index))
        return s, data, prompt or "", params, (0 if version in (None, "", "served") else int(version))

    def done(out: "act.Outcome", intensity: float) -> str:
        return (f"Done: {out.frames} frames, {out.width}x{out.height}, intensity {intensity:g}, seed {out.seed}, "
                f"version {out.version}, {out.seconds:.1f} s")

    def on_generate(*inputs, progress=gr.Progress()):
        try:
            s, data, prompt, params, version = request(*inputs)
            out = act.generate(url, version, data, prompt, params,
                               lambda s, n: progress((s, n), desc="denoising", unit="steps"))
        except act.PageError as e:
            return None, f"⚠️ {e}", None, "", ""
        path = Path(tempfile.mkdtemp(dir=upload_dir)) / f"motioncharacter-{out.seed}.mp4"
        path.write_bytes(out.video)
        return (str(path), done(out, params["intensity"]), out.seed, f"{s.model} version {out.version}",
                f"{out.seconds:.1f} s")

    def on_sweep(*inputs, progress=gr.Progress()):
        try:
            s, data, prompt, params, version = request(*inputs)
            frames, fps, outs = act.sweep(url, version, data, prompt, params,
                                     lambda s, n: progress((s, n), desc="intensity sweep", unit="steps"))
        except act.PageError as e:
            return None, f"⚠️ {e}", None, "", ""
        path = Path(tempfile.mkdtemp(dir=upload_dir)) / f"sweep-{outs[0].seed}.mp4"
        path.write_bytes(encode_video(frames, "mp4", fps))
        total = sum(o.seconds for o in outs)
        return (str(path), f"Sweep done: intensities {', '.join(map(str, act.SWEEP))} left to right, seed "
                f"{outs[0].seed}, {total:.1f} s", outs[0].seed, f"{s.model} version {outs[0].version}",
                f"{total:.1f} s")

    with gr.Blocks(title="MotionCharacter", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown("## MotionCharacter\nA face, a prompt, an action and how much motion: the server "
                    "generates a video of that person.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Face photo", type="filepath", image_mode=None, sources=["upload", "webcam"],
                                 elem_id="photo", height=240)
                prompt = gr.Textbox(label="Prompt", value="a person talking to the camera", elem_id="prompt")
                action = gr.Dropdown(label="Action", choices=list(act.ACTIONS), value="talking",
                                     allow_custom_value=True, elem_id="action")
                intensity = gr.Slider(0, 20, value=10, step=0.5, label="Motion intensity (0 = still, 20 = most)",
                                      elem_id="intensity")
                with gr.Accordion("Advanced", open=False):
                    steps = gr.Slider(1, 100, value=act.DEFAULT_SIZES["steps"], step=1, label="Steps",
                                      elem_id="steps")
                    guidance = gr.Slider(0, 20, value=8.0, step=0.5, label="Guidance", elem_id="guidance")
                    seed = gr.Number(-1, precision=0, label="Seed (-1 = random)", elem_id="seed")
                    frames = gr.Slider(1, 32, value=act.DEFAULT_SIZES["frames"], step=1, label="Frames",
                                       elem_id="frames")
                    with gr.Row():
                        height = gr.Slider(64, 512, value=act.DEFAULT_SIZES["height"], step=8, label="Height")
                        width = gr.Slider(64, 512, value=act.DEFAULT_SIZES["width"], step=8, label="Width")
                    id_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Identity scale (lambda)")
                    motion_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Motion scale (alpha)")
                    negative = gr.Textbox(label="Negative prompt", value="")
                    face_index = gr.Number(-1, precision=0, label="Face (-1 = one person; 0 = largest of several)",
                                           elem_id="face-index")
                    version = gr.Dropdown(["served"], value="served", label="Model version", elem_id="version")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    sweep_btn = gr.Button("Intensity sweep (0, 5, 10, 15, 20)", elem_id="sweep")
            with gr.Column():
                video = gr.Video(label="Video", format="mp4", autoplay=True, loop=True, elem_id="video")
                status = gr.Markdown(elem_id="status")
                with gr.Row():
                    seed_used = gr.Number(label="Seed used", interactive=False, elem_id="seed-used")
                    model_used = gr.Textbox(label="Model", interactive=False, elem_id="model-used")
                    took = gr.Textbox(label="Time", interactive=False, elem_id="time-taken")
                server = gr.Markdown(elem_id="server")
        inputs = [photo, prompt, action, intensity, steps, guidance, seed, frames, height, width, id_scale,
                  motion_scale, negative, face_index, version]
        outputs = [video, status, seed_used, model_used, took]
        go.click(on_generate, inputs, outputs)
        sweep_btn.click(on_sweep, inputs, outputs)
        demo.load(load, None, [version, steps, frames, height, width, status, server])
    return demo
