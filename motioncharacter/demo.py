"""``motioncharacter demo``: the README's main job, on this machine, with no downloads.

It starts the local services (S3 object store + MLflow server), then runs the whole Kubeflow
pipeline locally with kfp.local on the tiny preset: generated fixture clips -> data
preparation -> DeepSpeed training -> evaluation -> (gate) deployment to a Triton model
repository -> one video generated through a real Triton server. ``--data-only`` runs just
the data-preparation stage (about a minute). ``--learn`` instead proves that the model learns:
it trains the small ``mini`` model here and measures how well its videos follow the requested
motion intensity (see motioncharacter/learn.py; about an hour on 2 cores).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline locally on generated fixtures (no downloads)",
                       description=__doc__.split("\n\n")[1])
    p.add_argument("--workdir", default="outputs/demo", help="local folder for outputs (default: %(default)s)")
    p.add_argument("--no-stack", action="store_true",
                   help="do not start the local S3 + MLflow services: local files and sqlite MLflow instead")
    p.add_argument("--containers", action="store_true",
                   help="run the pipeline's steps in the project's images (`motioncharacter images build` first)")
    p.add_argument("--data-only", action="store_true", help="only generate fixtures and prepare the dataset")
    p.add_argument("--train-steps", type=int, default=4, help="training steps of the tiny model (default: 4)")
    p.add_argument("--learn", action="store_true",
                   help="train the mini model on this CPU (data prepare -> train-base -> train -> evaluate) and "
                   "report identity (SFace) and intensity adherence with ablations (about an hour)")
    p.add_argument("--output", default="outputs/learn",
                   help="with --learn: folder for learn_report.json, eval/<variant>/, intensity_grid.gif "
                   "(default: %(default)s)")
    p.add_argument("--learn-config", metavar="FILE", help="with --learn: YAML over the packaged learn.yaml")
    p.set_defaults(func=_demo)


def _services(args):
    from motioncharacter.stack import Stack, load_stack_env

    if args.no_stack:
        return None
    print("[services] starting the local S3 server and MLflow server (motioncharacter stack up)")
    stack = Stack(None, s3_port=None, mlflow_port=None)
    stack.up()
    load_stack_env()
    return stack


def _demo(args) -> int:
    work = Path(args.workdir).resolve()
    stack = _services(args)
    from motioncharacter.tracking import tracking_uri

    if args.learn:
        from motioncharacter.learn import load_learn_config, run_learn

        work = f"s3://{stack.bucket}/learn" if stack else None
        report = run_learn(args.output, work, load_learn_config(args.learn_config))
        print(json.dumps({k: report[k] for k in report if k not in ("weights", "stages_minutes")}, indent=1))
        print(f"MLflow: {tracking_uri()} (experiments motioncharacter-data, -train, -eval)")
        return 0
    if args.data_only:
        from motioncharacter.pipelines.steps import prepare_step

        out = f"s3://{stack.bucket}/demo/prepared" if stack else str(work / "prepared")
        manifest = prepare_step("fixtures", out, [])
        print(f"manifest: {manifest}\nmlflow: {tracking_uri()}")
        return 0

    from motioncharacter.pipelines.run import run_local

    params = {"train_steps": args.train_steps}
    if stack:
        params.update(work_uri=f"s3://{stack.bucket}/demo", model_repository=f"s3://{stack.bucket}/demo/model_repository")
    else:
        params.update(work_uri=str(work / "pipeline"), model_repository=str(work / "model_repository"))
    from motioncharacter.cli import UserError
    from motioncharacter.pipelines.containers import EngineError
    from motioncharacter.pipelines.run import StepFailed

    logs = work / "logs"
    if args.containers and not stack:  # the store the step containers write (pipelines/containers.py)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'kfp' / 'mlflow.db'}")
    print("[pipeline] prepare -> train -> evaluate -> deploy -> Triton smoke test (kfp.local); "
          f"step logs: {logs}/")
    try:
        result = run_local(params, str(work / "kfp"), log_dir=str(logs), containers=args.containers)
    except (StepFailed, EngineError) as e:
        raise UserError(str(e)) from None
    print(json.dumps(result["params"], indent=1))
    smoke = f"{params['work_uri']}/smoke/smoke.mp4"
    from motioncharacter import storage

    if storage.exists(smoke):
        local = work / "smoke.mp4"
        storage.download_file(smoke, local)
        print(f"video generated through the deployed Triton endpoint: {local} (from {smoke})")
    else:
        print("the evaluation gate did not pass, so nothing was deployed (see the evaluate step's log)")
    print(f"MLflow: {tracking_uri()} (experiments motioncharacter-data, -train, -eval)")
    from motioncharacter import registry

    print(registry.describe())  # the trained adapter's version and the aliases the gate set
    if stack:
        print("the services keep running; stop them with: .venv/bin/motioncharacter stack down")
    return 0
