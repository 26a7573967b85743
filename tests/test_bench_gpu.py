"""bench/bench_gpu.py runs (its reduced CPU mode), so it is ready when a GPU machine is lent.
The figures themselves are never asserted: only that every configuration was measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # four generation configurations and a train step in subprocesses
ROOT = Path(__file__).resolve().parents[1]


def test_reduced_mode_measures_every_configuration(tmp_path):
    out = tmp_path / "gpu.json"
    configs = "baseline,cache 2,split guidance,memory options"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--reduced", "--configs", configs,
                        "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU") and report["device"] in r.stdout  # the table names the device
    rows = {x["config"]: x for x in report["rows"]}
    for name in configs.split(","):
        assert rows[name]["s_per_video"] > 0 and rows[name]["speedup"] > 0
        assert name in r.stdout
    assert rows["baseline"]["speedup"] == 1.0
    for name in ("baseline", "memory options"):  # each in its own subprocess: RSS after loading, then the peak
        assert rows[name]["peak_mb"] >= rows[name]["loaded_mb"] > 0, rows[name]
    assert rows["train step (batch 2)"]["s_per_step"] > 0
