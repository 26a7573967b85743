"""Kill faults with figures: a real server SIGKILLed in the middle of real work, on loopback only,
then started again on the same state; what the user saw, what was lost, whether it recovered.

    .venv/bin/python bench/bench_faults.py [--only s3-prepare,s3-checkpoint,triton-stream] [--json out.json]

Scenarios (``--only`` also takes their letters a, b, c):

a. ``s3-prepare``: the S3 server (``motioncharacter.stack``, SeaweedFS) is killed while
   ``motioncharacter data prepare FIXTURES --output s3://BUCKET/prep`` runs, after the first clip's
   record appears; the S3 server is started again on the same state dir and port, the same command
   is run again. Compared with an uninterrupted run into another prefix: the manifest rows (clip,
   key, kept, reasons, every measured value; only the per-clip ``seconds`` ignored).
b. ``s3-checkpoint``: the S3 server is killed while ``motioncharacter train --preset tiny --output
   s3://BUCKET/run`` (8 steps, a checkpoint every 2) stages its second checkpoint for upload; S3
   comes back after ``--outage`` seconds; a run that did not wait it out is resumed with ``--resume``. "Lost nothing": the same loss at every step as
   an uninterrupted run (exactly), the final checkpoint and the adapter export in place; "recovered"
   allows float32 rounding (at most 4 ulp per step), which "lost" then names.
c. ``triton-stream``: tritonserver (tiny repository) is SIGKILLed (its whole process group) after
   the first Progress event of a 60-step gRPC stream; the client's exception and how long it took
   to arrive; then no process of that group (tritonserver, Python stubs) and none of its stubs'
   shared-memory regions may be left, and a server restarted on the same repository and ports must
   be ready and complete the same request.

One row per scenario: scenario | what the user saw | lost | recovered | seconds. Every wait is
bounded; the whole suite takes a few minutes on 2 CPU cores. Real servers only, no mocks.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PY = sys.executable
BUCKET = "faults"
# What a developer's shell may point at (their own stack, tracking server): never reaches a run here.
USER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "MOTIONCHARACTER_S3_ENDPOINT", "MOTIONCHARACTER_BUCKET",
            "MOTIONCHARACTER_MINI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "MOTIONCHARACTER_STATE_DIR")
SCENARIOS = {"a": "s3-prepare", "b": "s3-checkpoint", "c": "triton-stream"}


class Bounded(RuntimeError):
    """A wait that ran past its limit."""


# ---------------------------------------------------------------- helpers
def clean_env(base: dict | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in (base or os.environ).items() if k not in USER_ENV}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, every: float = 0.05):
    """cond()'s first truthy value; Bounded after ``timeout`` s or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise Bounded(f"the process exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise Bounded(f"no {what} within {timeout:g} s")
        time.sleep(every)


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A command with its output in ``log``, run in the log's folder (an embedded MLflow store puts
    ./mlruns there, not in the caller's working directory)."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=log.parent)


def run(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int | None, str, float]:
    """(exit code or None when killed at the timeout, output, seconds)."""
    t = time.monotonic()
    p = start(cmd, env, log)
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(30)
        rc = None
    return rc, log.read_text(errors="replace"), time.monotonic() - t


def wait_exit(p: subprocess.Popen, timeout_s: float) -> int | None:
    """Its exit code, or None when it is still running after ``timeout_s``."""
    try:
        return p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def last_error(text: str) -> str:
    """The last line that reads like an error (what a user scanning the output sees), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\berror\b|Error|unreachable|failed", ln):
            return ln[:400]
    return lines[-1][:400] if lines else "(no output)"


def group(pgid: int) -> list[int]:
    from motioncharacter.stack import _group

    return _group(pgid)


def kill_group(pgid: int, timeout: float = 20.0) -> list[int]:
    """SIGKILL a process group and wait for it to be gone; returns what is still alive after ``timeout``."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        wait_for(lambda: not group(pgid), timeout, "empty process group", every=0.1)
    except Bounded:
        pass
    return group(pgid)


def procs_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (e.g. a model repository's path)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmd and state != "Z":
                out.append(int(d.name))
    return out


def short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


class S3:
    """The project's local S3 server (motioncharacter.stack, SeaweedFS) in its own state dir, which
    can be SIGKILLed and started again on the same state dir and port."""

    def __init__(self, state_dir: Path, bucket: str = BUCKET):
        from motioncharacter.stack import Stack

        self.stack = Stack(state_dir, s3_port=0, mlflow_port=0, bucket=bucket)
        self.bucket = bucket
        self.up()

    def up(self) -> float:
        """Start it (again); seconds until it answers with its volumes and the bucket."""
        from motioncharacter.stack import CRED_VARS

        saved = {v: os.environ.pop(v) for v in CRED_VARS if v in os.environ}  # its own dev credentials
        t = time.monotonic()
        try:
            self.stack.up(only="s3")
        finally:
            os.environ.update(saved)
        return time.monotonic() - t

    @property
    def pid(self) -> int | None:
        return self.stack._load().get("services", {}).get("s3", {}).get("pid")

    def kill(self) -> list[int]:
        """SIGKILL the server's process group, as a crashed node or an OOM kill would; reaped."""
        from motioncharacter.stack import _children

        pid = self.pid
        left = kill_group(pid)
        child = _children.pop(pid, None)
        if child is not None:
            child.wait(10)
        return left

    def env(self) -> dict[str, str]:
        """Endpoint and credentials (its env() also names an MLflow server that does not run here)."""
        return {k: v for k, v in self.stack.env().items() if not k.startswith("MLFLOW_")}

    def client(self):
        from minio import Minio

        e = self.env()
        return Minio(e["MOTIONCHARACTER_S3_ENDPOINT"].split("://", 1)[1], access_key=e["AWS_ACCESS_KEY_ID"],
                     secret_key=e["AWS_SECRET_ACCESS_KEY"], secure=False, region="us-east-1")

    def objects(self, prefix: str) -> dict[str, tuple[int, str]]:
        """key -> (size, etag) of every object under prefix; {} when the server does not answer."""
        try:
            return {o.object_name: (o.size, o.etag) for o in
                    self.client().list_objects(self.bucket, prefix=prefix, recursive=True)}
        except Exception:  # noqa: BLE001 - down or still starting: nothing to see
            return {}

    def read(self, key: str) -> bytes | None:
        try:
            r = self.client().get_object(self.bucket, key)
            try:
                return r.read()
            finally:
                r.close()
                r.release_conn()
        except Exception:  # noqa: BLE001 - absent or unreachable
            return None

    def down(self) -> None:
        self.stack.down()


# ---------------------------------------------------------------- a. S3 killed during data preparation
def _rows(raw: bytes | None) -> dict[str, dict]:
    rows = [json.loads(x) for x in (raw or b"").decode().splitlines() if x.strip()]
    return {r["clip"]: {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def scenario_prepare(root: Path, kill_after_s: float, timeout_s: float) -> dict:
    from motioncharacter.fixtures import write_fixtures

    t_start = time.monotonic()
    fx = write_fixtures(root / "fixtures")
    s3 = S3(root / "stack")
    env = clean_env(**s3.env(), MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
                    MOTIONCHARACTER_CACHE=str(root / "cache"), MOTIONCHARACTER_STATE_DIR=str(root / "stack"))
    tag = uuid.uuid4().hex[:8]
    prep, ref = f"prep-{tag}", f"ref-{tag}"

    def cmd(prefix: str) -> list[str]:
        return [PY, "-m", "motioncharacter.cli", "data", "prepare", str(fx), "--output", f"s3://{BUCKET}/{prefix}",
                "--no-progress", "--set", "filters.ocr=false"]

    r: dict = {"scenario": SCENARIOS["a"], "inputs": len(list(fx.iterdir()))}
    try:
        rc, out, secs = run(cmd(ref), env, root / "prepare-reference.log", timeout_s)
        r["reference"] = {"exit": rc, "seconds": round(secs, 1)}
        if rc != 0:
            raise RuntimeError(f"the uninterrupted reference run failed ({rc}): {last_error(out)}")

        log = root / "prepare-interrupted.log"
        t0 = time.monotonic()
        p = start(cmd(prep), env, log)
        try:
            try:
                wait_for(lambda: any(k.endswith(".json") for k in s3.objects(f"{prep}/records/")), kill_after_s,
                         "first clip record", p, every=0.1)
                r["kill_trigger"] = "first clip record in S3"
            except Bounded as e:
                if p.poll() is not None:
                    raise
                r["kill_trigger"] = f"{e}; killed after {kill_after_s:g} s"
            at_kill = s3.objects(f"{prep}/")
            r["killed_at_s"] = round(time.monotonic() - t0, 1)
            r["records_at_kill"] = sum(k.startswith(f"{prep}/records/") for k in at_kill)
            r["s3_group_left_after_kill"] = s3.kill()
            t_kill = time.monotonic()
            rc = wait_exit(p, timeout_s)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        out = log.read_text(errors="replace")
        r["interrupted"] = {"exit": rc, "exit_after_kill_s": round(time.monotonic() - t_kill, 1),
                            "last_error": last_error(out),
                            "transient_retries_logged": len(re.findall(r"transient failure \(try", out)),
                            "traceback": "Traceback" in out}

        r["restart_s"] = round(s3.up(), 1)
        r["same_port"] = s3.stack.s3_port == int(s3.env()["MOTIONCHARACTER_S3_ENDPOINT"].rsplit(":", 1)[1])
        after = s3.objects(f"{prep}/")
        r["objects_before_kill"] = len(at_kill)
        r["objects_persisted"] = sum(after.get(k) == v for k, v in at_kill.items())

        rc, out, secs = run(cmd(prep), env, root / "prepare-resumed.log", timeout_s)
        summary = json.loads(s3.read(f"{prep}/summary.json") or b"{}")
        r["rerun"] = {"exit": rc, "seconds": round(secs, 1), "last_line": last_error(out) if rc else
                      next((ln for ln in out.splitlines() if ln.startswith("inputs ")), ""),
                      "resumed": summary.get("resumed"), "redone": (summary.get("inputs") or 0) - (summary.get("resumed") or 0)}
        got, want = _rows(s3.read(f"{prep}/manifest.jsonl")), _rows(s3.read(f"{ref}/manifest.jsonl"))
        diff = sorted(c for c in set(got) | set(want) if got.get(c) != want.get(c))
        r["manifest"] = {"rows": len(got), "reference_rows": len(want), "same_clips": set(got) == set(want),
                         "kept": sum(x["kept"] for x in got.values()),
                         "reference_kept": sum(x["kept"] for x in want.values()), "rows_differing": diff,
                         "fields_differing": sorted({k for c in diff for k in set(got.get(c, {})) | set(want.get(c, {}))
                                                     if got.get(c, {}).get(k) != want.get(c, {}).get(k)})}
        lost_records = r["records_at_kill"] - min(r["records_at_kill"], summary.get("resumed") or 0)
        equal = not diff and len(got) == len(want) > 0
        i = r["interrupted"]
        r["saw"] = f"exit {i['exit']} {i['exit_after_kill_s']:g} s after the kill: {i['last_error']}"
        r["lost"] = ("nothing" if equal and not lost_records else
                     f"manifest differs in {len(diff)} row(s) {diff[:3]}" if not equal else "") + \
            (f"; {lost_records} finished record(s) not resumed" if lost_records else "") + \
            f" ({r['rerun']['resumed']} clips resumed, {r['rerun']['redone']} redone; {r['records_at_kill']} " \
            f"records existed at the kill, {r['objects_persisted']}/{r['objects_before_kill']} objects persisted)"
        r["recovered"] = rc == 0 and equal and r["objects_persisted"] == r["objects_before_kill"]
    finally:
        s3.down()
        r["seconds"] = round(time.monotonic() - t_start, 1)
    return r


# ---------------------------------------------------------------- b. S3 killed during checkpoint upload
def mlflow_losses(tmp: Path) -> dict[int, float]:
    """step -> loss over every run in ``tmp``'s embedded MLflow (a step logged twice keeps the later value)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("motioncharacter-train")
    hist = [m for run in client.search_runs([exp.experiment_id])
            for m in client.get_metric_history(run.info.run_id, "loss")] if exp else []
    return {m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}


def scenario_checkpoint(root: Path, steps: int, timeout_s: float, outage_s: float = 10.0) -> dict:
    from train_fixtures import train_cmd, train_env

    from motioncharacter.components.train import checkpoint as ck
    from motioncharacter.fixtures import write_fixtures

    t_start = time.monotonic()
    r: dict = {"scenario": SCENARIOS["b"], "steps": steps}
    fx = write_fixtures(root / "fixtures", velocities=(0, 8), bad_inputs=False)  # as tests/train_fixtures.prepared
    rc, out, _ = run([PY, "-m", "motioncharacter.cli", "data", "prepare", str(fx), "--output", str(root / "prepared"),
                      "--no-track", "--no-progress", "--set", "filters.ocr=false"],
                     clean_env(MOTIONCHARACTER_CACHE=str(root / "cache")), root / "prepare.log", timeout_s)
    if rc != 0:
        raise RuntimeError(f"preparing the training data failed ({rc}): {last_error(out)}")
    manifest = root / "prepared" / "manifest.jsonl"
    s3 = S3(root / "stack")
    tag = uuid.uuid4().hex[:8]
    base, out_uri = f"ckpt-{tag}/base", f"ckpt-{tag}/run"
    every = 2
    second = ck.tag(2 * every)

    def env(tmp: Path) -> dict:
        tmp.mkdir(parents=True, exist_ok=True)
        e = train_env(tmp)  # embedded MLflow in tmp: where the losses are read back from
        return clean_env(e, **s3.env(), MLFLOW_TRACKING_URI=e["MLFLOW_TRACKING_URI"],
                         MOTIONCHARACTER_STATE_DIR=str(root / "stack"), MOTIONCHARACTER_CACHE=str(root / "cache"))

    def cmd(prefix: str, *extra: str) -> list[str]:
        return train_cmd(manifest, f"s3://{BUCKET}/{prefix}", steps, "--set", f"train.checkpoint_every={every}", *extra)

    def latest(prefix: str) -> str | None:
        raw = s3.read(f"{prefix}/checkpoints/latest")
        return raw.decode().strip() if raw else None

    try:
        rc, out, secs = run(cmd(base), env(root / "base"), root / "train-reference.log", timeout_s)
        r["reference"] = {"exit": rc, "seconds": round(secs, 1)}
        if rc != 0:
            raise RuntimeError(f"the uninterrupted reference run failed ({rc}): {last_error(out)}")
        want = mlflow_losses(root / "base")

        staging = ck.staging_dir(f"s3://{BUCKET}/{out_uri}")  # where training stages a checkpoint for upload
        log = root / "train-interrupted.log"
        t0 = time.monotonic()
        p = start(cmd(out_uri), env(root / "run"), log)
        try:
            # state.json is the last file staged before the upload starts (trainer.save)
            wait_for(lambda: (staging / second / "state.json").is_file(), timeout_s,
                     f"checkpoint {second} staged for upload", p, every=0.02)
            r["killed_at_s"] = round(time.monotonic() - t0, 1)
            r["s3_group_left_after_kill"] = s3.kill()
            t_kill = time.monotonic()
            rc = wait_exit(p, outage_s)  # an outage of outage_s (a rescheduled pod), then the store comes back
            r["outage_s"] = round(time.monotonic() - t_kill, 1)
            r["restart_s"] = round(s3.up(), 1)
            if rc is None:
                rc = wait_exit(p, timeout_s)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(30)
        out = log.read_text(errors="replace")
        r["interrupted"] = {
            "exit": rc, "exit_after_kill_s": round(time.monotonic() - t_kill, 1), "last_error": last_error(out),
            "saved_first": "saved a checkpoint of step" in out,
            "save_after_failure_failed": "saving a checkpoint of step" in out and "failed too" in out,
            "traceback": "Traceback" in out,
            "local_staged_checkpoints_left": sorted(d.name for d in staging.iterdir() if d.is_dir()) if staging.exists() else []}

        r["interrupted"]["waited_out"] = "trying again for up to" in out
        r["latest_after_restart"] = latest(out_uri)
        r["second_checkpoint_objects_in_s3"] = len(s3.objects(f"{out_uri}/checkpoints/{second}/"))

        if rc == 0:  # the run waited the outage out: nothing to resume
            r["resume"] = {"exit": None, "seconds": 0, "resumed_from": None, "last_error": ""}
        else:
            rc, out, secs = run(cmd(out_uri, "--resume"), env(root / "run"), root / "train-resumed.log", timeout_s)
            m = re.search(r"resumed from (\S+) at step (\d+)", out)
            r["resume"] = {"exit": rc, "seconds": round(secs, 1), "resumed_from": m[1] if m else None,
                           "last_error": last_error(out) if rc else ""}
        got = mlflow_losses(root / "run")
        diff = [s for s in sorted(set(want) | set(got)) if got.get(s) != want.get(s)]
        export = s3.objects(f"{out_uri}/adapter/")
        ulps = {s: round(abs(got[s] - want[s]) / float(np.spacing(np.float32(want[s])))) for s in diff
                if s in got and s in want}
        r["losses"] = {"steps": sorted(got), "reference_steps": sorted(want), "differing_steps": diff,
                       "float32_ulps": ulps, "max_abs_diff": max((abs(got[s] - want[s]) for s in set(got) & set(want)),
                                                                default=None)}
        r["final_latest"], r["export_files"] = latest(out_uri), len(export)
        r["staged_after_resume"] = sorted(d.name for d in staging.iterdir() if d.is_dir()) if staging.exists() else []
        finished = r["final_latest"] == ck.tag(steps) and len(export) > 0
        all_steps = sorted(want) == list(range(1, steps + 1))
        same = all_steps and not diff
        rounding = all_steps and sorted(got) == sorted(want) and max(ulps.values(), default=0) <= 4
        i = r["interrupted"]
        r["saw"] = (f"a {r['outage_s']:g} s outage waited out (one warning), then exit 0" if i["exit"] == 0 else
                    f"exit {i['exit']} {i['exit_after_kill_s']:g} s after the kill: {i['last_error']}")
        r["lost"] = ("nothing" if same and finished else
                     (f"loss differs at step(s) {', '.join(f'{s} by {u} float32 ulp' for s, u in ulps.items())}"
                      if rounding else f"losses differ at steps {diff}" if all_steps else
                      f"reference logged steps {sorted(want)}") + ("" if finished else "; no finished export")) + \
            f" (resumed from {r['resume']['resumed_from']}; staged checkpoints left in {staging}: after the " \
            f"failure {i['local_staged_checkpoints_left'] or 'none'}, after the resume {r['staged_after_resume'] or 'none'})"
        r["recovered"] = rc == 0 and rounding and finished  # "lost" says whether it was bit-exact
    finally:
        s3.down()
        import shutil

        for prefix in (base, out_uri):  # this run's own staging folders under the temp dir
            shutil.rmtree(ck.staging_dir(f"s3://{BUCKET}/{prefix}"), ignore_errors=True)
        r["seconds"] = round(time.monotonic() - t_start, 1)
    return r


# ---------------------------------------------------------------- c. Triton killed during a streamed request
def _stub_shm(pgid: int) -> list[str]:
    """The shared-memory regions the server's Python stubs were started with."""
    names = []
    for pid in group(pgid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names += [a.decode() for a in args if a.startswith(b"triton_python_backend_shm_region")]
    return names


def scenario_triton(root: Path, steps: int, timeout_s: float) -> dict:
    from serving_fixtures import PROMPT, TINY, export_tiny, face_image

    from motioncharacter.serving.client import MotionCharacterClient, Progress, Result
    from motioncharacter.serving.server import TritonServer

    t_start = time.monotonic()
    r: dict = {"scenario": SCENARIOS["c"], "steps": steps}
    repo = export_tiny(root / "repo")
    req = {**TINY, "steps": steps}
    server = TritonServer(str(repo), http_port=None, grpc_port=None, metrics_port=None,
                          log_file=root / "triton.log").start(timeout_s=timeout_s)
    server2 = None
    try:
        pgid = server.proc.pid
        members, shm = group(pgid), _stub_shm(pgid)
        r["group_before_kill"] = len(members)
        events, t_kill = [], None
        with MotionCharacterClient(server.grpc_url, timeout_s=min(120.0, timeout_s)) as c:
            t0 = time.monotonic()
            try:
                for ev in c.stream(face_image(), PROMPT, **req):
                    events.append(ev)
                    if isinstance(ev, Progress) and t_kill is None:
                        r["first_progress_s"] = round(time.monotonic() - t0, 2)
                        os.killpg(pgid, signal.SIGKILL)
                        t_kill = time.monotonic()
                r["client_got"] = "the stream ended without an error"
            except Exception as e:  # noqa: BLE001 - what the user's code gets is the figure
                r["client_got"] = f"{type(e).__module__}.{type(e).__name__}: {e}"
            r["error_after_kill_s"] = round(time.monotonic() - (t_kill or t0), 2)
            r["progress_events"] = sum(isinstance(e, Progress) for e in events)
        server.proc.wait(10)
        try:
            wait_for(lambda: not group(pgid), 20, "an empty process group", every=0.1)
        except Bounded:
            pass
        r["group_left"] = group(pgid)
        r["processes_on_repository_left"] = procs_mentioning(str(repo))
        r["stub_shm_regions"], r["stub_shm_left"] = len(shm), [n for n in shm if Path("/dev/shm", n).exists()]

        t_restart = time.monotonic()
        server2 = TritonServer(str(repo), http_port=server.http_port, grpc_port=server.grpc_port,
                               metrics_port=server.metrics_port, log_file=root / "triton-restarted.log")
        server2.start(timeout_s=timeout_s)
        r["restart_s"] = round(time.monotonic() - t_restart, 1)
        with MotionCharacterClient(server2.grpc_url, timeout_s=timeout_s) as c:  # the same URL as before
            r["ready_after_restart"] = c.ready()
            t = time.monotonic()
            last = None
            try:
                for ev in c.stream(face_image(), PROMPT, **req):
                    last = ev
                r["rerun_completed"] = isinstance(last, Result) and last.frames.shape[0] == TINY["frames"]
            except Exception as e:  # noqa: BLE001
                r["rerun_completed"], r["rerun_error"] = False, f"{type(e).__name__}: {e}"
            r["rerun_s"] = round(time.monotonic() - t, 2)
        # No process may survive its server. The stubs' shared-memory regions cannot be removed by a
        # SIGKILLed server (it owns them): reported, not counted against recovery, then removed here.
        clean = not r["group_left"] and not r["processes_on_repository_left"]
        left_mb = sum(Path("/dev/shm", n).stat().st_size for n in r["stub_shm_left"]) / 2**20
        r["saw"] = f"{r['client_got']} ({r['error_after_kill_s']:g} s after the kill)"
        r["lost"] = ("the in-flight request only" if "ended without" not in r["client_got"] else "nothing?") + \
            ("" if clean else f"; {len(r['group_left']) + len(r['processes_on_repository_left'])} process(es) left") + \
            (f"; {len(r['stub_shm_left'])} stub shm region(s) ({left_mb:.0f} MiB) left in /dev/shm"
             if r["stub_shm_left"] else "")
        r["recovered"] = bool(r["ready_after_restart"] and r["rerun_completed"] and clean)
        for n in r["stub_shm_left"]:
            Path("/dev/shm", n).unlink(missing_ok=True)
    finally:
        for s in (server2, server):
            if s is not None and s.proc is not None and s.proc.poll() is None:
                s.stop()
        r["seconds"] = round(time.monotonic() - t_start, 1)
    return r


# ---------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="scenarios: " + ", ".join(f"{k} = {v}" for k, v in SCENARIOS.items()))
    ap.add_argument("--only", help="comma-separated scenarios (names or letters a,b,c; default: all)")
    ap.add_argument("--train-steps", type=int, default=8, help="training steps of scenario b (checkpoint every 2)")
    ap.add_argument("--outage", type=float, default=10.0,
                    help="seconds the S3 server stays down in scenario b before it is started again")
    ap.add_argument("--stream-steps", type=int, default=60, help="denoising steps of the streamed request (c)")
    ap.add_argument("--kill-after", type=float, default=120.0,
                    help="a: kill S3 after this many seconds if no clip record has appeared by then")
    ap.add_argument("--timeout", type=float, default=300.0, help="limit of every single wait / command, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, state dirs) and print its path")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args()
    names = [SCENARIOS.get(x.strip(), x.strip()) for x in a.only.split(",")] if a.only else list(SCENARIOS.values())
    bad = [n for n in names if n not in SCENARIOS.values()]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS.values())}")

    work = Path(tempfile.mkdtemp(prefix="mc-faults-"))
    runners = {"s3-prepare": lambda d: scenario_prepare(d, a.kill_after, a.timeout),
               "s3-checkpoint": lambda d: scenario_checkpoint(d, a.train_steps, a.timeout, a.outage),
               "triton-stream": lambda d: scenario_triton(d, a.stream_steps, a.timeout)}
    results = []
    t0 = time.monotonic()
    for name in names:
        d = work / name
        d.mkdir()
        t = time.monotonic()
        print(f"--- {name} ...", flush=True)
        try:
            res = runners[name](d)
        except Exception as e:  # noqa: BLE001 - one scenario's failure is its row, the others still run
            res = {"scenario": name, "saw": "-", "lost": "-", "recovered": False,
                   "seconds": round(time.monotonic() - t, 1), "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
            print(res["traceback"], file=sys.stderr)
        res["work_dir"] = str(d)
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "traceback"}, indent=1, default=str), flush=True)

    print(f"\n{'scenario':<15}| {'what the user saw':<78}| {'lost':<60}| {'recovered':<9} | {'s':>6}")
    print("-" * 178)
    for res in results:
        saw = res.get("error") and f"BENCH FAILED: {res['error']}" or res["saw"]
        print(f"{res['scenario']:<15}| {short(saw, 78):<78}| {short(res['lost'], 60):<60}| "
              f"{'yes' if res['recovered'] else 'no':<9} | {res['seconds']:>6.1f}")
    print(f"total {time.monotonic() - t0:.0f} s; logs in {work}" if a.keep else f"total {time.monotonic() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"scenarios": results, "total_s": round(time.monotonic() - t0, 1)},
                                           indent=1, default=str))
    if not a.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["recovered"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
