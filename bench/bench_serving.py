"""Benchmark: serving through Triton vs the in-process pipeline call, and throughput under concurrency.

    .venv/bin/python bench/bench_serving.py [--repeats 10] [--instances 1] [--json out.json]

Exports the tiny preset to a temporary model repository, starts a real tritonserver on loopback,
then measures the same tiny request (the one the tests use):
  * latency: median of N calls in process (generate()) vs over HTTP and gRPC (frames only, and
    with the mp4 encoded on the server); target overhead <= 1.10x plus a few ms;
  * throughput with 1, 4 and 8 concurrent clients (one client object per thread).
Numbers on a shared 2-core CPU are noisy: compare ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serving_fixtures import PROMPT, TINY, export_tiny, face_image  # noqa: E402

from motioncharacter.serving.client import MotionCharacterClient  # noqa: E402
from motioncharacter.serving.pipeline import inference_api  # noqa: E402
from motioncharacter.serving.server import TritonServer  # noqa: E402


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def throughput(url: str, clients: int, requests_per_client: int) -> dict:
    image = face_image()

    def worker(i: int) -> list[float]:
        lat = []
        with MotionCharacterClient(url, timeout_s=600) as c:
            for k in range(requests_per_client):
                t = time.perf_counter()
                c.generate(image, PROMPT, **{**TINY, "seed": 1000 * i + k})
                lat.append(time.perf_counter() - t)
        return lat

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        lats = [x for lat in ex.map(worker, range(clients)) for x in lat]
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lats), "wall_s": wall, "rps": len(lats) / wall,
            "p50_s": statistics.median(lats), "max_s": max(lats)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per latency row (default 10)")
    ap.add_argument("--requests", type=int, default=16, help="requests per throughput row (default 16)")
    ap.add_argument("--instances", type=int, default=1, help="Triton model instances (default 1)")
    ap.add_argument("--max-batch-size", type=int, default=4, help="dynamic batcher's max batch (default 4)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    image = face_image()
    api = inference_api()
    pipe = api.load_pipeline(preset="tiny")
    local = timed(lambda: api.generate(pipe, image=image, prompt=PROMPT, **TINY), args.repeats)

    with tempfile.TemporaryDirectory(prefix="mc-bench-") as tmp:
        repo = export_tiny(Path(tmp) / "repo", instances=args.instances, max_batch_size=args.max_batch_size)
        with TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None,
                          log_file=Path(tmp) / "triton.log") as server:
            rows = {"in-process generate()": local}
            for name, url, video in (("Triton HTTP", server.http_url, False), ("Triton gRPC", server.grpc_url, False),
                                     ("Triton gRPC + mp4", server.grpc_url, True)):
                with MotionCharacterClient(url, timeout_s=600) as c:
                    rows[name] = timed(lambda: c.generate(image, PROMPT, video=video, **TINY), args.repeats)
            tput = [throughput(server.grpc_url, n, max(1, args.requests // n)) for n in (1, 4, 8)]

    base = statistics.median(local)
    print(f"\ntiny request: {TINY}, {args.repeats} timed calls each (after 2 warm-up calls)")
    print(f"{'path':<24}{'median ms':>11}{'min ms':>9}{'ratio':>8}{'overhead ms':>13}")
    result = {"request": TINY, "latency": {}, "throughput": tput, "instances": args.instances}
    for name, ts in rows.items():
        med = statistics.median(ts)
        result["latency"][name] = {"median_s": med, "min_s": min(ts), "ratio": med / base}
        print(f"{name:<24}{med * 1e3:>11.1f}{min(ts) * 1e3:>9.1f}{med / base:>8.3f}{(med - base) * 1e3:>13.1f}")
    print(f"\nthroughput over gRPC, {args.instances} model instance(s), max_batch_size {args.max_batch_size}")
    print(f"{'clients':>8}{'requests':>10}{'req/s':>8}{'vs 1':>7}{'p50 ms':>9}{'max ms':>9}")
    for t in tput:
        print(f"{t['clients']:>8}{t['requests']:>10}{t['rps']:>8.2f}{t['rps'] / tput[0]['rps']:>7.2f}"
              f"{t['p50_s'] * 1e3:>9.0f}{t['max_s'] * 1e3:>9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
