"""A peer's videos measured with our metrics: ID-Animator's published demo GIFs against their
reference photos (../shared/data/peers), every video against every reference.

    .venv/bin/python bench/bench_peers.py [--peers DIR] [--arcface-pack DIR]

Prints a table (markdown) of face similarity, frames with a face, intensity, dynamic degree and
smoothness; same-identity similarity should be clearly above cross-identity."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parent.parent / "shared" / "data" / "peers"
# video -> identity, from the peers folder's README
VIDEOS = {"ida_hinton_2.gif": "Hinton", "ida_hinton_3.gif": "Hinton",
          "ida_taylor_4.gif": "Taylor", "ida_taylor_5.gif": "Taylor"}


def measure(peers: Path, arcface_pack: str = "") -> list[dict]:
    from motioncharacter.components.evaluate.cli import read_any
    from motioncharacter.components.evaluate.score import MetricWeights, Scorer
    from motioncharacter.video import load_image

    scorer = Scorer(MetricWeights(arcface_pack=arcface_pack))
    refs = {who: load_image(peers / f"ida_ref_{who}.png") for who in sorted(set(VIDEOS.values()))}
    rows = []
    for name, who in VIDEOS.items():
        frames, _ = read_any(peers / name, 8.0, 64)  # VBench's 8 fps
        motion = scorer.flow_metrics(frames)
        for ref_who, ref in refs.items():
            face = scorer.face_similarity(frames, ref)
            rows.append({"video": name, "identity": who, "reference": ref_who, "same": who == ref_who,
                         "frames": len(frames), "face_sim": face.get("value"), "reason": face.get("reason"),
                         "frames_with_face": face.get("frames_scored", 0),
                         **{k: v.get("value") for k, v in motion.items()}})
    return rows


def table(rows: list[dict], embedder: str) -> str:
    keys = [k for k in rows[0] if k not in ("video", "identity", "reference", "same", "frames", "face_sim",
                                            "reason", "frames_with_face")]
    lines = [f"| video | reference | face sim ({embedder}) | frames with a face | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for r in rows:
        sim = f"{r['face_sim']:.3f}" if r["face_sim"] is not None else f"n/a ({r['reason']})"
        lines.append(f"| {r['video']} | {r['reference']}{' (same)' if r['same'] else ''} | {sim} | "
                     f"{r['frames_with_face']}/{r['frames']} | " +
                     " | ".join(f"{r[k]:.3f}" if r[k] is not None else "n/a" for k in keys) + " |")
    same = [r["face_sim"] for r in rows if r["same"] and r["face_sim"] is not None]
    cross = [r["face_sim"] for r in rows if not r["same"] and r["face_sim"] is not None]
    if same and cross:
        lines.append(f"\nsame identity: mean {sum(same) / len(same):.3f} (min {min(same):.3f}); "
                     f"cross identity: mean {sum(cross) / len(cross):.3f} (max {max(cross):.3f})")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=Path, default=DEFAULT, help="folder of the peer videos (default: %(default)s)")
    ap.add_argument("--arcface-pack", default="", help="insightface pack for ArcFace (default: offline SFace)")
    a = ap.parse_args()
    if not all((a.peers / v).is_file() for v in VIDEOS):
        print(f"peer videos not found in {a.peers}", file=sys.stderr)
        return 1
    print(table(measure(a.peers, a.arcface_pack), "arcface" if a.arcface_pack else "sface"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
