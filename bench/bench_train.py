"""Training-step and data-loader benchmark on the tiny preset (CPU).

1. One optimizer step (forward + eq. 11 loss + backward + AdamW) through the DeepSpeed engine
   (ZeRO-2, fp32, gloo, one process) against the same module with a plain torch AdamW.
   Both get the same batch and the same noise; the two are timed alternately so load from
   other processes hits both alike. Target: DeepSpeed <= 1.2x plain.
2. The data loader's batches/s (manifest -> decoded, cropped, flipped frames + masks +
   reference + face embedding) against the training step's batches/s. Target: >= 2x.

    .venv/bin/python bench/bench_train.py [--repeats 7] [--frames 8] [--batch 2] [--workers 2]

Needs ~30 s to generate and prepare the fixture clips first (or --data MANIFEST).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def prepare_fixtures(tmp: Path) -> Path:
    from motioncharacter.components.prepare.settings import PrepareConfig
    from motioncharacter.components.prepare.stage import prepare
    from motioncharacter.config import load
    from motioncharacter.fixtures import write_fixtures

    write_fixtures(tmp / "src", velocities=(0, 8), bad_inputs=False)
    prepare(str(tmp / "src"), str(tmp / "prep"), load(PrepareConfig, "prepare.yaml", overrides=["filters.ocr=false"]),
            track=False, progress=False)
    return tmp / "prep" / "manifest.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="a prepared manifest.jsonl (default: generated fixtures)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from motioncharacter.components.train.trainer import setup_distributed

    setup_distributed()
    import deepspeed
    import torch

    from motioncharacter.components.train import trainer as T
    from motioncharacter.components.train.data import ManifestDataset, loader, read_manifest
    from motioncharacter.config import load
    from motioncharacter.components.train.settings import TrainConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    manifest = args.data or str(prepare_fixtures(tmp))
    cfg = load(TrainConfig, "train.yaml", overrides=[
        "model.preset=tiny", f"data.num_frames={args.frames}", f"train.batch_size={args.batch}",
        "model.gradient_checkpointing=false", f"data.num_workers={args.workers}"])
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)

    def build():
        parts = T.build_parts(cfg)
        module = T.MCTrainModule(parts["unet"], parts["adapter"], True)
        return parts, module, [p for p in module.parameters() if p.requires_grad]

    parts_ds, mod_ds, params_ds = build()
    engine, _, _, _ = deepspeed.initialize(model=mod_ds, model_parameters=params_ds,
                                           config=T.deepspeed_config(cfg, bf16=False))
    parts_pt, mod_pt, params_pt = build()
    opt = torch.optim.AdamW(params_pt, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    fmodel = T.face_model(cfg)

    m = read_manifest(manifest)
    ds = ManifestDataset(m, cfg.data, 64, seed=0)
    batch = next(iter(loader(ds, args.batch, 0, 1, 0)))
    dev, dt = torch.device("cpu"), torch.float32

    def step_ds():
        g = torch.Generator().manual_seed(1)
        loss, _ = T.compute_loss(engine, parts_ds, fmodel, batch, cfg, g, dev, dt)
        engine.backward(loss)
        engine.step()

    def step_pt():
        g = torch.Generator().manual_seed(1)
        loss, _ = T.compute_loss(mod_pt, parts_pt, fmodel, batch, cfg, g, dev, dt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_pt, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ds(), step_pt()  # warm-up
    times = {"deepspeed": [], "torch": []}
    for _ in range(args.repeats):
        for name, fn in (("deepspeed", step_ds), ("torch", step_pt)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    n_load = max(4, args.repeats * 2)
    load_t = {}
    for w in sorted({0, args.workers}):
        dl = loader(ManifestDataset(m, cfg.data, 64, seed=0), args.batch, 0, n_load + 1, 0, num_workers=w)
        it = iter(dl)
        next(it)  # start-up (workers, face models) is not throughput
        t = time.perf_counter()
        for _ in range(n_load):
            next(it)
        load_t[w] = (time.perf_counter() - t) / n_load

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"\ntiny preset, CPU, batch {args.batch} x {args.frames} frames x 64x64, fp32, ZeRO-2 (gloo, 1 process), "
          f"{args.repeats} alternating repeats, torch threads {torch.get_num_threads()}")
    print(f"{'':28}{'DeepSpeed':>12}{'plain AdamW':>14}{'ratio':>8}")
    print(f"{'step, median (s)':28}{med['deepspeed']:>12.3f}{med['torch']:>14.3f}{med['deepspeed'] / med['torch']:>8.2f}")
    print(f"{'step, fastest (s)':28}{best['deepspeed']:>12.3f}{best['torch']:>14.3f}"
          f"{best['deepspeed'] / best['torch']:>8.2f}   (target <= 1.20)")
    step_rate = 1.0 / med["deepspeed"]
    print(f"\n{'':28}{'batches/s':>12}{'vs step':>14}")
    print(f"{'training step (DeepSpeed)':28}{step_rate:>12.2f}{1.0:>14.2f}")
    for w, t in load_t.items():
        print(f"{f'loader, {w} worker(s)':28}{1.0 / t:>12.2f}{(1.0 / t) / step_rate:>14.2f}   (target >= 2.00)")


if __name__ == "__main__":
    main()
