"""``motioncharacter generate`` options for the ID-Animator and DreaMoving features."""
from __future__ import annotations

import argparse

from .features import MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ID-Animator and DreaMoving features")
    g.add_argument("--mode", choices=MODES, default="motioncharacter",
                   help="motioncharacter: ID tokens + action/intensity control; id-animator: face adapter only "
                        "(CLIP features through a query resampler, decoupled cross-attention, weight --id-scale, "
                        "no motion control); dreamoving: Content Guider (text + face --face-weight + optional "
                        "cloth image --cloth-weight)")
    g.add_argument("--mix-image", metavar="FACE", help="second identity to blend with --image (identity mixing)")
    g.add_argument("--mix-ratio", type=float, metavar="R",
                   help="share of --mix-image in [0, 1] (0 = only --image, 1 = only --mix-image; default 0.5)")
    g.add_argument("--face-weight", type=float, metavar="A_F",
                   help="dreamoving: alpha_f, weight of the face image prompt in [0, 5] (default 1; "
                        "0 with no cloth image = text only)")
    g.add_argument("--cloth-image", metavar="IMG", help="dreamoving: cloth/body image prompt")
    g.add_argument("--cloth-weight", type=float, metavar="A_C",
                   help="dreamoving: alpha_c, weight of --cloth-image in [0, 5] (default 1)")
    g.add_argument("--pose-video", metavar="VIDEO", help="video of pose maps, one per output frame")
    g.add_argument("--pose-keypoints", metavar="JSON",
                   help="OpenPose-style keypoints (18 per person, one entry per frame) rendered to pose maps; "
                        "{'width', 'height', 'frames'} for pixels, or a list of frames in [0, 1] coordinates")
    g.add_argument("--depth-video", metavar="VIDEO", help="video of depth maps, one per output frame")
    g.add_argument("--pose-scale", type=float, default=1.0, help="pose ControlNet scale in [0, 5] (0 = off)")
    g.add_argument("--depth-scale", type=float, default=1.0, help="depth ControlNet scale in [0, 5] (0 = off)")
    g.add_argument("--pose-controlnet", metavar="DIR_OR_URI",
                   help="pose ControlNet (ControlNetModel or SparseControlNetModel folder; default: the weights' "
                        "controlnet_pose/, random for --preset tiny)")
    g.add_argument("--depth-controlnet", metavar="DIR_OR_URI",
                   help="depth ControlNet folder (default: the weights' controlnet_depth/)")
    g.add_argument("--sparse-image", action="append", default=[], metavar="IMG",
                   help="SparseCtrl keyframe image (repeat for several; pair each with --sparse-frame)")
    g.add_argument("--sparse-frame", action="append", default=[], type=int, metavar="N",
                   help="frame index (0-based) of the matching --sparse-image")
    g.add_argument("--sparse-scale", type=float, default=1.0, help="SparseCtrl scale in [0, 5]")
    g.add_argument("--sparsectrl", metavar="DIR_OR_URI",
                   help="SparseControlNetModel folder (default: the weights' sparsectrl/)")
    g.add_argument("--context-length", type=int, metavar="N",
                   help="FreeNoise sliding-window length for long videos (default: on with 16 when --frames "
                        "exceeds the motion module's training length)")
    g.add_argument("--context-stride", type=int, default=4, metavar="N", help="frames between FreeNoise windows")
    g.add_argument("--base-checkpoint", metavar="DIR_OR_FILE",
                   help="community SD1.5 checkpoint as the base: diffusers folder or single-file .safetensors")


def load_kwargs(args) -> dict:
    cn = {k: v for k, v in (("pose", args.pose_controlnet), ("depth", args.depth_controlnet),
                            ("sparse", args.sparsectrl)) if v}
    from .acceleration import Acceleration, from_args

    acc = from_args(args)
    return dict(base_checkpoint=args.base_checkpoint, controlnets=cn, scheduler=args.scheduler,
                acceleration=None if acc == Acceleration() else acc)


def feature_kwargs(args) -> dict:
    return dict(mode=args.mode, mix_image=args.mix_image, mix_ratio=args.mix_ratio, face_weight=args.face_weight,
                cloth_image=args.cloth_image, cloth_weight=args.cloth_weight, pose_video=args.pose_video,
                pose_keypoints=args.pose_keypoints, depth_video=args.depth_video, pose_scale=args.pose_scale,
                depth_scale=args.depth_scale, sparse_images=list(args.sparse_image),
                sparse_frames=list(args.sparse_frame), sparse_scale=args.sparse_scale,
                context_length=args.context_length, context_stride=args.context_stride)


def precheck(args, frames: int | None) -> None:
    """Option combinations and file existence, before the models load (ValueError)."""
    from pathlib import Path

    from .features import FeatureOptions
    from .long_video import MAX_FRAMES

    kw = feature_kwargs(args)
    FeatureOptions(**kw).check(frames or MAX_FRAMES, args.action)
    for opt in ("mix_image", "cloth_image", "pose_video", "pose_keypoints", "depth_video", "base_checkpoint"):
        v = getattr(args, opt)
        if v and "://" not in v and not Path(v).exists():
            raise ValueError(f"--{opt.replace('_', '-')} {v}: no such file")
    for v in args.sparse_image:
        if not Path(v).exists():
            raise ValueError(f"--sparse-image {v}: no such file")
