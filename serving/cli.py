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
                       "the video over gRPC). Triton can serve it from the folder or read s3:// itself. Each deploy "
                       "adds a new version (N+1) beside the existing ones and points the models at it; with --url a "
                       "running server loads and warms it up while version N keeps serving, then drops N. "
                       "--rollback points the models back at the version served before.")
    src = p.add_mutually_exclusive_group()  # one of them, unless --rollback (checked in _deploy)
    src.add_argument("--weights", metavar="URI", help="trained weights (diffusers layout), local folder or s3:// URI")
    src.add_argument("--preset", metavar="NAME", help="build a random-initialised preset instead, e.g. 'tiny'")
    src.add_argument("--model", metavar="REF", help="a registered version: models:/NAME@ALIAS (e.g. "
                     "models:/motioncharacter@champion) or models:/NAME/VERSION, resolved through the MLflow Model "
                     "Registry to its adapter; the weights its evaluation scored, else its base + adapter assembled "
                     "here and copied into the repository")
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
    from ..model.acceleration import add_arguments as speed_arguments

    speed_arguments(p)  # --cache-interval, --vae-slicing, ...: what the server's pipeline uses
    from ..model.precision import DTYPES

    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="precision the server's models run in, recorded in the model config: auto = fp16 on GPU "
                        "instances, fp32 on CPU ones; bf16 runs on CPUs with AVX-512 BF16/AMX; fp16 needs --kind gpu")
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
    p.add_argument("--version", type=int, default=0,
                   help="version to write (default: one above the highest in the repository; an existing one "
                        "is refused), or with --rollback the version to return to")
    p.add_argument("--version-policy", default="",
                   help="latest:N, all, or specific:V1,V2 (default: specific:<the new version>, so Triton serves "
                        "exactly the version deployed)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="no model_warmup: by default Triton runs the smallest valid request (1 step, 2 frames, "
                        "64x64 at most) on every new instance before the version serves, so a version that cannot "
                        "generate never replaces a working one")
    p.add_argument("--keep-versions", type=int, default=3, metavar="N",
                   help="after the deploy, delete version folders beyond the newest N, never the new one or the "
                        "one it replaces (default 3; 0 keeps all; not with --version-policy)")
    p.add_argument("--rollback", action="store_true",
                   help="point the models back at the version served before the current one (or --version N) "
                        "instead of deploying; no weights needed")
    p.add_argument("--url", metavar="URL",
                   help="a running server (http://HOST:PORT or grpc://HOST:PORT, started with explicit model "
                        "control as `motioncharacter serve` is) to reload the models on after writing, sending "
                        "the admin key from MOTIONCHARACTER_TRITON_ADMIN_KEY; the command returns once it serves "
                        "the new version. A polling server (`serve --model-control poll`) is waited for instead")
    p.add_argument("--load-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="with --url: give up if the server does not serve the version after this long (default 600)")
    k = p.add_argument_group("KServe (--target kserve)")
    k.add_argument("--target", choices=["triton", "kserve"], default="triton",
                   help="triton (default): a new version in the repository that Triton Deployments poll or "
                        "`--url` reloads; kserve: an immutable repository per registered version "
                        "(MODEL_REPOSITORY-kserve/vN, N from --model, or --version with --weights/--preset) and a "
                        "KServe InferenceService serving it, written to --manifest")
    k.add_argument("--manifest", default="inferenceservice.yaml", metavar="FILE",
                   help="the InferenceService to write (and, for --promote/--rollback, to read; default %(default)s)")
    k.add_argument("--canary-percent", type=int, metavar="P",
                   help="roll the new version out as a canary taking P%% of the traffic; the previous revision keeps "
                        "the rest (default: all traffic at once)")
    k.add_argument("--promote", action="store_true",
                   help="with --target kserve: the canary in --manifest becomes the default (100%%)")
    k.add_argument("--name", default="motioncharacter", help="InferenceService name (default %(default)s)")
    k.add_argument("--namespace", default="motioncharacter", help="its namespace (default %(default)s)")
    k.add_argument("--gpus", type=int, default=0, help="GPUs per predictor pod (default 0: CPU)")
    k.add_argument("--image", default="", help="Triton image (default: the project's motioncharacter-triton)")
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
    s.add_argument("--model-control", choices=["explicit", "poll"], default="explicit",
                   help="how a new deploy reaches the running server: explicit (default) loads every model at start "
                        "and reloads one when `deploy --url` asks (with the admin key); poll rescans the repository "
                        "every --poll-seconds. Either way the old version serves until the new one is warmed up")
    s.add_argument("--poll-seconds", type=float, default=15.0, metavar="SECONDS",
                   help="with --model-control poll: how often to rescan the repository (default 15)")
    s.set_defaults(func=_serve)


def _registered_weights(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(--weights, --copy-weights) with a models:/ reference (--model, or --weights models:/...)
    resolved through the registry; weights assembled on this machine must be copied."""
    from .. import registry

    ref = args.model or (args.weights if registry.is_reference(args.weights) else None)
    if not ref:
        return args.weights, args.copy_weights
    v = registry.resolve(ref)
    weights, assembled = registry.weights_for(v)
    print(f"{ref} is {v.uri}: adapter {v.source}, weights {weights}")
    return weights, args.copy_weights or assembled


def _deploy(args: argparse.Namespace) -> int:
    from ..cli import UserError
    from .repository import MODEL, STREAM_MODEL, rollback, served_version, write_version

    if args.url:  # before anything is written: a repository the server was not told about helps nobody
        import os

        from .server import ADMIN_KEY_ENV

        if not os.environ.get(ADMIN_KEY_ENV):
            raise UserError(f"--url reloads the models through the server's admin API: set {ADMIN_KEY_ENV} to the "
                            "key it was started with (a server polling its repository needs no --url)")
    if args.target == "kserve":
        return _deploy_kserve(args, _options(args, *_registered_weights(args)) if not (args.rollback or args.promote)
                              else None)
    if args.promote:
        raise UserError("--promote moves a KServe canary: use it with --target kserve")
    if args.rollback:
        if args.weights or args.preset or args.model:
            raise UserError("--rollback returns to a version already in the repository: give no --weights, "
                            "--preset or --model")
        old, new = rollback(args.model_repository, args.version)
        print(f"{args.model_repository}: models '{MODEL}' and '{STREAM_MODEL}' point at version {new} again "
              f"(was {old})")
        if args.url:
            _serve_version(args.url, args.model_repository, new, old, args.load_timeout)
        return 0
    if not (args.weights or args.preset or args.model):
        raise UserError("give one of --weights URI, --preset NAME or --model models:/NAME@ALIAS (or --rollback)")
    opts = _options(args, *_registered_weights(args))
    dest = args.model_repository
    before = served_version(dest)
    version = write_version(dest, opts)
    print(f"wrote models '{MODEL}' and '{STREAM_MODEL}' version {version} to {dest}"
          + (f" (version {before} was served before; `deploy --rollback` returns to it)" if before else ""))
    if args.url:
        _serve_version(args.url, dest, version, before, args.load_timeout)
    else:
        print(f"serve it with: motioncharacter serve --model-repository {dest} (a running server: "
              "`deploy --url`, or `serve --model-control poll`)")
    return 0


def _options(args: argparse.Namespace, weights: str | None, copy_weights: bool):
    from dataclasses import asdict

    from ..model.acceleration import from_args
    from .repository import DeployOptions
    from .request_args import Limits

    return DeployOptions(
        weights=weights, preset=args.preset, copy_weights=copy_weights, arcface_pack=args.arcface_pack,
        base_checkpoint=(args.base_checkpoint if not args.base_checkpoint or "://" in args.base_checkpoint
                         else str(Path(args.base_checkpoint).resolve())),
        scheduler=args.scheduler or "", default_steps=args.steps, acceleration=asdict(from_args(args)), dtype=args.dtype,
        kind=args.kind, instances=args.instances, max_batch_size=args.max_batch_size,
        max_queue_size=args.max_queue_size, queue_timeout_s=args.queue_timeout,
        request_timeout_s=args.request_timeout, version=args.version, version_policy=args.version_policy,
        warmup=args.warmup, keep_versions=args.keep_versions,
        fps=args.fps, limits=Limits(max_frames=args.max_frames, max_resolution=args.max_resolution,
                                    max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars))


def _deploy_kserve(args: argparse.Namespace, opts) -> int:
    """Write (or reuse) the version's repository and the InferenceService; --promote / --rollback move
    the traffic of the one in --manifest."""
    import yaml

    from .. import registry, storage
    from ..cli import UserError
    from . import kserve
    from .repository import served_version, write_version

    if args.url:
        raise UserError("--url reloads a Triton server; with --target kserve, apply --manifest (kubectl apply -f)")
    if args.promote or args.rollback:
        if args.promote and args.rollback:
            raise UserError("give --promote or --rollback, not both")
        if args.weights or args.preset or args.model:
            raise UserError("--promote/--rollback move traffic between revisions already rolled out: give no "
                            "--weights, --preset or --model")
        if not storage.exists(args.manifest):
            raise UserError(f"{args.manifest}: no InferenceService to {'promote' if args.promote else 'roll back'} "
                            "(write one with deploy --target kserve first)")
        try:
            m = (kserve.promote if args.promote else kserve.rollback)(yaml.safe_load(storage.read_bytes(args.manifest)))
        except ValueError as e:
            raise UserError(f"{args.manifest}: {e}") from None
        storage.write_bytes(args.manifest, yaml.safe_dump(m, sort_keys=False).encode())
        print(f"wrote {args.manifest}: " + ("the canary serves all traffic" if args.promote else
                                            "all traffic back to the previous revision (the canary gets 0%)"))
        print(f"apply it with: kubectl apply -f {args.manifest}")
        return 0
    if not (args.weights or args.preset or args.model):
        raise UserError("give --model models:/NAME@ALIAS (or --weights/--preset with --version N), or "
                        "--promote / --rollback")
    ref = args.model or (args.weights if registry.is_reference(args.weights) else None)
    version = registry.resolve(ref).version if ref else args.version
    if not version:
        raise UserError("--target kserve serves one repository per registered version: give --model "
                        "models:/NAME@ALIAS, or --version N with --weights/--preset")
    dest = kserve.storage_uri(args.model_repository, version)
    if served_version(dest):  # immutable: a KServe revision may still serve it
        print(f"{dest} already holds version {version}: reusing it")
    else:
        import dataclasses

        write_version(dest, dataclasses.replace(opts, version=0, keep_versions=0))
        print(f"wrote version {version} to {dest}")
    m = kserve.inference_service(args.name, args.namespace, dest, image=args.image or kserve.TRITON_IMAGE,
                                 canary_percent=args.canary_percent, gpus=args.gpus, model=ref or "")
    storage.write_bytes(args.manifest, yaml.safe_dump(m, sort_keys=False).encode())
    share = f"as a canary with {args.canary_percent}% of the traffic" if args.canary_percent is not None \
        else "with all the traffic"
    print(f"wrote {args.manifest}: InferenceService {args.namespace}/{args.name} serves {dest} {share}")
    print(f"apply it with: kubectl apply -f {args.manifest}")
    return 0


def _serve_version(url: str, repository: str, version: int, previous: int | None, timeout_s: float) -> None:
    """Have the server at ``url`` serve ``version``, the one the repository now names. If it cannot,
    it still serves ``previous``: point the repository back there, and reload a model that did switch."""
    from ..cli import UserError
    from .client import MotionCharacterClient, RemoteError, ServerUnavailable, VersionMismatch
    from .repository import MODEL, STREAM_MODEL, rollback

    failures = (RemoteError, ServerUnavailable, VersionMismatch)
    with MotionCharacterClient(url, timeout_s=timeout_s, retries=1) as c:
        try:
            c.switch_to(version, timeout_s=timeout_s)
        except failures as e:
            if not previous or previous == version:
                raise UserError(f"{url} did not switch to version {version}: {e}") from None
            rollback(repository, previous)
            try:  # reload only a model that did switch: the others never stopped serving `previous`
                switched = tuple(m for m in (MODEL, STREAM_MODEL) if c.served_versions(m) != [previous])
                if switched:
                    c.switch_to(previous, switched, timeout_s=timeout_s)
                c.check_version(previous)
                state = f"it serves version {previous} again"
            except failures as again:
                state = f"returning it to version {previous} failed too ({again})"
            raise UserError(f"{url} did not switch to version {version}: {e}. {repository} points at version "
                            f"{previous} again and {state}") from None
    print(f"{url} serves version {version}")


def _serve(args: argparse.Namespace) -> int:
    import signal

    from ..cli import UserError
    from .server import ServerError, TritonServer

    server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, log_verbose=args.log_verbose,
                          model_control=args.model_control, poll_s=args.poll_seconds)
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
