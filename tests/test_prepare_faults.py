"""Data preparation under faults: a failure of a service (the VLM captioner, the object store) is
retried and never recorded as final, a bad answer is; a resumed s3:// run on a fresh cache (a new
pod, a KFP retry) rebuilds its contact sheet from the object store.

The captioning endpoint is a small OpenAI-compatible HTTP server in this process: a test double,
since no vision-language model can run here. Everything else is real."""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from motioncharacter import storage
from motioncharacter.components.prepare import stage
from motioncharacter.components.prepare.settings import PrepareConfig
from motioncharacter.components.prepare.stage import PrepareIncomplete, prepare
from motioncharacter.config import load
from motioncharacter.faults import is_transient
from motioncharacter.fixtures import write_fixtures


class VLM:
    """Answers POST /v1/chat/completions with ``status`` (200: a caption)."""

    def __init__(self):
        self.status, self.calls = 503, 0
        vlm = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                vlm.calls += 1
                body = {"choices": [{"message": {"content": json.dumps(
                    {"caption": "A woman talking.", "action": "talking"})}}]} if vlm.status == 200 else {"error": "x"}
                data = json.dumps(body).encode()
                self.send_response(vlm.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def vlm():
    v = VLM()
    yield v
    v.close()


@pytest.fixture
def one_clip(tmp_path):
    src = write_fixtures(tmp_path / "fx", velocities=(8,), bad_inputs=False)
    for p in src.iterdir():
        if p.name != "grace_v08.mp4":
            p.unlink()
    return src


def _cfg(vlm_url: str) -> PrepareConfig:
    return load(PrepareConfig, "prepare.yaml", overrides=["filters.ocr=false", "caption.captioner=vlm",
                                                          f"caption.url={vlm_url}", "caption.model=m"])


def test_transient_failures_are_retried_and_never_final(vlm, one_clip, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "TRANSIENT_BACKOFF_S", 0.0)
    out = tmp_path / "out"
    with pytest.raises(PrepareIncomplete, match="1 input.*transient.*re-run") as err:
        prepare(str(one_clip), str(out), _cfg(vlm.url), progress=False, track=False)
    assert vlm.calls == stage.TRANSIENT_TRIES  # every try reached the endpoint
    assert err.value.summary["dropped_by_reason"] == {"transient": 1}
    assert not list((out / "records").glob("*.json"))  # nothing final: the next run tries it again
    (rec,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert rec["reasons"][0].startswith("transient: TransientError: captioning endpoint")

    vlm.status = 200  # the endpoint is back
    summary = prepare(str(one_clip), str(out), _cfg(vlm.url), progress=False, track=False)
    assert summary["kept"] == 1 and summary["resumed"] == 0
    (rec,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert rec["action"] == "talking" and rec["caption_source"] == "vlm:m"


def test_a_refused_request_is_final(vlm, one_clip, tmp_path, monkeypatch):
    """A 4xx is the request's fault: recorded once, not retried, not retried by the next run either."""
    monkeypatch.setattr(stage, "TRANSIENT_BACKOFF_S", 0.0)
    vlm.status = 400
    out = tmp_path / "out"
    summary = prepare(str(one_clip), str(out), _cfg(vlm.url), progress=False, track=False)
    assert vlm.calls == 1 and summary["dropped_by_reason"] == {"error": 1}
    assert len(list((out / "records").glob("*.json"))) == 1
    assert prepare(str(one_clip), str(out), _cfg(vlm.url), progress=False, track=False)["resumed"] == 1
    assert vlm.calls == 1


def test_failure_classification():
    import requests
    from minio.error import S3Error

    def http_error(code):
        r = requests.Response()
        r.status_code = code
        return requests.HTTPError(response=r)

    def s3(code):
        return S3Error(None, code, "m", "r", "req", "host")

    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    assert is_transient(http_error(503)) and is_transient(http_error(429)) and not is_transient(http_error(404))
    assert is_transient(s3("SlowDown")) and not is_transient(s3("NoSuchKey"))
    assert is_transient(storage.StoreUnavailable("down"))
    assert not is_transient(FileNotFoundError("x")) and not is_transient(ValueError("bad media"))


@pytest.mark.services
def test_s3_resume_on_a_fresh_cache_rebuilds_the_contact_sheet(stack, tmp_path, monkeypatch):
    src = write_fixtures(tmp_path / "fx", velocities=(8,), bad_inputs=False)
    storage.upload_dir(src, f"s3://{stack.bucket}/faults-raw")
    out = f"s3://{stack.bucket}/faults-prepared"
    cfg = load(PrepareConfig, "prepare.yaml", overrides=["filters.ocr=false"])
    monkeypatch.setenv("MOTIONCHARACTER_CACHE", str(tmp_path / "cache-a"))
    first = prepare(f"s3://{stack.bucket}/faults-raw", out, cfg, progress=False, track=False)
    assert first["kept"] >= 1
    storage.client().remove_object(*storage.parse_s3(f"{out}/contact_sheet.png"))
    assert not storage.exists(f"{out}/contact_sheet.png")
    shutil.rmtree(tmp_path / "cache-a")
    monkeypatch.setenv("MOTIONCHARACTER_CACHE", str(tmp_path / "cache-b"))  # another pod: nothing local
    again = prepare(f"s3://{stack.bucket}/faults-raw", out, cfg, progress=False, track=False)
    assert again["resumed"] == first["inputs"] and again["kept"] == first["kept"]
    import io

    from PIL import Image

    sheet = Image.open(io.BytesIO(storage.read_bytes(f"{out}/contact_sheet.png")))
    assert sheet.height >= 112 * first["kept"]  # one row per kept clip, from the store's frames


def test_an_unreachable_output_store_stops_the_run_with_exit_75(tmp_path, monkeypatch, capsys):
    """The store itself gone: the first input that cannot be saved ends the run (no point trying the
    others), with exit 75 (retry) and a resume hint, not a crash. bench_faults.py kills a real one."""
    from motioncharacter.cli import main
    from motioncharacter.stack import free_port

    src = write_fixtures(tmp_path / "fx", velocities=(0, 8), bad_inputs=False)  # several inputs
    monkeypatch.setattr(stage, "TRANSIENT_BACKOFF_S", 0.0)
    monkeypatch.setenv("MOTIONCHARACTER_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("MOTIONCHARACTER_CACHE", str(tmp_path / "cache"))
    assert main(["data", "prepare", str(src), "--output", "s3://gone/prep", "--no-progress", "--no-track",
                 "--set", "filters.ocr=false"]) == 75
    err = capsys.readouterr().err
    assert "unreachable" in err and "run the same command again to resume" in err
    assert "Traceback" not in err
