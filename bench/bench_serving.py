"""Benchmark: serving through Triton vs the in-process pipeline call, and throughput under concurrency.

    .venv/bin/python bench/bench_serving.py [--repeats 6] [--instances 1] [--json out.json]

Exports the tiny preset to a temporary model repository, starts a real tritonserver on loopback,
then measures the same tiny request (the one the tests use):
  * latency: median of N calls in process (generate()) vs over HTTP and gRPC (frames only, and
    with the mp4 encoded on the server); target overhead <= 1.10x plus a few ms. Triton's own
    statistics split each served call into the model's execute() time and the serving overhead
    (transport, (de)serialisation, queueing), which CPU contention from other processes barely moves;
  * throughput with 1, 4 and 8 concurrent clients (one client object per thread).
Numbers on a shared 2-core CPU are noisy: compare ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
# Idle OpenMP threads sleep instead of spinning, in this process and in Triton's stub (which inherits
# the environment): otherwise whichever side ran last steals the cores from the next interleaved call.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from serving_fixtures import PROMPT, TINY, export_tiny, face_image  # noqa: E402

from motioncharacter.serving.client import MotionCharacterClient  # noqa: E402
from motioncharacter.model import inference as api  # noqa: E402
from motioncharacter.serving.repository import MODEL  # noqa: E402
from motioncharacter.serving.server import TritonServer  # noqa: E402


def interleaved(paths: dict, repeats: int, warmup: int = 2) -> dict[str, list[tuple[float, float]]]:
    """(end-to-end s, model s) for each path, ``repeats`` times, one call of every path per round in
    rotating order, so that load from other processes on a shared machine hits all paths alike."""
    names = list(paths)
    for _ in range(warmup):
        for fn in paths.values():
            fn()
    out = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            out[n].append(paths[n]())
    return out


def local_call(fn):
    def run():
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        return dt, dt
    return run


def served_call(fn, stats_url: str, model: str):
    """Time a Triton call, and read from Triton's statistics how long the model's execute() took for it
    (compute_infer), so the serving overhead shows apart from CPU contention on the generation itself."""
    import tritonclient.http as http

    stats = http.InferenceServerClient(stats_url.split("://")[1], network_timeout=30)

    def read() -> tuple[int, int]:
        s = stats.get_inference_statistics(model)["model_stats"][0]["inference_stats"]
        return int(s["success"]["count"]), int(s["compute_infer"]["ns"])

    def run():
        n0, ns0 = read()
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        deadline = time.monotonic() + 10
        while (after := read())[0] <= n0 and time.monotonic() < deadline:
            time.sleep(0.01)  # Triton records a request's statistics just after its response goes out
        return dt, (after[1] - ns0) / 1e9
    return run


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
    ap.add_argument("--repeats", type=int, default=6, help="timed calls per latency row (default 6)")
    ap.add_argument("--requests", type=int, default=8, help="requests per throughput row (default 8)")
    ap.add_argument("--instances", type=int, default=1, help="Triton model instances (default 1)")
    ap.add_argument("--max-batch-size", type=int, default=4, help="dynamic batcher's max batch (default 4)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    image = face_image()
    pipe = api.load_pipeline(preset="tiny")

    with tempfile.TemporaryDirectory(prefix="mc-bench-") as tmp:
        repo = export_tiny(Path(tmp) / "repo", instances=args.instances, max_batch_size=args.max_batch_size)
        with TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None,
                          log_file=Path(tmp) / "triton.log") as server, \
                MotionCharacterClient(server.http_url, timeout_s=600) as http, \
                MotionCharacterClient(server.grpc_url, timeout_s=600) as grpc:
            rows = interleaved({
                "in-process generate()": local_call(lambda: api.generate(pipe, image=image, prompt=PROMPT, **TINY)),
                "Triton HTTP": served_call(lambda: http.generate(image, PROMPT, **TINY), server.http_url, MODEL),
                "Triton gRPC": served_call(lambda: grpc.generate(image, PROMPT, **TINY), server.http_url, MODEL),
                "Triton gRPC + mp4": served_call(lambda: grpc.generate(image, PROMPT, video=True, **TINY),
                                                 server.http_url, MODEL),
            }, args.repeats)
            tput = [throughput(server.grpc_url, n, max(1, args.requests // n)) for n in (1, 4, 8)]
    base = statistics.median(t for t, _ in rows["in-process generate()"])
    print(f"\ntiny request: {TINY}, {args.repeats} timed calls each (interleaved, after 2 warm-up rounds)")
    print("e2e: client-side wall time; model: Triton's compute_infer for that request (the whole execute():")
    print("decode + validate + generate + outputs); serving overhead = e2e - model, per request")
    print(f"{'path':<24}{'e2e med ms':>11}{'min ms':>9}{'ratio':>7}{'model med ms':>13}"
          f"{'overhead med ms':>16}{'e2e/model':>10}")
    result = {"request": TINY, "latency": {}, "throughput": tput, "instances": args.instances}
    for name, ts in rows.items():
        e2e = statistics.median(t for t, _ in ts)
        model = statistics.median(m for _, m in ts)
        over = statistics.median(t - m for t, m in ts)
        ratio = statistics.median(t / m for t, m in ts)
        result["latency"][name] = {"e2e_median_s": e2e, "e2e_min_s": min(t for t, _ in ts), "ratio_vs_local": e2e / base,
                                   "model_median_s": model, "overhead_median_s": over, "e2e_over_model": ratio,
                                   "samples": ts}
        print(f"{name:<24}{e2e * 1e3:>11.1f}{min(t for t, _ in ts) * 1e3:>9.1f}{e2e / base:>7.3f}{model * 1e3:>13.1f}"
              f"{over * 1e3:>16.1f}{ratio:>10.3f}")
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
