"""Cost of each evaluation metric per 16-frame video vs generating that video at the tiny preset.

Generates one 16-frame video with the tiny preset (its native 64x64, 4 steps) and times every
metric that runs on a CPU without supplied weights on it: face similarity (YuNet + SFace on
every frame, plus the reference), motion intensity (eq. 5-7, DIS), dynamic degree (VBench rule,
DIS flow) and motion smoothness (VBench rule, DIS-flow interpolation). Timings are the fastest
of the repeats (least disturbed by other processes on a shared machine). Target: all of them
together <= 0.5x the generation time. The same metrics on a 512x512 16-frame clip (the real
model's size) are timed as well, for scale; CLIP, DOVER, RAFT and AMT need weights and are
not timed.

    .venv/bin/python bench/bench_evaluate.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def metric_costs(scorer, frames, ref, repeats) -> dict[str, float]:
    from motioncharacter.components.evaluate import metrics as M
    from motioncharacter.components.prepare.flow import flow_magnitude, measure

    short = min(frames.shape[1:3])
    return {
        scorer.face_key: best(lambda: scorer.face_similarity(frames, ref), repeats),
        "intensity (eq. 5-7)": best(lambda: measure(frames, scorer.dis, min(256, short)), repeats),
        "dynamic_degree_dis": best(lambda: M.dynamic_degree(flow_magnitude(scorer.dis(frames)), short), repeats),
        "motion_smoothness_flowinterp": best(lambda: M.motion_smoothness(frames, M.FlowInterpolator(scorer.dis)),
                                             repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from motioncharacter.components.evaluate.score import Scorer
    from motioncharacter.fixtures import motion_clip, package_face
    from motioncharacter.model.inference import generate, load_pipeline

    ref = package_face("grace_hopper")
    pipe = load_pipeline(preset="tiny")
    d = pipe.defaults
    gen = dict(image=ref, prompt="a woman talking in a cafe", action="talking", intensity=10.0, frames=16,
               steps=d["steps"], height=d["height"], width=d["width"])
    generate(pipe, **gen, seed=1)  # warm-up
    frames = None

    def run():
        nonlocal frames
        frames = generate(pipe, **gen, seed=0)

    t_gen = best(run, args.repeats)
    scorer = Scorer()
    scorer.face_similarity(frames, ref)  # warm-up (model load)
    costs = metric_costs(scorer, frames, ref, args.repeats)

    print(f"tiny preset: 16 frames {d['height']}x{d['width']}, {d['steps']} steps; generation {t_gen:.3f} s "
          f"(fastest of {args.repeats})\n")
    print(f"{'metric':<32}{'s / video':>10}{'x generation':>14}")
    for k, v in costs.items():
        print(f"{k:<32}{v:>10.4f}{v / t_gen:>14.3f}")
    total = sum(costs.values())
    print(f"{'all CPU metrics':<32}{total:>10.4f}{total / t_gen:>14.3f}   target <= 0.5: "
          f"{'met' if total / t_gen <= 0.5 else 'NOT met'}")

    big = motion_clip(8)[::2][:16]
    big_costs = metric_costs(scorer, big, ref, args.repeats)
    print(f"\nfor scale, the same metrics on a 16-frame 512x512 clip (real model size):")
    for k, v in big_costs.items():
        print(f"{k:<32}{v:>10.4f}")
    print(f"{'all CPU metrics':<32}{sum(big_costs.values()):>10.4f}")
    print("\nnot timed (need weights): clip_i, clip_t, dover, dynamic_degree (RAFT), motion_smoothness (AMT)")


if __name__ == "__main__":
    main()
