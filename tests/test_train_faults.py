"""Training survives its surroundings: an MLflow server that goes away mid-run, a crash
between checkpoints, ranks sharing a node's downloads, two processes under torchrun
(kill, resume, a refused change of process count), and the production /tmp volume."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from train_fixtures import (forbid, latest, losses, prepared, run_train, stop_at, train_cmd, train_env,
                            wait_rank_stopped)

from motioncharacter import storage


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    return prepared(tmp_path_factory)


def wait_for(cond, proc, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_steps(out: Path) -> int:
    f = out / "steps.jsonl"
    return len(f.read_text().splitlines()) if f.is_file() else 0


# ---- the tracking guard ------------------------------------------------------------------------

def test_guard_buffers_a_bounded_number_of_points_and_warns_once(caplog, monkeypatch):
    """A real MLflow client against a port nothing listens on: nothing raises, the newest
    points wait (bounded), one warning for the whole outage."""
    from mlflow.tracking import MlflowClient

    from motioncharacter import tracking
    from motioncharacter.stack import free_port

    # the guard sets these for the whole process (a training job); here monkeypatch undoes them
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    g = tracking.Guard("no-such-run", max_points=5, backoff=0.0, retry_every=0.0,
                       client=MlflowClient(f"http://127.0.0.1:{free_port()}"))
    with caplog.at_level("WARNING", logger="motioncharacter.tracking"):
        for step in (1, 2, 3):
            assert g.metrics({"loss": 1.0 / step, "lr": 1e-5, "nested": {"x": step}, "name": "skipped"}, step) is False
        assert g.call("a tag", lambda: g.client.set_tag("no-such-run", "k", "v")) is False
        assert g.flush(force=True) is False
    assert g.buffered == 9 and g.dropped == 4 and len(g.points) == 5 and g.outages == 1
    assert [(m.key, m.step) for m in g.points][-2:] == [("lr", 3), ("nested.x", 3)]  # the newest kept
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert g.summary() == "MLflow tracking: 1 outage(s), 9 metric points buffered, 9 dropped, 1 other call(s) dropped"


class MlflowServer:
    """A real ``mlflow server`` of this test's own (sqlite in ``dir``) that can be killed and
    started again on the same port; the session's stack is never touched."""

    def __init__(self, dir: Path):
        from motioncharacter.stack import free_port

        self.dir, self.port, self.proc = dir, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, tries: int = 3):
        """Start (again). Before the first start a port another program took meanwhile is picked
        again (also when the server fails to bind it); a restart keeps its port, as the test wants."""
        from motioncharacter.stack import _executable, _http_ok, free_port, port_free

        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        first = self.proc is None
        for attempt in range(1, tries + 1):
            if first and not port_free(self.port):
                self.port = free_port()
                self.uri = f"http://127.0.0.1:{self.port}"
            with open(self.dir / "mlflow.log", "a") as log:
                self.proc = subprocess.Popen(
                    [_executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
                     "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                    cwd=self.dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 300  # a hang guard, not a speed requirement
            while not _http_ok(f"{self.uri}/health") and self.proc.poll() is None:
                assert time.time() < deadline, (self.dir / "mlflow.log").read_text()[-2000:]
                time.sleep(0.2)
            if self.proc.poll() is None:
                return
            if not (first and attempt < tries and not port_free(self.port)):
                raise AssertionError((self.dir / "mlflow.log").read_text()[-2000:])

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: the server and its workers
            self.proc.wait(30)


@pytest.mark.slow
def test_mlflow_outage_mid_run_does_not_stop_training(prep, tmp_path):
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path)
    server.start()
    out, steps = tmp_path / "out", 10
    env = train_env(tmp_path) | {"MLFLOW_TRACKING_URI": server.uri}
    cmd = train_cmd(prep / "manifest.jsonl", out, steps, "--set", "train.checkpoint_every=4",
                    "--set", "experiment=outage")
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: logged_steps(out) >= 1, p, "the first logged step")
        server.kill()
        down_at = logged_steps(out)  # + 2: the step after the first one seen now was logged after the kill
        wait_for(lambda: logged_steps(out) >= down_at + 2, p, "a step logged while the server is down")
        os.kill(p.pid, signal.SIGSTOP)  # hold training while the server comes back
        try:
            assert logged_steps(out) < steps, "training finished before the server came back"
            server.start()
        finally:
            os.kill(p.pid, signal.SIGCONT)
        log = p.communicate(timeout=600)[0]
    finally:
        p.kill()
        server.kill()
    assert p.returncode == 0, log[-3000:]
    assert latest(out) == f"step-{steps:08d}"
    assert len(re.findall(r"MLflow tracking server \S+ is unreachable", log)) == 1, log[-3000:]
    assert "answers again" in log
    m = re.search(r"MLflow tracking: 1 outage\(s\), (\d+) metric points buffered, 0 dropped, 0 other call\(s\) dropped",
                  log)
    assert m and int(m[1]) >= 5, log[-3000:]  # at least one step's five metrics waited

    server.start()  # what the run logged, read back from the server's own store
    try:
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        hist = {h.step: h.value for h in client.get_metric_history(run.info.run_id, "loss")}
        assert run.info.status == "FINISHED"
    finally:
        server.kill()
    assert hist == losses(out)  # every step, the outage's included, with the values training saw
    assert sorted(hist) == list(range(1, steps + 1))


# ---- a crash between checkpoints ---------------------------------------------------------------

@pytest.mark.slow
def test_a_crash_between_checkpoints_saves_one_first(prep, tmp_path):
    data = shutil.copytree(prep, tmp_path / "data")
    out = tmp_path / "out"
    cmd = train_cmd(data / "manifest.jsonl", out, 40, "--set", "train.checkpoint_every=100")
    p = subprocess.Popen(cmd, env=train_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: logged_steps(out) >= 2, p, "two steps")
        for m in data.rglob("masks.npz"):  # the data vanishes under the running job: the next step fails
            m.unlink()
        log = p.communicate(timeout=600)[0]
    finally:
        p.kill()
    assert p.returncode == 1 and "masks.npz does not exist" in log, log[-3000:]
    done = max(losses(out))
    assert done < 40
    assert latest(out) == f"step-{done:08d}", log[-3000:]  # saved although checkpoint_every is 100
    state = json.loads((out / "checkpoints" / latest(out) / "state.json").read_text())
    assert state["step"] == done and state["world_size"] == 1
    assert f"saved a checkpoint of step {done} first" in log


# ---- downloads a node's ranks share ------------------------------------------------------------

def s3_vars(stack) -> dict[str, str]:
    """The S3-only stack's endpoint and credentials (its env() also names an MLflow it does not run)."""
    return {k: v for k, v in stack.env().items() if not k.startswith("MLFLOW_")}


def use_s3(stack, monkeypatch) -> None:
    for k, v in s3_vars(stack).items():
        monkeypatch.setenv(k, v)


def _spy_local_copy(uri: str, barrier, q) -> None:
    """One "rank": counts the files it downloads itself (each made slow, so without the lock
    both ranks would find the cache empty and download)."""
    storage._client.cache_clear()  # a forked process opens its own connections
    real = storage.download_file

    def slow(src, dst):
        time.sleep(0.2)
        q.put(src)
        return real(src, dst)

    storage.download_file = slow
    barrier.wait()
    q.put(("result", str(storage.local_copy(uri))))


@pytest.mark.services
def test_local_copy_downloads_once_into_the_shared_cache(s3_only_stack, tmp_path, monkeypatch):
    use_s3(s3_only_stack, monkeypatch)
    monkeypatch.setenv("MOTIONCHARACTER_CACHE", str(tmp_path / "cache"))
    base = f"s3://{s3_only_stack.bucket}/weights-{uuid.uuid4().hex[:8]}"
    files = {"unet/config.json": b"{}", "unet/w.safetensors": b"w" * 4096, "vae/w.safetensors": b"v" * 100}
    for rel, data in files.items():
        storage.write_bytes(f"{base}/{rel}", data)

    ctx = multiprocessing.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    ranks = [ctx.Process(target=_spy_local_copy, args=(base, barrier, q)) for _ in range(2)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join(120)
        assert r.exitcode == 0
    got = [q.get(timeout=10) for _ in range(len(files) + 2)]
    paths = {x[1] for x in got if isinstance(x, tuple)}
    assert len(paths) == 1 and len([x for x in got if not isinstance(x, tuple)]) == len(files)  # once, not twice
    copy = Path(paths.pop())
    assert {f.relative_to(copy).as_posix(): f.read_bytes() for f in copy.rglob("*") if f.is_file()} == files
    assert copy.name == base.rsplit("/", 1)[1] and not list(copy.parents[1].glob(".*partial*"))
    assert storage.local_copy(base) == copy  # a restart finds it

    storage.write_bytes(f"{base}/vae/w.safetensors", b"changed")  # new content: a new entry, never a stale copy
    changed = storage.local_copy(base)
    assert changed != copy and (changed / "vae" / "w.safetensors").read_bytes() == b"changed"

    with storage.local_file(base) as own:  # a copy of the caller's own, gone after the block
        assert (own / "unet" / "config.json").read_bytes() == b"{}"
    assert not own.exists() and storage.local_copy(str(copy)) == copy  # a local path as it is


def test_production_training_resizes_tmp_not_shared_memory():
    from test_k8s import find, rendered, volume

    job = find(rendered("training/overlays/production"), "PyTorchJob", "motioncharacter-train")
    for r in ("Master", "Worker"):
        spec = job["spec"]["pytorchReplicaSpecs"][r]["template"]["spec"]
        assert volume(spec, "tmp")["emptyDir"]["sizeLimit"] == "64Gi"  # checkpoint staging + the shared cache
        assert volume(spec, "dshm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}  # RAM: as in base


# ---- two processes under torchrun --------------------------------------------------------------
# The project's own fixture data, dropout on: ranks drop different conditions (and some clips have
# no action phrase), yet every rank runs every adapter branch while training (model/attention.py,
# _any_on), so ZeRO-2's bucketed all-reduce sees the same gradients on both. Skipping branches per
# rank failed on gloo with "Received data size doesn't match expected size".
@pytest.fixture(scope="module")
def two_rank_data(prep):
    return prep / "manifest.jsonl"


def s3_train_env(stack, tmp: Path) -> dict[str, str]:
    """Training against the S3 server, with the embedded MLflow in ``tmp``."""
    return train_env(tmp) | s3_vars(stack)


def mlflow_losses(tmp: Path) -> dict[int, float]:
    """step -> loss of the (one) run in ``tmp``'s embedded MLflow; a step logged twice keeps the later value."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("motioncharacter-train").experiment_id])
    hist = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in hist}


SPY = """import os
from motioncharacter import storage

_download_file = storage.download_file


def download_file(uri, local):  # which rank downloads what; the download itself is the real one
    with open(os.environ["MC_DOWNLOAD_LOG"], "a") as f:
        f.write(f"{os.environ.get('LOCAL_RANK', '-')} {uri}\\n")
    return _download_file(uri, local)


storage.download_file = download_file
"""


def download_spy(tmp: Path) -> dict[str, str]:
    """Environment that makes every process of a run log its storage.download_file calls to
    ``tmp/downloads.log`` (a sitecustomize module, which Python imports at start)."""
    d = tmp / "spy"
    d.mkdir()
    (d / "sitecustomize.py").write_text(SPY)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(d), os.environ.get("PYTHONPATH")])),
            "MC_DOWNLOAD_LOG": str(tmp / "downloads.log")}


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, as a lost node would end them (torchrun
    starts each rank in a session of its own, so its process group is not enough)."""
    import psutil

    ranks = psutil.Process(p.pid).children(recursive=True)
    p.kill()
    for r in ranks:
        r.kill()
    p.wait(60)
    psutil.wait_procs(ranks, timeout=60)


def s3_latest(out: str) -> str | None:
    from motioncharacter.components.train import checkpoint as ck

    return ck.latest(out)


@pytest.fixture(scope="module")
def two_rank_baseline(two_rank_data, s3_only_stack, tmp_path_factory):
    """An uninterrupted 2-process run to s3://, 4 steps, a checkpoint every 2."""
    tmp = tmp_path_factory.mktemp("two-rank-base")
    out = f"s3://{s3_only_stack.bucket}/two-rank-{uuid.uuid4().hex[:8]}/base"
    rc, log = run_train(train_cmd(two_rank_data, out, 4, "--set", "train.checkpoint_every=2",
                                  nproc=2), s3_train_env(s3_only_stack, tmp))
    assert rc == 0, log[-3000:]
    return out, mlflow_losses(tmp)


@pytest.mark.slow
@pytest.mark.services
def test_two_ranks_sigkill_then_resume_from_s3_repeats_the_losses(two_rank_data, two_rank_baseline, s3_only_stack,
                                                                   tmp_path, monkeypatch):
    use_s3(s3_only_stack, monkeypatch)  # this process reads checkpoints/latest
    want = two_rank_baseline[1]
    assert sorted(want) == [1, 2, 3, 4]
    out = f"s3://{s3_only_stack.bucket}/two-rank-{uuid.uuid4().hex[:8]}/run"
    env = s3_train_env(s3_only_stack, tmp_path)
    cmd = train_cmd(two_rank_data, out, 4, "--set", "train.checkpoint_every=2", nproc=2)
    # rank 0 stops itself right after checkpoint 2 is marked latest (rank 1 then waits for it in the
    # next collective): the kill lands there, every time
    p = subprocess.Popen(cmd, env=env | stop_at(tmp_path, "checkpoint", 1), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_rank_stopped(p)
    finally:
        kill_tree(p)
    assert s3_latest(out) == "step-00000002"
    # both ranks resume on one node from s3://, through one shared staging folder
    rc, log = run_train(cmd + ["--resume"], env | download_spy(tmp_path))
    assert rc == 0, log[-3000:]
    assert "resumed from step-00000002 at step 2" in log, log[-3000:]
    got = mlflow_losses(tmp_path)
    # the same losses; on two ranks the last float32 digit may differ (seen: 1.1555006 vs 1.1555007
    # at step 4, exact at step 3), far below any change a wrong resume (data order, RNG, optimizer) makes
    assert [got[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], rel=1e-6)
    fetched = [line.split(" ", 1) for line in (tmp_path / "downloads.log").read_text().splitlines()]
    ckpt = [(rank, uri) for rank, uri in fetched if "/checkpoints/step-00000002/" in uri]
    assert ckpt and {rank for rank, _ in ckpt} == {"0"}  # local rank 0 alone downloads it...
    assert len({uri for _, uri in ckpt}) == len(ckpt)  # ...once: rank 1 waits, then reads those files


@pytest.mark.slow
@pytest.mark.services
def test_resume_on_another_process_count_is_refused(two_rank_data, two_rank_baseline, s3_only_stack, tmp_path):
    out, _ = two_rank_baseline
    # refused before the model is built: reaching build_parts would exit 99 (train_fixtures.forbid)
    env = s3_train_env(s3_only_stack, tmp_path) | forbid(tmp_path, "build_parts")
    rc, log = run_train(train_cmd(two_rank_data, out, 6, "--resume"), env)
    assert rc == 1, log[-3000:]
    assert "checkpoint step-00000004 was saved by 2 rank(s) and cannot resume on 1" in log
    assert "Traceback" not in log and "TEST HOOK" not in log


# ---- the object store gone while a checkpoint uploads (bench/bench_faults.py runs the real kill) -----

def test_checkpoint_upload_waits_for_the_store_then_names_what_is_safe(s3_only_stack, tmp_path, monkeypatch, caplog):
    """An upload into an unreachable store is tried again (one warning) until the patience runs out;
    then the error names the staged step and --resume, and the staged copy is kept."""
    from motioncharacter.components.train import checkpoint as ck
    from motioncharacter.stack import free_port

    use_s3(s3_only_stack, monkeypatch)
    monkeypatch.setenv("MOTIONCHARACTER_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    staged = tmp_path / "step-00000004"
    staged.mkdir()
    (staged / "state.json").write_text("{}")
    with pytest.raises(storage.StoreUnavailable) as e:
        ck.publish(f"s3://{s3_only_stack.bucket}/gone", "step-00000004", tmp_path, upload=True, patience_s=3)
    assert "checkpoint step-00000004 could not be uploaded" in str(e.value) and "--resume" in str(e.value)
    assert str(staged) in str(e.value) and (staged / "state.json").is_file()
    assert sum("trying again for up to" in r.getMessage() for r in caplog.records) == 1


def test_checkpoint_upload_succeeds_and_frees_the_staged_copy(s3_only_stack, tmp_path, monkeypatch):
    from motioncharacter.components.train import checkpoint as ck

    use_s3(s3_only_stack, monkeypatch)
    out = f"s3://{s3_only_stack.bucket}/up-{uuid.uuid4().hex[:8]}"
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / "state.json").write_text('{"step": 2}')
    ck.publish(out, "step-00000002", tmp_path, upload=True, patience_s=3)
    assert storage.read_bytes(storage.join(ck.root(out), "step-00000002", "state.json")) == b'{"step": 2}'
    assert not (tmp_path / "step-00000002").exists()
