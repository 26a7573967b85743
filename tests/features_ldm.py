"""Test helper: a diffusers UNet/VAE/CLIP-text state dict in the original Stable Diffusion
(single-file) key layout, so the single-file loader is tested with a checkpoint written here."""
from __future__ import annotations

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def unet_to_ldm(sd: dict, layers_per_block: int) -> dict:
    L = layers_per_block
    up_has_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if k.startswith("time_embedding.linear_"):
            n = {"1": "0", "2": "2"}[p[1][-1]]
            out[f"model.diffusion_model.time_embed.{n}.{p[2]}"] = v
            continue
        if p[0] == "conv_in":
            new = f"input_blocks.0.0.{p[1]}"
        elif p[0] == "conv_norm_out":
            new = f"out.0.{p[1]}"
        elif p[0] == "conv_out":
            new = f"out.2.{p[1]}"
        elif p[0] == "down_blocks":
            i = int(p[1])
            if p[2] == "downsamplers":
                new = f"input_blocks.{(i + 1) * (L + 1)}.0.op.{'.'.join(p[5:])}"
            else:
                j = int(p[3])
                idx = 1 + i * (L + 1) + j
                rest = ".".join(p[4:])
                new = f"input_blocks.{idx}.0.{_resnet(rest)}" if p[2] == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif p[0] == "mid_block":
            j = int(p[2])
            rest = ".".join(p[3:])
            new = f"middle_block.{2 * j}.{_resnet(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            i = int(p[1])
            if p[2] == "upsamplers":
                new = f"output_blocks.{i * (L + 1) + L}.{2 if i in up_has_attn else 1}.conv.{'.'.join(p[5:])}"
            else:
                j = int(p[3])
                idx = i * (L + 1) + j
                rest = ".".join(p[4:])
                new = f"output_blocks.{idx}.0.{_resnet(rest)}" if p[2] == "resnets" else f"output_blocks.{idx}.1.{rest}"
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def text_to_ldm(sd: dict) -> dict:
    return {"cond_stage_model.transformer." + k: v for k, v in sd.items()}
