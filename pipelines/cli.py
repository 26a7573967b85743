"""``motioncharacter pipeline compile|run|submit``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("pipeline", help="compile, run locally or submit the Kubeflow pipeline",
                       description="The Kubeflow Pipelines v2 pipeline prepare -> train -> evaluate -> deploy.")
    ps = p.add_subparsers(dest="pipeline_command", metavar="ACTION")
    c = ps.add_parser("compile", help="compile the pipeline to IR YAML")
    c.add_argument("--output", "-o", default="pipeline.yaml", help="IR YAML to write (default: %(default)s)")
    c.set_defaults(func=_compile)

    def params(q):
        q.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                       help="pipeline parameter, e.g. --param train_steps=8 --param 'ablations=[\"no_id_loss\"]'; "
                            "scale with prepare_shards=N (data preparation in N pods), train_nodes=N and "
                            "gpus_per_node=G (a PyTorchJob per train step, on a cluster) or train_processes=N "
                            "(N torchrun processes in the step: what works locally)")

    r = ps.add_parser("run", help="run the whole pipeline on this machine with kfp.local (subprocesses, or "
                                  "containers with --containers)")
    r.add_argument("--local", action="store_true", required=True, help="run locally (the only mode of `run`)")
    r.add_argument("--pipeline-root", default="outputs/kfp",
                   help="local artifact root; step logs go to its logs/ (default: %(default)s)")
    r.add_argument("--containers", action="store_true",
                   help="run every step in the project's image through kfp's DockerRunner (podman or docker; "
                        "build the images first: `motioncharacter images build`), the smoke test against the CPU "
                        "Triton image")
    r.add_argument("--verbose-steps", action="store_true",
                   help="print kfp.local's full output (executor input, every line of every step) here instead")
    params(r)
    r.set_defaults(func=_run)
    s = ps.add_parser("submit", help="submit a run to a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True, help="KFP API URL, e.g. https://kubeflow.example.com/pipeline")
    s.add_argument("--experiment", default="motioncharacter", help="KFP experiment name")
    s.add_argument("--namespace", help="Kubeflow profile namespace")
    params(s)
    s.set_defaults(func=_submit)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def parse_params(items: list[str]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--param {it!r} is not NAME=VALUE")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _compile(args) -> int:
    from .run import compile_pipeline

    print(f"compiled to {compile_pipeline(args.output)}")
    return 0


def _run(args) -> int:
    from .containers import EngineError
    from .run import StepFailed, run_local

    logs = Path(args.pipeline_root) / "logs"
    print(f"step logs: {logs}/")
    try:
        result = run_local(parse_params(args.param), args.pipeline_root,
                           log_dir=None if args.verbose_steps else str(logs), containers=args.containers)
    except (StepFailed, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


def _submit(args) -> int:
    from .run import submit

    run_id = submit(args.host, parse_params(args.param), args.experiment, args.namespace)
    print(f"submitted run {run_id} to {args.host}")
    return 0
