"""``motioncharacter deploy`` (export a Triton model repository) and ``motioncharacter serve`` (run Triton)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
    from .request_args import Limits

    d = Limits()
    p = sub.add_parser("deploy", help="export a Triton model repository (Python backend) to a folder or s3://",
                       description="Write a Triton model repository with two models: 'motioncharacter' (one "
                       "request -> frames + mp4) and 'motioncharacter_stream' (decoupled: per-step progress, then "
                       "the video over gRPC). Triton can serve it from the folder or read s3:// itself.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="URI", help="trained weights (diffusers layout), local folder or s3:// URI")
    src.add_argument("--preset", metavar="NAME", help="build a random-initialised preset instead, e.g. 'tiny'")
    p.add_argument("--model-repository", required=True, metavar="URI",
                   help="where to write the repository: local folder or s3://bucket/prefix")
    p.add_argument("--copy-weights", action="store_true",
                   help="copy the weights into the repository (default: the models reference --weights by URI)")
    p.add_argument("--arcface-pack", metavar="URI", help="insightface ArcFace model pack (default: bundled SFace)")
    p.add_argument("--base-checkpoint", metavar="URI",
                   help="community SD1.5 checkpoint as the base (diffusers folder or single-file .safetensors; "
                        "local paths are resolved to absolute, s3:// is read by the server)")
    from ..model.schedulers import SCHEDULERS

    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help="sampler the server uses (default: the weights' own, DDIM); see `generate --scheduler`")
    p.add_argument("--steps", type=int, default=0,
                   help="default denoising steps of a request that sends none (default: the model's own)")
    p.add_argument("--kind", choices=["cpu", "gpu"], default="cpu",
                   help="instance group kind: gpu on clusters, cpu locally (default: cpu)")
    p.add_argument("--instances", type=int, default=1, help="model instances per device, each loads the pipeline")
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="requests Triton's dynamic batcher may hand one execute() call (default 1)")
    p.add_argument("--max-queue-size", type=int, default=16, help="queued requests beyond this are rejected")
    p.add_argument("--queue-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="reject a request that waited this long in the queue (default 300)")
    p.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="abort a generation running longer than this (default 600)")
    p.add_argument("--version", type=int, default=1, help="model version folder to write (default 1)")
    p.add_argument("--version-policy", default="latest:1", help="latest:N, all, or specific:V1,V2 (default latest:1)")
    p.add_argument("--fps", type=int, default=8, help="frame rate of the returned mp4 (default 8)")
    p.add_argument("--max-frames", type=int, default=d.max_frames, help=f"request limit (default {d.max_frames})")
    p.add_argument("--max-resolution", type=int, default=d.max_resolution,
                   help=f"largest height/width a request may ask for (default {d.max_resolution})")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help=f"request limit (default {d.max_steps})")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help=f"longest prompt accepted (default {d.max_prompt_chars})")
    p.set_defaults(func=_deploy)

    s = sub.add_parser("serve", help="run a Triton server on loopback in the foreground (Ctrl-C stops it)",
                       description="Start tritonserver (shipped in nvidia-pytriton) on a model repository written by "
                       "`motioncharacter deploy`. s3:// repositories are read by Triton itself, with the object store "
                       "endpoint and AWS credentials from the environment.")
    s.add_argument("--model-repository", required=True, metavar="URI", help="local folder or s3://bucket/prefix")
    s.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000)")
    s.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    s.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    s.add_argument("--log-verbose", type=int, default=0, help="Triton's verbose log level (default 0)")
    s.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="give up if the models are not ready after this long (default 300)")
    s.set_defaults(func=_serve)


def _deploy(args: argparse.Namespace) -> int:
    from .repository import MODEL, STREAM_MODEL, DeployOptions, export_repository
    from .request_args import Limits

    opts = DeployOptions(
        weights=args.weights, preset=args.preset, copy_weights=args.copy_weights, arcface_pack=args.arcface_pack,
        base_checkpoint=(args.base_checkpoint if not args.base_checkpoint or "://" in args.base_checkpoint
                         else str(Path(args.base_checkpoint).resolve())),
        scheduler=args.scheduler or "", default_steps=args.steps,
        kind=args.kind, instances=args.instances, max_batch_size=args.max_batch_size,
        max_queue_size=args.max_queue_size, queue_timeout_s=args.queue_timeout,
        request_timeout_s=args.request_timeout, version=args.version, version_policy=args.version_policy,
        fps=args.fps, limits=Limits(max_frames=args.max_frames, max_resolution=args.max_resolution,
                                    max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars))
    dest = export_repository(args.model_repository, opts)
    print(f"wrote models '{MODEL}' and '{STREAM_MODEL}' (version {args.version}) to {dest}")
    print(f"serve it with: motioncharacter serve --model-repository {dest}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import signal

    from ..cli import UserError
    from .server import ServerError, TritonServer

    server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, log_verbose=args.log_verbose)
    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C reaches only us (Triton runs in its own session). Install the handler for SIGINT
    # explicitly (a shell's background job inherits it ignored) and treat SIGTERM (a pod stop) alike.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        server.start(timeout_s=args.startup_timeout)
        print(f"Triton ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}", flush=True)
        print("Ctrl-C to stop", flush=True)
        code = server.proc.wait()
        print(f"tritonserver exited with code {code}")
        return code
    except KeyboardInterrupt:
        print("stopping Triton...", flush=True)
        return 0
    except ServerError as e:
        raise UserError(str(e)) from None
    finally:
        server.stop()
