"""Forward and training-step time: MotionCharacter UNet vs stock diffusers UNetMotionModel.

Same weights, same input, side by side in one run. The two are timed alternately so load
from other processes hits both alike; the table gives the fastest of the repeats (the least
disturbed by other processes, as timeit advises) and the ratio of medians beside it. The
MotionCharacter forward includes building its tokens (ID encoder + intensity MLP) with every
branch on (lambda = alpha = 1, an action phrase). A training step is forward + loss +
backward + AdamW step with every parameter trainable (stock: the UNet; MotionCharacter: the
UNet plus the adapter), the like-for-like worst case; MotionCharacter's own recipe (frozen base,
adapter only) is also timed against AnimateDiff's (motion modules only).

    .venv/bin/python bench/bench_model.py [--repeats 5] [--configs tiny,base]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from motioncharacter.model.adapter import MotionCharacterAdapter
from motioncharacter.model.losses import region_aware_loss
from motioncharacter.model.motion_module import motion_unet
from motioncharacter.model.presets import build_tiny


def build(name: str):
    from diffusers import MotionAdapter, UNet2DConditionModel

    torch.manual_seed(0)
    if name == "tiny":  # ENVIRONMENT.md sizes: 8 frames, 32x32 latents
        p = build_tiny()
        return motion_unet(p["unet"], p["motion_adapter"]), 8, 32
    if name == "base":  # SD-like widths (768-d text), cross-attention on both levels, 16 frames
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        ma = MotionAdapter(block_out_channels=(64, 128), motion_layers_per_block=1, motion_num_attention_heads=4,
                           motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)
        return motion_unet(unet, ma), 16, 32
    raise ValueError(f"unknown config {name!r} (tiny, base)")


def run(name: str, repeats: int) -> list[tuple]:
    stock, frames, size = build(name)
    mc = copy.deepcopy(stock)
    d = stock.config.cross_attention_dim
    adapter = MotionCharacterAdapter.for_unet(mc, clip_image_dim=1024 if d == 768 else 32,
                                              face_dim=512 if d == 768 else 128, seed=0)
    adapter.attach(mc)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, size, size, generator=g)
    text = torch.randn(1, 77, d, generator=g).repeat_interleave(frames, 0)
    clip = torch.randn(1, adapter.config.clip_image_dim, generator=g)
    face = torch.randn(1, adapter.config.face_dim, generator=g)
    action = torch.randn(1, 77, d, generator=g)
    target = torch.randn_like(x)
    t = torch.tensor(500)

    def fwd_stock():
        return stock(x, t, encoder_hidden_states=text).sample

    def fwd_mc():
        c = adapter.conditioning(clip_embeds=clip, face_embeds=face, action_embeds=action, intensity=[8.0])
        return mc(x, t, encoder_hidden_states=text, cross_attention_kwargs=c.kwargs()).sample

    def trainer(fwd, params):
        params = [p for p in params if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            opt.zero_grad(set_to_none=True)
            region_aware_loss(fwd(), target).backward()
            opt.step()
        return step

    def timed(fn_a, fn_b, grad: bool):
        ta, tb = [], []
        ctx = torch.enable_grad if grad else torch.no_grad
        with ctx():
            fn_a(), fn_b()  # warm-up
            for _ in range(repeats):
                for fn, acc in ((fn_a, ta), (fn_b, tb)):
                    t0 = time.perf_counter()
                    fn()
                    acc.append(time.perf_counter() - t0)
        return min(ta), min(tb), statistics.median(tb) / statistics.median(ta)

    rows = []
    stock.eval(), mc.eval()
    rows.append((name, "forward", *timed(fwd_stock, fwd_mc, grad=False)))
    stock.train(), mc.train()
    for m in (stock, mc, adapter):
        m.requires_grad_(True)
    rows.append((name, "train step, all trainable",
                 *timed(trainer(fwd_stock, stock.parameters()),
                        trainer(fwd_mc, list(mc.parameters()) + list(adapter.parameters())), grad=True)))
    # the two papers' recipes: AnimateDiff trains motion modules, MotionCharacter the adapter
    stock.requires_grad_(False)
    for n, p in stock.named_parameters():
        p.requires_grad_("motion_modules" in n)
    mc.requires_grad_(False)
    rows.append((name, "train step, recipe*",
                 *timed(trainer(fwd_stock, stock.parameters()), trainer(fwd_mc, adapter.parameters()), grad=True)))
    n_base = sum(p.numel() for p in stock.parameters())
    n_ad = sum(p.numel() for p in adapter.parameters())
    print(f"[{name}] UNet {n_base / 1e6:.2f} M params, adapter {n_ad / 1e6:.3f} M; "
          f"input (1, 4, {frames}, {size}, {size})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement")
    ap.add_argument("--configs", default="tiny,base", help="comma-separated: tiny, base")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.configs.split(","):
        rows += run(name.strip(), args.repeats)
    print(f"\n{'config':<6} {'measure':<28} {'stock s':>9} {'MotionChar s':>13} {'ratio':>7} {'(median)':>9}")
    for name, what, a, b, med in rows:
        print(f"{name:<6} {what:<28} {a:9.3f} {b:13.3f} {b / a:6.2f}x {med:8.2f}x")
    print("\ntarget overhead <= 1.15x. *recipe: stock trains motion modules (AnimateDiff), "
          "MotionCharacter trains only its adapter (base frozen).")


if __name__ == "__main__":
    main()
