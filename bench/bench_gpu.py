"""Generation and training speed and memory, each speed/memory option on and off, side by side.

On a GPU machine (the paper's setting: 512x512, 16 frames, 30 steps, guidance 8, fp16 and bf16):

    .venv/bin/python bench/bench_gpu.py                       # random weights at SD1.5 + AnimateDiff widths
    .venv/bin/python bench/bench_gpu.py --weights /models/mc  # a real weights folder

On this CPU, at real widths but a smaller video, and in the reduced mode CI runs (tiny widths):

    .venv/bin/python bench/bench_gpu.py --device cpu --size 256 --frames 8 --steps 6
    .venv/bin/python bench/bench_gpu.py --reduced

Every configuration runs in the same process on the same pipeline (the options are switched, not
rebuilt), interleaved over ``--rounds`` so that load from other processes hits all alike; the table
gives the median seconds per video and the ratio against the baseline (no option), and the peak
memory of one generation: GPU memory allocated on CUDA, resident set size above the loaded model on
CPU (each memory configuration then runs in its own subprocess, since a process's peak RSS never
goes down). ``--train`` adds a training step (batch 2, adapter trainable, frozen base).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from motioncharacter.model.precision import TORCH_DTYPES as DTYPES

ROOT = Path(__file__).resolve().parents[1]
# name -> Acceleration fields over "no option" (caching off); "baseline" first (the ratios' denominator)
CONFIGS = {
    "baseline": {},
    "cache 2": {"cache_interval": 2},
    "cache 3": {"cache_interval": 3},
    "cache 3 depth 2": {"cache_interval": 3, "cache_depth": 2},
    "channels_last": {"channels_last": True},
    "fuse_qkv": {"fuse_qkv": True},
    "action eot": {"action_tokens": "eot"},
    "vae slicing": {"vae_slicing": True},
    "ff chunking": {"ff_chunking": True},
    "split guidance": {"split_guidance": True},
    "split frames": {"split_frames": 8},  # implies split guidance
    "memory options": {"vae_slicing": True, "ff_chunking": True, "split_guidance": True, "split_frames": 8},
    "memory options no split frames": {"vae_slicing": True, "ff_chunking": True, "split_guidance": True},
    "cpu offload": {"cpu_offload": True},
    "compile": {"compile": True},
    "defaults": None,  # model.acceleration.Acceleration() as shipped
}
MEMORY = ("baseline", "vae slicing", "ff chunking", "split guidance", "split frames", "memory options no split frames",
          "memory options")


# ---- the models ------------------------------------------------------------------------------
def real_width_parts(seed: int = 0) -> dict:
    """Random SD1.5 + AnimateDiff v2 components at their real widths (UNet 860 M + motion 450 M,
    VAE, CLIP ViT-L text encoder). The image encoder runs once per video: 2 layers at ViT-H width
    with IP-Adapter's 1024-d projection stand in for the 32-layer one."""
    from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from motioncharacter.model.presets import animatediff_scheduler_config, clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    motion = MotionAdapter(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                           use_motion_mid_block=True, motion_max_seq_length=32)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    image = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=2, num_attention_heads=16,
                                                           image_size=224, patch_size=14, projection_dim=1024))
    return dict(unet=unet, motion_adapter=motion, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(),
                image_encoder=image, feature_extractor=CLIPImageProcessor(),
                scheduler=DDIMScheduler(**animatediff_scheduler_config()))


def build_pipeline(widths: str, weights: str | None, device: str, dtype: str):
    """The pipeline as users load it (``load_pipeline(dtype=...)``; random real-width components go
    through its second half, ``pipeline_from_parts``): the product's precision handling is measured,
    e.g. the VAE decoding in fp32 under fp16."""
    from motioncharacter.model.inference import load_pipeline, pipeline_from_parts

    if weights or widths == "tiny":
        pipe = load_pipeline(weights=weights, preset=None if weights else "tiny", device=device, dtype=dtype)
    else:
        from motioncharacter.faces import embedder
        from motioncharacter.model.adapter import MotionCharacterAdapter
        from motioncharacter.model.motion_module import motion_unet

        parts = real_width_parts()
        parts["unet"] = motion_unet(parts.pop("unet"), parts["motion_adapter"])
        parts["motion_adapter"] = None
        parts["adapter"] = MotionCharacterAdapter.for_unet(parts["unet"], clip_image_dim=1024, face_dim=128, seed=0)
        pipe = pipeline_from_parts(parts, embedder(), device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero adapter: every branch does real work
        for p in pipe.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pipe.feature_sources = dict(weights=weights, preset=None, controlnets={})
    return pipe


def configure(pipe, fields: dict | None, state: dict) -> None:
    """Switch ``pipe`` to one configuration, undoing the previous one's lasting changes."""
    from motioncharacter.model.acceleration import Acceleration

    if "unet" in state:  # compiled: back to the eager module
        pipe.unet = state.pop("unet")
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()
    pipe.unet.disable_forward_chunking()
    if getattr(pipe.unet, "original_attn_processors", None) is not None:
        pipe.unet.unfuse_qkv_projections()
        pipe.unet.original_attn_processors = None
        pipe.adapter.attach(pipe.unet)
    pipe.unet.to(memory_format=torch.contiguous_format)
    acc = Acceleration() if fields is None else Acceleration(**{"cache_interval": 1, **fields})  # one at a time
    if acc.compile:
        state["unet"] = pipe.unet
    acc.apply(pipe)


def face_image() -> np.ndarray:
    """A portrait shipped with the package (skimage's Grace Hopper), one face."""
    from motioncharacter.fixtures import package_face

    return package_face("grace_hopper")


# ---- measurements ----------------------------------------------------------------------------
def generate_once(pipe, a) -> float:
    from motioncharacter.model.inference import generate  # long videos (> 16 frames) go through sliding windows

    t = time.perf_counter()
    generate(pipe, image=face_image(), prompt="a person talking", action="talking", intensity=10.0, steps=a.steps,
             guidance=a.guidance, frames=a.frames, height=a.size, width=a.size, seed=0)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def rss_mb() -> float:
    """Resident set size now (Linux /proc; the peak since start elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """The highest RSS while the block runs, sampled every 5 ms (a load peak does not count)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mb(), threading.Event()

        def watch():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, rss_mb())

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def memory_child(a, name: str, dtype: str) -> dict:
    """Run in a subprocess: load, note the RSS, generate (timed; with --memory-only a second, warm call
    too: the figures of `--memory-only --dtypes fp32,bf16`), note the peak."""
    args = [sys.executable, __file__, "--one", name] + [x for x in sys.argv[1:] if x != "--memory"]
    args += ["--dtypes", dtype]  # the last one given wins
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def train_step(pipe, a, dtype) -> tuple[float, float]:
    """Seconds and peak memory of one training step: batch 2, adapter trainable, frozen base."""
    dev = pipe.device
    unet, adapter = pipe.unet, pipe.adapter
    unet.requires_grad_(False)
    adapter.requires_grad_(True)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
    lat = a.size // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, a.frames, lat, lat, generator=g).to(dev, dtype)
    d = unet.config.cross_attention_dim
    text = torch.randn(2, 77, d, generator=g).to(dev, dtype).repeat_interleave(a.frames, 0)
    clip = torch.randn(2, adapter.config.clip_image_dim, generator=g).to(dev, dtype)
    face = torch.randn(2, adapter.config.face_dim, generator=g).to(dev, dtype)
    action = torch.randn(2, 77, d, generator=g).to(dev, dtype)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as peak_rss:
        for _ in range(3):
            times.append(_one_step(unet, adapter, opt, x, text, clip, face, action, dev))
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else peak_rss.peak
    adapter.requires_grad_(False)
    return statistics.median(times[1:]), peak


def _one_step(unet, adapter, opt, x, text, clip, face, action, dev) -> float:
    from motioncharacter.model.losses import region_aware_loss

    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.enable_grad():
        c = adapter.conditioning(clip_embeds=clip, face_embeds=face, action_embeds=action, intensity=[5.0, 15.0])
        eps = unet(x, torch.tensor([100, 700], device=dev), encoder_hidden_states=text,
                   cross_attention_kwargs=c.kwargs()).sample
        region_aware_loss(eps.float(), x.float()).backward()
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def cache_flops(a) -> list[dict]:
    """UNet FLOPs of DeepCache's shallow branch against a full step, at SD1.5 + AnimateDiff widths,
    counted on the meta device (no memory, no time): the speed-up caching can give at most."""
    from torch.utils.flop_counter import FlopCounterMode

    from motioncharacter.model.deepcache import FeatureCache
    from motioncharacter.model.motion_module import motion_unet

    with torch.device("meta"):
        parts = real_width_parts()
        unet = motion_unet(parts["unet"], parts["motion_adapter"])
    lat = a.size // 8
    x = torch.randn(2 if a.guidance > 1 else 1, 4, a.frames, lat, lat, device="meta")
    text = torch.randn(x.shape[0] * a.frames, 77, 768, device="meta")
    t = torch.tensor(500, device="meta")

    def count(fn) -> int:
        m = FlopCounterMode(display=False)
        with m, torch.no_grad():
            fn()
        return m.get_total_flops()

    full = count(lambda: unet(x, t, encoder_hidden_states=text))
    rows = []
    for depth in range(1, len(unet.up_blocks[-1].resnets) + 1):
        cache = FeatureCache(unet, 2, depth)
        with torch.no_grad():
            cache.predict(0, x, t, encoder_hidden_states=text)
        f = count(lambda: cache.predict(1, x, t, encoder_hidden_states=text)) / full
        rows.append({"depth": depth, "shallow_fraction": round(f, 4), "full_tflop": round(full / 1e12, 2),
                     **{f"max_speedup_interval_{n}": round(n / (1 + (n - 1) * f), 2) for n in (2, 3, 4, 5)}})
    return rows


# ---- main ------------------------------------------------------------------------------------
def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--weights", help="a weights folder (default: random weights at --widths)")
    ap.add_argument("--widths", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=8.0)
    ap.add_argument("--dtypes", default=None, help="comma-separated: fp16,bf16,fp32 (default: fp16,bf16 on CUDA, "
                                                   "fp32 on CPU)")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="peak memory of the memory configurations")
    ap.add_argument("--memory-only", action="store_true",
                    help="each configuration and dtype in its own process: peak memory, a cold and a warm "
                         "generation (no interleaved timing rounds)")
    ap.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="time a training step")
    ap.add_argument("--reduced", action="store_true",
                    help="tiny widths, 64 px, 4 frames, 3 steps: checks that the benchmark works (CI)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--flops", action="store_true",
                    help="only count DeepCache's UNet FLOPs at real widths (meta device: instant, any machine)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one memory configuration in a subprocess
    a = ap.parse_args()
    if a.reduced:
        a.widths, a.size, a.frames, a.steps, a.rounds = "tiny", 64, 4, 3, 1
        a.memory_configs = ("baseline", "memory options")  # a subprocess each: keep CI short
    else:
        a.memory_configs = MEMORY
    return a



def main() -> int:
    a = parse()
    cuda = a.device.startswith("cuda")
    dtypes = (a.dtypes or ("fp16,bf16" if cuda else "fp32")).split(",")
    names = [n.strip() for n in a.configs.split(",")] if a.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if not cuda:
        names = [n for n in names if n != "cpu offload"]  # nothing to offload to without an accelerator
        if "compile" in names and a.configs is None:
            names.remove("compile")  # minutes of inductor compilation on a CPU: ask for it by name
    if "baseline" in names:
        names.remove("baseline")
    names.insert(0, "baseline")

    if a.flops:
        print(f"DeepCache shallow branch vs full UNet step, SD1.5 + AnimateDiff widths, {a.size}x{a.size}, "
              f"{a.frames} frames, guidance {a.guidance}:")
        for r in cache_flops(a):
            print("  " + ", ".join(f"{k} {v}" for k, v in r.items()))
        return 0
    if a.one:  # memory child
        pipe = build_pipeline(a.widths, a.weights, a.device, dtypes[0])
        configure(pipe, CONFIGS[a.one], {})
        loaded = rss_mb()
        with PeakRSS() as peak:
            secs = [generate_once(pipe, a) for _ in range(2 if a.memory_only else 1)]  # cold, then warm
        print(json.dumps({"loaded_mb": round(loaded, 1), "peak_mb": round(peak.peak, 1), "first_s": round(secs[0], 2),
                          **({"s_per_video": round(secs[-1], 2)} if len(secs) > 1 else {})}))
        return 0

    device_name = torch.cuda.get_device_name(a.device) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                                     f"{torch.get_num_threads()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}; {a.widths if not a.weights else a.weights}; "
          f"{a.size}x{a.size}, {a.frames} frames, {a.steps} steps, guidance {a.guidance}", flush=True)
    report = {"device": device_name, "setting": dict(size=a.size, frames=a.frames, steps=a.steps,
                                                     guidance=a.guidance, widths=a.widths, weights=a.weights),
              "rows": []}
    if a.memory_only and not cuda:  # every configuration in its own subprocess; nothing loaded here
        asked = [n.strip() for n in a.configs.split(",")] if a.configs else names
        for dt in dtypes:
            for n in [m for m in a.memory_configs if m in asked]:
                report["rows"].append({"dtype": dt, "config": n, **memory_child(a, n, dt)})
                print(f"  {dt} {n}: {report['rows'][-1]}", flush=True)
        for r in report["rows"]:
            if "peak_mb" in r:
                base = next(b for b in report["rows"] if b["dtype"] == r["dtype"])
                r["above_load_ratio_vs_baseline"] = round(
                    (base["peak_mb"] - base["loaded_mb"]) / max(1e-9, r["peak_mb"] - r["loaded_mb"]), 2)
        print(json.dumps(report["rows"], indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        return 0
    for dt in dtypes:
        pipe = build_pipeline(a.widths, a.weights, a.device, dt)
        state: dict = {}
        secs: dict[str, list[float]] = {n: [] for n in names}
        first: dict[str, float] = {}
        configure(pipe, {}, state)
        generate_once(pipe, a)  # warm-up: allocator, kernels and lazy imports are not any option's cost
        for r in range(a.rounds):
            for n in names:
                configure(pipe, CONFIGS[n], state)
                s = generate_once(pipe, a)
                if n == "compile" and n not in first:
                    first[n] = s
                    s = generate_once(pipe, a)  # steady state after compilation
                secs[n].append(s)
                print(f"  [{dt}] round {r + 1} {n}: {s:.2f} s", flush=True)
        configure(pipe, {}, state)
        mem = {}
        if a.memory:
            for n in [m for m in a.memory_configs if m in names]:
                if cuda:
                    configure(pipe, CONFIGS[n], state)
                    torch.cuda.reset_peak_memory_stats()
                    generate_once(pipe, a)
                    mem[n] = {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
                else:
                    mem[n] = memory_child(a, n, dt)
            configure(pipe, {}, state)
        base = statistics.median(secs["baseline"])
        for n in names:
            med = statistics.median(secs[n])
            row = {"dtype": dt, "config": n, "s_per_video": round(med, 3), "speedup": round(base / med, 2)}
            if n in first:
                row["first_call_s"] = round(first[n], 2)
            if n in mem:
                row.update(mem[n])
            report["rows"].append(row)
        if a.train:
            s, peak = train_step(pipe, a, DTYPES[dt])
            report["rows"].append({"dtype": dt, "config": "train step (batch 2)", "s_per_step": round(s, 3),
                                   "peak_mb": round(peak, 1)})
        del pipe
        if cuda:
            torch.cuda.empty_cache()
    print_table(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


def print_table(report: dict) -> None:
    print(f"\n{report['device']}")
    print(f"{'dtype':<6}{'configuration':<24}{'s/video':>9}{'speedup':>9}{'peak MB':>10}{'above load':>12}  notes")
    for r in report["rows"]:
        if "s_per_step" in r:
            print(f"{r['dtype']:<6}{r['config']:<24}{r['s_per_step']:>9.3f}{'':>9}{r['peak_mb']:>10.0f}")
            continue
        peak = r.get("peak_mb")
        above = (r["peak_mb"] - r["loaded_mb"]) if "loaded_mb" in r else None
        notes = []
        if "first_call_s" in r:
            notes.append(f"first call {r['first_call_s']} s")
        if "error" in r:
            notes.append(f"memory run failed: {r['error']}")
        print(f"{r['dtype']:<6}{r['config']:<24}{r['s_per_video']:>9.3f}{r['speedup']:>8.2f}x"
              f"{'' if peak is None else f'{peak:.0f}':>10}{'' if above is None else f'{above:.0f}':>12}  "
              f"{'; '.join(notes)}")


if __name__ == "__main__":
    sys.exit(main())
