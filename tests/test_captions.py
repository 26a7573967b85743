"""Captioning: action phrases from prompts and from facial signals; the VLM captioner's protocol."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from motioncharacter.components.prepare.captions import (ActionThresholds, VLMCaptioner, action_from_prompt,
                                                         action_from_signals, make_captioner)


@pytest.mark.parametrize("prompt, action", [
    ("a man is talking", "talking"),
    ("A woman is smiling at the camera in a park", "smiling"),
    ("a girl with red hair is turning her head slowly, cinematic", "turning her head slowly"),
    ("two friends are laughing and nodding", "laughing and nodding"),
    ("a man wearing a hat, laughing loudly", "laughing"),
    ("a woman is wearing a red dress and blinking", "blinking"),
    ("portrait of a woman in the morning light", ""),
])
def test_action_from_prompt(prompt, action):
    assert action_from_prompt(prompt) == action


def _signals(n=8, **ranges):
    """Per-frame signals: constants, with the named ones swinging over the given range."""
    base = {"mouth_open": 0.05, "mouth_width": 1.0, "ear": 0.3, "yaw": 0.0, "pitch": 1.0,
            "cx": 100.0, "cy": 100.0, "iod": 50.0}
    out = []
    for i in range(n):
        s = dict(base)
        for k, r in ranges.items():
            s[k] = base[k] + (r if i % 2 else 0.0)
        out.append(s)
    return out


def test_action_from_signals_rules():
    t = ActionThresholds()
    assert action_from_signals(_signals(), t)[0] == ""
    assert action_from_signals(_signals(mouth_open=0.3), t)[0] == "talking"
    assert action_from_signals(_signals(mouth_width=0.2), t)[0] == "smiling"
    assert action_from_signals(_signals(yaw=0.3), t)[0] == "turning head"
    assert action_from_signals(_signals(pitch=0.2), t)[0] == "nodding"
    assert action_from_signals(_signals(cx=30.0), t)[0] == "moving head"  # 30 px / 50 px IOD = 0.6
    blink = _signals()
    blink[3]["ear"] = 0.12  # eyes closed in one frame, open in the rest
    assert action_from_signals(blink, t)[0] == "blinking"
    assert action_from_signals(_signals(ear=-0.15), t)[0] == ""  # half-closed throughout is not a blink
    phrase, summary = action_from_signals(_signals(mouth_open=0.3, yaw=0.3), t)
    assert phrase == "talking and turning head"
    assert summary["mouth_open_range"] == pytest.approx(0.3) and summary["move_range"] == 0.0


class _FakeVLM(BaseHTTPRequestHandler):
    """A stand-in for an OpenAI-compatible VLM server (no VLM can run on this machine):
    it checks the request's shape and answers like a chat-completions endpoint."""

    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeVLM.seen.append((self.path, self.headers.get("Authorization"), body))
        content = json.dumps({"caption": "A woman in a blue coat talks in a park.", "action": "talking"})
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_vlm_captioner_speaks_openai_chat_completions(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _FakeVLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MOTIONCHARACTER_VLM_API_KEY", "k-test")
    try:
        cap = make_captioner("vlm", f"http://127.0.0.1:{server.server_port}/v1", "qwen2-vl")
        frames = np.zeros((16, 32, 32, 3), np.uint8)
        c = cap(frames, [])
        assert c.caption.startswith("A woman in a blue coat") and c.action == "talking" and c.source == "vlm:qwen2-vl"
        path, auth, body = _FakeVLM.seen[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer k-test" and body["model"] == "qwen2-vl"
        images = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
        assert len(images) == 4 and images[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    finally:
        server.shutdown()


def test_vlm_unreachable_is_a_clear_error():
    cap = VLMCaptioner("http://127.0.0.1:9", "m", timeout=2)
    with pytest.raises(RuntimeError, match="captioning endpoint http://127.0.0.1:9 failed"):
        cap(np.zeros((2, 8, 8, 3), np.uint8), [])
    with pytest.raises(ValueError, match="needs caption.url"):
        make_captioner("vlm")
