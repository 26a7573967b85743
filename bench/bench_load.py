"""Load with hostile requests mixed in: N concurrent clients against a real tritonserver (tiny
model, loopback), each sending valid requests interleaved with malformed and oversized ones.

    .venv/bin/python bench/bench_load.py [--clients 8] [--rounds 3] [--json out.json]

Per request kind: how many were sent, answered as expected (a video for valid requests, a clear
INVALID_ARG for the others), other errors; p50/p99 latency; and whether the server answered
/v2/health/ready throughout (polled every 0.2 s from a separate thread). Nothing is lost when every
valid request returns its video. Bounded: clients x rounds x kinds requests, loopback only.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from serving_fixtures import PROMPT, TINY, export_tiny, face_image  # noqa: E402

from motioncharacter.serving.client import MotionCharacterClient, RemoteError  # noqa: E402
from motioncharacter.serving.server import TritonServer  # noqa: E402


def bomb_png() -> bytes:
    """A few KB of PNG declaring 9000x9000 pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def kinds() -> dict[str, tuple[dict, bool]]:
    """name -> (generate() keywords, expected to succeed)."""
    face = face_image()
    return {
        "valid": ({"image": face}, True),
        "not_an_image": ({"image": b"GIF89a definitely not a picture"}, False),
        "bomb_png": ({"image": bomb_png()}, False),
        "path_probe": ({"image": face, "pose_keypoints": "/etc/passwd"}, False),
        "nan_intensity": ({"image": face, "intensity": float("nan")}, False),
        "too_many_steps": ({"image": face, "steps": 10_000}, False),
    }


def run(clients: int, rounds: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mc-load-"))
    server = TritonServer(str(export_tiny(root / "repo")), http_port=None, grpc_port=None, metrics_port=None,
                          log_file=root / "triton.log").start(timeout_s=300)
    ready_fail, polls, stop = [0], [0], threading.Event()

    def watch():
        while not stop.is_set():
            polls[0] += 1
            try:
                with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5) as r:
                    ready_fail[0] += r.status != 200
            except OSError:
                ready_fail[0] += 1
            time.sleep(0.2)

    reqs = kinds()
    results: dict[str, list[tuple[str, float]]] = {k: [] for k in reqs}

    def client(i: int) -> None:
        with MotionCharacterClient(server.grpc_url if i % 2 else server.http_url, timeout_s=600, retries=2) as c:
            for r in range(rounds):
                for name, (kw, ok) in reqs.items():
                    kw = dict(kw)
                    image = kw.pop("image")
                    t = time.perf_counter()
                    try:
                        res = c.generate(image, PROMPT, **{**TINY, "seed": 100 * i + r, **kw})
                        outcome = "ok" if ok and res.frames.shape[0] == TINY["frames"] else "unexpected success"
                    except RemoteError as e:
                        outcome = "refused" if not ok and "internal error" not in str(e) else f"error: {e}"[:120]
                    except ValueError as e:  # the client refused it before sending
                        outcome = "refused by client" if not ok else f"error: {e}"[:120]
                    except Exception as e:  # noqa: BLE001 - counted, reported
                        outcome = f"error: {type(e).__name__}: {e}"[:120]
                    results[name].append((outcome, time.perf_counter() - t))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(client, range(clients)))
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        watcher.join()
        still_ready = server.ready()
        server.stop()
    report = {"clients": clients, "rounds": rounds, "wall_s": round(wall, 1), "ready_polls": polls[0],
              "ready_poll_failures": ready_fail[0], "ready_after": still_ready, "kinds": {}}
    for name, rs in results.items():
        lat = sorted(x for _, x in rs)
        outcomes: dict[str, int] = {}
        for o, _ in rs:
            outcomes[o] = outcomes.get(o, 0) + 1
        report["kinds"][name] = {"sent": len(rs), "outcomes": outcomes,
                                 "p50_s": round(statistics.median(lat), 3),
                                 "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3)}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args()
    r = run(a.clients, a.rounds)
    print(f"{r['clients']} clients x {r['rounds']} rounds, {r['wall_s']} s; server ready in "
          f"{r['ready_polls'] - r['ready_poll_failures']}/{r['ready_polls']} polls, ready after: {r['ready_after']}")
    print(f"{'kind':<16}{'sent':>6}  {'p50 s':>7}{'p99 s':>8}  outcomes")
    for name, k in r["kinds"].items():
        print(f"{name:<16}{k['sent']:>6}  {k['p50_s']:>7.3f}{k['p99_s']:>8.3f}  {k['outcomes']}")
    lost = r["kinds"]["valid"]["sent"] - r["kinds"]["valid"]["outcomes"].get("ok", 0)
    print(f"valid requests lost: {lost}")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    return 0 if lost == 0 and r["ready_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
