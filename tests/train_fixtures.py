"""Shared data for the training tests: one prepared fixture manifest per session (~10-20 s)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

_PREPARED: dict[str, Path] = {}

# tiny, fast settings for every test run (4 frames at the tiny preset's 64 px)
FAST = ["data.num_frames=4", "data.num_workers=0", "train.batch_size=1", "train.sample_every=0",
        "loss.id_frame_stride=2"]


def prepared(tmp_path_factory) -> Path:
    """A folder holding manifest.jsonl prepared from the project's generated fixtures
    (three motion clips of known velocity and a still portrait)."""
    if "dir" not in _PREPARED:
        from motioncharacter.components.prepare.settings import PrepareConfig
        from motioncharacter.components.prepare.stage import prepare
        from motioncharacter.config import load
        from motioncharacter.fixtures import write_fixtures

        src = tmp_path_factory.mktemp("train-fixtures")
        out = tmp_path_factory.mktemp("train-prepared")
        write_fixtures(src, velocities=(0, 8), bad_inputs=False)
        prepare(str(src), str(out), load(PrepareConfig, "prepare.yaml", overrides=["filters.ocr=false"]),
                track=False, progress=False)
        _PREPARED["dir"] = out
    return _PREPARED["dir"]


def copy_prepared(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def train_env(tmp: Path) -> dict[str, str]:
    """Environment of a training subprocess: CPU DeepSpeed, embedded MLflow in ``tmp``, and the
    shared DeepSpeed op cache (the first build of its op takes up to a minute)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.update(DS_ACCELERATOR="cpu", MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    return env


def train_cmd(manifest: Path | str, output: Path | str, steps: int, *extra: str, nproc: int = 0) -> list[str]:
    """``motioncharacter train`` on the tiny preset; ``nproc`` > 0: that many processes under torchrun."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    cmd = [sys.executable, *launcher, "-m", "motioncharacter.cli", "train", "--data", str(manifest),
           "--output", str(output), "--preset", "tiny", "--steps", str(steps)]
    for s in FAST:
        cmd += ["--set", s]
    return cmd + list(extra)


def run_train(cmd, env, timeout=600) -> tuple[int, str]:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def losses(out: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (killed after it, resumed before it) keeps the later value."""
    rows = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def latest(out: Path) -> str | None:
    f = out / "checkpoints" / "latest"
    return f.read_text().strip() if f.is_file() else None


# A training subprocess that stops itself (SIGSTOP) at a named point, so a test can signal it at an
# exact step instead of racing it, or that refuses to reach a named function: a sitecustomize module
# on the child's PYTHONPATH wraps the point (the product's code is unchanged).
_HOOK = '''
import os, signal, sys
from motioncharacter.components.train import checkpoint as _ck, trainer as _tr
_POINTS = {"checkpoint": (_ck, "mark_latest"), "step": (_tr._Tracker, "step"), "build_parts": (_tr, "build_parts")}
if os.environ.get("MC_TEST_STOP_AT"):
    _where, _after = os.environ["MC_TEST_STOP_AT"].split(":")
    _owner, _name = _POINTS[_where]
    _orig, _calls = getattr(_owner, _name), [0]
    def _stopping(*a, **kw):
        out = _orig(*a, **kw)
        _calls[0] += 1
        if _calls[0] == int(_after):
            os.kill(os.getpid(), signal.SIGSTOP)
        return out
    setattr(_owner, _name, _stopping)
if os.environ.get("MC_TEST_FORBID"):
    _fowner, _fname = _POINTS[os.environ["MC_TEST_FORBID"]]
    def _forbidden(*a, **kw):
        sys.stderr.write("TEST HOOK: forbidden call " + _fname + "\\n")
        os._exit(99)
    setattr(_fowner, _fname, _forbidden)
'''


def _hook_env(tmp: Path, **values: str) -> dict[str, str]:
    hook = tmp / "train-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, **values}


def stop_at(tmp: Path, where: str, after: int) -> dict[str, str]:
    """Environment additions making a (single-process) training stop itself right after the
    ``after``-th checkpoint is marked latest (``where="checkpoint"``) or the ``after``-th step is
    logged (``"step"``); wait for it with ``wait_stopped``."""
    return _hook_env(tmp, MC_TEST_STOP_AT=f"{where}:{after}")


def forbid(tmp: Path, what: str) -> dict[str, str]:
    """Environment additions making a training exit 99 if it reaches ``what`` ("build_parts": the
    model is built), printing "TEST HOOK: forbidden call"."""
    return _hook_env(tmp, MC_TEST_FORBID=what)


def wait_stopped(proc: subprocess.Popen) -> None:
    """Until ``proc`` stops itself (SIGSTOP); AssertionError if it exits instead."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        proc.returncode = os.waitstatus_to_exitcode(status)
        raise AssertionError(f"training exited ({proc.returncode}) before reaching its stop point")


def wait_rank_stopped(launcher: subprocess.Popen) -> None:
    """Until a process under ``launcher`` (torchrun's ranks) stops itself (``stop_at``); AssertionError
    if the launcher exits first."""
    import time

    import psutil

    while not any(_stopped(c) for c in psutil.Process(launcher.pid).children(recursive=True)):
        assert launcher.poll() is None, f"training exited ({launcher.returncode}) before its stop point"
        time.sleep(0.05)


def _stopped(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_STOPPED
    except psutil.NoSuchProcess:
        return False
