"""``motioncharacter train``: DeepSpeed training of the MotionCharacter adapter."""
from __future__ import annotations

import argparse
import os


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train the MotionCharacter adapter with DeepSpeed (CPU/gloo or N GPUs)",
        description="Train the MotionCharacter adapter on a prepared manifest with DeepSpeed. Runs as one "
        "process on a CPU, or one process per GPU under `deepspeed` / `torchrun` (see README, Training). "
        "Exit status 143 means a SIGTERM stopped the run after saving a checkpoint; rerun with --resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="training YAML; overrides the packaged train.yaml key by key")
    p.add_argument("--data", required=True, metavar="MANIFEST",
                   help="manifest.jsonl from `motioncharacter data prepare` (local path or s3://)")
    p.add_argument("--output", required=True, metavar="URI",
                   help="folder or s3:// prefix for checkpoints, the adapter export and steps.jsonl (local)")
    p.add_argument("--weights", metavar="DIR_OR_URI", help="base weights folder or s3:// prefix (model.weights)")
    p.add_argument("--preset", choices=["tiny", "mini"],
                   help="train a preset model instead of --weights (tiny: random, for tests; mini: trained here by `demo --learn`)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps in total (train.steps)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output, starting fresh when there is none "
                   "(train.resume; set it in the config for Kubernetes restarts)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set train.zero_stage=3 (repeatable)")
    p.add_argument("--registered-model", metavar="NAME",
                   help="MLflow registered model that the finished adapter becomes a new version of, with its "
                   "lineage as tags (default: $MOTIONCHARACTER_REGISTERED_MODEL or 'motioncharacter')")
    p.set_defaults(func=run)

    b = sub.add_parser(
        "train-base", help="train the small `mini` base model (VAE, UNet + motion modules) from scratch",
        description="Train the `mini` preset's base model from scratch on a prepared manifest, on a CPU: "
        "a VAE, then a UNet with AnimateDiff motion modules (text-to-video diffusion). Writes a weights "
        "folder in the diffusers layout that --weights, `train`, `evaluate` and `deploy` take. It is a tiny "
        "model for proving the training loop, not a quality model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--data", required=True, metavar="MANIFEST", help="manifest.jsonl (local path or s3://)")
    b.add_argument("--output", required=True, metavar="URI", help="weights folder or s3:// prefix to write")
    b.add_argument("--vae-steps", type=int, default=400, help="autoencoder training steps")
    b.add_argument("--unet-steps", type=int, default=1800, help="UNet + motion module training steps")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=run_base)


def resolve(args):
    from motioncharacter.config import load

    from .settings import TrainConfig

    overrides = list(args.set)
    if args.weights:
        overrides += [f"model.weights={args.weights}", "model.preset="]
    if args.preset:
        overrides += [f"model.preset={args.preset}", "model.weights="]
    if args.resume:
        overrides.append("train.resume=true")
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return load(TrainConfig, "train.yaml", args.config, overrides)


def run(args) -> int:
    cfg = resolve(args)
    from .trainer import Trainer

    rc = Trainer(cfg, args.data, args.output, resume=cfg.train.resume).run()
    if rc == 0 and os.environ.get("RANK", "0") == "0":  # finished: one rank registers the adapter
        if cfg.train.mode != "motioncharacter":  # the registry's versions are MotionCharacter adapters
            from .modes import EXPORT_DIR

            print(f"train.mode {cfg.train.mode}: {EXPORT_DIR[cfg.train.mode]}/ in {args.output} is not registered")
            return rc
        register(cfg, args.data, args.output, args.registered_model)
    return rc


def register(cfg, data: str, output: str, name: str | None = None):
    """The finished run's adapter as a new version in the Model Registry, with its lineage: the
    data manifest's SHA-256, the base weights, the git commit and the training run."""
    import hashlib

    from motioncharacter import registry, storage
    from motioncharacter.model.trained import exported_parts, primary_part

    from . import checkpoint as ck
    from .trainer import git_commit

    output = output.rstrip("/")
    parts = exported_parts(output)  # the adapter (or face adapter / Content Guider), motion_adapter/ if trained
    adapter = storage.join(output, primary_part(parts, output))
    run_id = (ck.state(output, ck.latest(output)) or {}).get("mlflow_run_id") or ""
    lineage = {registry.MANIFEST_TAG: hashlib.sha256(storage.read_bytes(data)).hexdigest(),
               registry.COMMIT_TAG: git_commit(), "lineage.data_manifest": data,
               **registry.base_lineage(cfg.model.weights or None, cfg.model.preset or None)}
    try:
        v = registry.register_adapter(adapter, train_run_id=run_id, lineage=lineage, name=name, parts=parts,
                                      extra_tags={"ablation": cfg.ablation_name(), "train_output": output})
    except registry.RegistryError as e:
        raise registry.RegistryError(f"training finished and its adapter is saved at {adapter}, but it could not "
                                     f"be registered: {e}. Run the same command with --resume to register it "
                                     "without training again") from e
    print(f"registered {adapter} as {v.uri}")
    return v


def run_base(args) -> int:
    from motioncharacter import storage

    from .base import BaseSettings, train_base

    if min(args.vae_steps, args.unet_steps) < 1:
        raise ValueError("--vae-steps and --unet-steps must be >= 1")
    if storage.exists(storage.join(args.output, "motioncharacter.json")):
        raise ValueError(f"{args.output} already holds trained weights; choose another --output")
    r = train_base(args.data, args.output, BaseSettings(vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                                                        seed=args.seed), progress=not args.no_progress)
    print(f"mini base weights: {r['output']} (VAE reconstruction PSNR {r['vae_psnr_db']:.1f} dB, "
          f"{r['minutes']:.1f} min)")
    return 0
